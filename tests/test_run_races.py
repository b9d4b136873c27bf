"""Races on one run: two Resumes at once start it once, and a training process that dies before
it can report leaves a failed run with the reason, not one queued forever."""

import sys
import threading

import psutil
import pytest

from engine import runner
from engine.config import load_recipe
from engine.runner import RunnerError, create_run, resume_run


@pytest.fixture
def stopped_run(data_dir, facts_file):
    run = create_run(load_recipe("quick-test", data_path=str(facts_file)), name="race")
    run.write_status(state="stopped", message="stopped at step 3; adapter saved")
    return run


def test_two_resumes_at_once_start_the_run_once(stopped_run, monkeypatch):
    spawned = []
    both_checked = threading.Barrier(2, timeout=30)

    def fake_spawn(run, resume=False):
        spawned.append(resume)
        run.write_status(state="running", pid=1, pid_created=None)  # pid 1 is alive: running

    original_check = runner.ensure_resumable
    checked = threading.local()

    def slow_check(run):  # both clicks pass the first, unlocked check before either spawns
        original_check(run)
        if not getattr(checked, "once", False):
            checked.once = True
            both_checked.wait()

    monkeypatch.setattr(runner, "spawn", fake_spawn)
    monkeypatch.setattr(runner, "ensure_resumable", slow_check)
    results = []

    def click():
        try:
            results.append(resume_run(stopped_run))
        except RunnerError as exc:
            results.append(exc)

    threads = [threading.Thread(target=click, name=f"click{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert spawned == [True]  # one training process
    assert sum(isinstance(r, RunnerError) for r in results) == 1, results
    assert stopped_run.read_status()["state"] == "running"  # not overwritten by "queued"
    assert runner.queued_runs() == []


def test_a_process_that_dies_before_reporting_leaves_a_failed_run(stopped_run, monkeypatch):
    # A Python that exits at once, gone before the runner could even look at its pid
    monkeypatch.setattr(sys, "executable", "/bin/false")

    def gone(pid):
        raise psutil.NoSuchProcess(pid)

    monkeypatch.setattr(runner, "process_created", gone)
    runner.spawn(stopped_run)
    status = stopped_run.read_status()
    assert status["state"] == "failed"
    assert "ended at once" in status["message"] and "exit code 1" in status["message"]
    assert runner.active_run() is None
