"""Races on one run: two Resumes at once start it once, a training process that dies before it can
report leaves a failed run with the reason, not one queued forever, and threads and processes
resuming and stopping runs at random never put two training processes on the machine, strand a
queued run or show a state its process does not have. Only the training process writes
status.json; what the runner did shows through launch.json."""

import ast
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import run_hammer

from engine import runner
from engine.config import ConfigError, load_recipe
from engine.rundir import LIVE_STATES, read_lines
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


# --- only the training process writes status.json ---------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# The training process: the recipe, its Trainer callback and the progress messages they write.
# (and engine/distributed.py: the process that starts a run's several processes tells a failure
# they could not report)
STATUS_WRITERS = {"engine/train.py", "engine/callback.py", "engine/progress.py",
                  "engine/distributed.py"}


def attribute_uses(name: str) -> set[str]:
    """The engine and app modules that use `<something>.<name>` (a call or a reference)."""
    found = set()
    for path in [*ROOT.glob("engine/*.py"), *ROOT.glob("app/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.Attribute) and node.attr == name for node in ast.walk(tree)):
            found.add(path.relative_to(ROOT).as_posix())
    return found


def test_only_the_training_process_writes_status_json():
    assert attribute_uses("write_status") <= STATUS_WRITERS, attribute_uses("write_status")
    assert attribute_uses("status_path") <= {"engine/rundir.py"}  # nobody writes it by hand
    # ... and the runner's record of what it did with a run is the runner's alone (and its
    # launcher's for several processes, which records the strategy it chose)
    assert attribute_uses("write_launch") == {"engine/runner.py", "engine/distributed.py"}
    assert attribute_uses("launch_path") <= {"engine/rundir.py"}


def test_the_training_recipe_does_not_import_the_job_queue():
    # The runner starts what follows a training process (runner.after_training), not the recipe.
    for module in STATUS_WRITERS:
        tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        assert not imported & {"engine.runner", "engine.runs"}, module


@pytest.fixture
def stand_in_popen(monkeypatch):
    """Training processes that start in a moment and train nothing (tests/run_hammer.py)."""
    monkeypatch.setattr(subprocess, "Popen", run_hammer.use_stand_in_trainer())


def test_what_the_runner_does_shows_without_touching_status_json(data_dir, facts_file,
                                                                 monkeypatch):
    class Alive:  # a training process that never reports: only the runner's record speaks
        def __init__(self, command, **kwargs):
            self.pid = os.getpid()

    monkeypatch.setattr(subprocess, "Popen", Alive)
    cfg = load_recipe("quick-test", data_path=str(facts_file), device="cpu")
    created = create_run(cfg, name="created")
    assert created.read_status()["state"] == "queued"  # waiting to start
    first = runner.start_run(cfg, name="first")
    status = first.read_status()
    assert (status["state"], status["pid"], status["gpu"]) == ("running", os.getpid(), None)
    second = runner.start_run(cfg, name="second")
    assert second.read_status()["state"] == "queued"
    assert [run.name for run in runner.queued_runs()] == [second.name]
    assert "taken out" in runner.stop_run(second)
    assert second.read_status()["state"] == "stopped"

    def gone(requested):
        raise ConfigError(f"GPU {requested} does not exist")

    monkeypatch.setattr(runner, "run_gpu", gone)  # the GPU it was queued for was taken out
    third = create_run(load_recipe("quick-test", data_path=str(facts_file), gpu=7), name="third")
    with pytest.raises(RunnerError, match="GPU 7 does not exist"):
        runner.spawn(third)
    assert "GPU 7 does not exist" in third.read_status()["message"]
    assert third.read_status()["state"] == "failed"
    assert not any(run.status_path.exists() for run in (created, first, second, third))


def test_a_training_processs_report_wins_once_it_reports_on_the_latest_launch(stopped_run):
    stopped_run.write_launch(launch=4, state="queued", message="queued")
    assert stopped_run.read_status()["state"] == "queued"  # its last report is older
    stopped_run.write_status(state="running", launch=4, pid=os.getpid(),
                             pid_created=runner.process_created(os.getpid()), step=1)
    status = stopped_run.read_status()
    assert (status["state"], status["step"]) == ("running", 1)
    stopped_run.write_launch(launch=5, state="queued", message="queued again")
    assert stopped_run.read_status()["state"] == "queued"
    assert stopped_run.latest_launch() == 5


# --- many hands on one run at once ----------------------------------------------------------------

def settled(runs, stall_s: float = 60) -> None:
    """Wait until no run is live and the queue is empty: a queued run that never starts, or a
    process that never ends, fails here."""
    deadline = time.monotonic() + stall_s
    while time.monotonic() < deadline:
        states = [run.read_status()["state"] for run in runs]
        if not any(state in LIVE_STATES for state in states) and not runner.queued_runs():
            return
        time.sleep(0.1)
    raise AssertionError(f"not settled: {[run.read_status() for run in runs]}, "
                         f"queue {runner.queued_runs()}")


def assert_one_training_process_at_a_time(data_dir) -> int:
    held = sorted(read_lines(data_dir / "runs" / "held.jsonl"), key=lambda h: h["start"])
    for before, after in zip(held, held[1:]):
        assert after["start"] >= before["end"], ("two training processes at once", before, after)
    return len(held)


@pytest.fixture
def two_stopped_runs(data_dir, facts_file):
    cfg = load_recipe("quick-test", data_path=str(facts_file), device="cpu")
    runs = [create_run(cfg, name=name) for name in ("one", "two")]
    for run in runs:
        run.write_status(state="stopped", message="stopped at step 3; adapter saved")
    return runs


def watch(runs, seen: list, done: threading.Event) -> None:
    """What every reader sees meanwhile: never a run failed (a running state whose process is gone
    or one that could not start) and never two runs training."""
    while not done.is_set():
        # Twice: one snapshot of all runs (a run that ends and the next that starts between two
        # reads of one pass would look like two at once).
        first, second = ([run.read_status()["state"] for run in runs] for _ in range(2))
        if first == second:
            seen.append(first)
        time.sleep(0.005)


def check_watched(seen: list) -> None:
    assert seen and all("failed" not in states for states in seen), \
        next(states for states in seen if "failed" in states)
    assert all(sum(s in runner.ACTIVE_STATES for s in states) <= 1 for states in seen)


def test_threads_hammering_resume_and_stop(two_stopped_runs, data_dir, stand_in_popen):
    seen, done = [], threading.Event()
    watcher = threading.Thread(target=watch, args=(two_stopped_runs, seen, done))
    watcher.start()
    answers = []
    hands = [threading.Thread(target=lambda seed=seed: answers.extend(
        run_hammer.hammer(3.0, seed, [run.name for run in two_stopped_runs]))) for seed in range(4)]
    for hand in hands:
        hand.start()
    for hand in hands:
        hand.join(120)
    settled(two_stopped_runs)
    done.set()
    watcher.join()
    check_watched(seen)
    assert any(answer.startswith("resuming") for answer in answers)
    assert any(answer.startswith("refused") for answer in answers)
    assert assert_one_training_process_at_a_time(data_dir) >= 2
    assert all(run.read_status()["state"] == "stopped" for run in two_stopped_runs)


def test_processes_hammering_resume_and_stop(two_stopped_runs, data_dir):
    seen, done = [], threading.Event()
    watcher = threading.Thread(target=watch, args=(two_stopped_runs, seen, done))
    watcher.start()
    names = [run.name for run in two_stopped_runs]
    hands = [subprocess.Popen([sys.executable, run_hammer.__file__, "hammer", "3", str(seed),
                               *names], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in range(3)]
    answers = []
    for hand in hands:
        out, err = hand.communicate(timeout=120)
        assert hand.returncode == 0, err[-3000:]
        answers += out.splitlines()
    settled(two_stopped_runs)
    done.set()
    watcher.join()
    check_watched(seen)
    assert any(answer.startswith("resuming") for answer in answers), answers
    assert assert_one_training_process_at_a_time(data_dir) >= 2
    assert all(run.read_status()["state"] == "stopped" for run in two_stopped_runs)
