"""The run directory (the UI <-> training contract) and the job runner, without training anything."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import engine.rundir as rundir_module
import engine.runner as runner_module
from engine import checkpoints
from engine.config import RunConfig
from engine.rundir import RunDir, process_created
from engine.runner import (
    RunnerError,
    active_run,
    cancel_queued,
    create_run,
    delete_run,
    get_run,
    list_runs,
    move_queued,
    queued_runs,
    resume_run,
    start_next,
    start_run,
    stop_run,
)


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path / "run")


@pytest.fixture
def run_dir(run):
    run.path.mkdir()
    return run


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def this_process() -> dict:
    return {"pid": os.getpid(), "pid_created": process_created(os.getpid())}


# --- status.json ------------------------------------------------------------------------------

def test_status_write_merges_and_leaves_no_temp_files(run_dir):
    run_dir.write_status(state="running", step=1, message="loading")
    first = json.loads(run_dir.status_path.read_text())
    status = run_dir.write_status(step=2)
    on_disk = json.loads(run_dir.status_path.read_text())
    assert on_disk == status
    assert (on_disk["state"], on_disk["step"], on_disk["message"]) == ("running", 2, "loading")
    assert on_disk["updated"] >= first["updated"]
    assert [p.name for p in run_dir.path.iterdir()] == ["status.json"]


def test_status_is_replaced_by_rename_never_rewritten_in_place(run_dir, monkeypatch):
    run_dir.write_status(state="running", step=1)
    seen = []
    real_replace = os.replace

    def spying_replace(src, dst):
        # at the moment of the rename, the new content is complete and the old file untouched
        new, old = (json.loads(Path(p).read_text())["step"] for p in (src, dst))
        seen.append((new, old))
        real_replace(src, dst)

    monkeypatch.setattr(rundir_module.os, "replace", spying_replace)
    run_dir.write_status(step=2)
    assert seen == [(2, 1)]
    assert run_dir.read_status()["step"] == 2


def test_missing_or_torn_status_reads_as_failed(run_dir):
    assert run_dir.read_status()["state"] == "failed"
    run_dir.status_path.write_text('{"state": "runn')
    assert run_dir.read_status()["state"] == "failed"


# --- metrics.jsonl ----------------------------------------------------------------------------

def test_metrics_append_and_read(run_dir):
    assert run_dir.read_metrics() == []
    run_dir.append_metric({"step": 1, "loss": 2.5})
    run_dir.append_metric({"step": 2, "loss": 2.25, "lr": 2e-4})
    assert run_dir.read_metrics() == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "lr": 2e-4}]
    assert len(run_dir.metrics_path.read_text().splitlines()) == 2  # one line per record


def test_a_torn_last_metrics_line_is_skipped(run_dir):
    run_dir.append_metric({"step": 1, "loss": 2.5})
    run_dir.append_metric({"step": 2, "loss": 2.0})
    with open(run_dir.metrics_path, "a") as fh:
        fh.write('{"step": 3, "lo')  # the trainer is mid-write
    assert [m["step"] for m in run_dir.read_metrics()] == [1, 2]
    with open(run_dir.metrics_path, "a") as fh:
        fh.write('ss": 1.5}\n')  # ... and finishes the line
    assert [m["step"] for m in run_dir.read_metrics()] == [1, 2, 3]


# --- stop request, liveness, checkpoints --------------------------------------------------------

def test_stop_request_round_trip(run_dir):
    assert not run_dir.stop_requested()
    run_dir.request_stop()
    assert run_dir.stop_requested()
    assert run_dir.stop_path.is_file()


def test_running_status_with_a_dead_pid_reads_as_failed_with_the_log_tail(run_dir):
    run_dir.log_path.write_text("".join(f"log line {i}\n" for i in range(1, 11)))
    run_dir.write_status(state="running", pid=dead_pid(), step=3)
    status = run_dir.read_status()
    assert status["state"] == "failed"
    assert "ended without saying why" in status["message"]
    assert "log line 10" in status["error"] and "log line 6" in status["error"]
    assert "log line 5" not in status["error"]  # only the tail
    assert status["step"] == 3  # the rest of the status is kept
    assert json.loads(run_dir.status_path.read_text())["state"] == "running"  # reading writes nothing


def test_live_pid_keeps_its_state(run_dir):
    run_dir.write_status(state="running", **this_process())
    assert run_dir.read_status()["state"] == "running"


def test_a_reused_pid_with_another_creation_time_counts_as_dead(run_dir):
    me = this_process()
    run_dir.write_status(state="running", pid=me["pid"], pid_created=me["pid_created"] - 3600)
    assert run_dir.read_status()["state"] == "failed"


def test_ended_states_are_not_checked_for_a_process(run_dir):
    run_dir.write_status(state="finished", pid=dead_pid(), message="done")
    assert run_dir.read_status()["state"] == "finished"


def test_latest_checkpoint_orders_numerically_and_skips_incomplete_ones(run_dir):
    assert run_dir.latest_checkpoint() is None
    for step in (2, 9, 10, 1):
        (run_dir.checkpoints_dir / f"checkpoint-{step}").mkdir(parents=True)
        checkpoints.mark_complete(run_dir.checkpoints_dir / f"checkpoint-{step}")
    (run_dir.checkpoints_dir / "checkpoint-final").mkdir()
    (run_dir.checkpoints_dir / "checkpoint-11").mkdir()  # being written, or torn by a kill
    assert run_dir.latest_checkpoint().name == "checkpoint-10"
    assert checkpoints.remove_incomplete(run_dir.checkpoints_dir) == ["checkpoint-11"]
    assert [p.name for p in checkpoints.all_checkpoints(run_dir.checkpoints_dir)] == \
        ["checkpoint-1", "checkpoint-2", "checkpoint-9", "checkpoint-10"]


def test_checkpoint_problems_are_found_before_it_is_marked(run_dir):
    folder = run_dir.checkpoints_dir / "checkpoint-3"
    folder.mkdir(parents=True)
    for name in checkpoints.REQUIRED:
        (folder / name).write_text("{}")
    assert checkpoints.problem(folder) == ""
    (folder / "optimizer.pt").write_bytes(b"")  # the disk filled up mid-write
    assert "optimizer.pt" in checkpoints.problem(folder)
    (folder / "optimizer.pt").write_text("x")
    (folder / "trainer_state.json").write_text('{"glob')
    assert "trainer_state.json" in checkpoints.problem(folder)


def test_drop_metrics_after_a_step(run_dir):
    for step in (1, 2, 3, 4):
        run_dir.append_metric({"step": step, "loss": 1.0 / step})
    assert run_dir.drop_metrics_after(2) == 2
    assert [m["step"] for m in run_dir.read_metrics()] == [1, 2]
    assert run_dir.drop_metrics_after(2) == 0
    assert run_dir.drop_metrics_after(0) == 2 and run_dir.read_metrics() == []


# --- the runner -------------------------------------------------------------------------------

def config(tmp_path) -> RunConfig:
    return RunConfig(data_path=str(tmp_path / "train.jsonl"), lora_r=8)


def test_create_run_writes_config_and_queued_status(data_dir, tmp_path):
    cfg = config(tmp_path)
    run = create_run(cfg, name="My first run!")
    assert run.path.parent == data_dir / "runs"
    assert run.name.endswith("-my-first-run")
    assert RunConfig.load(run.config_path) == cfg
    status = run.read_status()
    assert status["state"] == "queued" and status["step"] == 0
    assert run.is_run()


def test_create_run_validates_first(data_dir):
    with pytest.raises(ValueError, match="data_path is empty"):
        create_run(RunConfig(data_path=""))
    assert not (data_dir / "runs").exists() or not any((data_dir / "runs").iterdir())


def test_run_names_are_unique(data_dir, tmp_path, monkeypatch):
    frozen = SimpleNamespace(strftime=lambda fmt: "20250101-120000", time=time.time)
    monkeypatch.setattr(runner_module, "time", frozen)  # all created in the same second
    names = [create_run(config(tmp_path), name="same").name for _ in range(3)]
    assert names == ["20250101-120000-same", "20250101-120000-same-2", "20250101-120000-same-3"]


def test_get_run_finds_a_run(data_dir, tmp_path):
    run = create_run(config(tmp_path), name="x")
    assert get_run(run.name).path == run.path


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", "/etc", ".hidden", "a\\b", None])
def test_get_run_refuses_names_that_are_not_run_names(data_dir, name):
    (data_dir / "x").mkdir()
    (data_dir / "x" / "config.yaml").write_text("model: embedded\n")  # a target outside runs/
    with pytest.raises(RunnerError, match="is not a run name"):
        get_run(name)


def test_get_run_of_an_unknown_name(data_dir):
    with pytest.raises(RunnerError, match="not found"):
        get_run("20250101-000000-nope")


def test_list_runs_newest_first(data_dir, tmp_path, monkeypatch):
    assert list_runs() == []
    stamps = iter(["20250101-120000", "20250101-120001", "20250102-090000"])
    monkeypatch.setattr(runner_module, "time",
                        SimpleNamespace(strftime=lambda fmt: next(stamps), time=time.time))
    created = [create_run(config(tmp_path), name=n).name for n in ("b-first", "a-second", "c-third")]
    (data_dir / "runs" / "not-a-run").mkdir()  # a folder without config.yaml is ignored
    assert [r.name for r in list_runs()] == created[::-1]


def test_active_run_finds_only_a_live_run(data_dir, tmp_path):
    finished = create_run(config(tmp_path), name="finished")
    finished.write_status(state="finished")
    crashed = create_run(config(tmp_path), name="crashed")
    crashed.write_status(state="running", pid=dead_pid())
    assert active_run() is None
    live = create_run(config(tmp_path), name="live")
    live.write_status(state="running", **this_process())
    assert active_run().path == live.path


def test_stop_run_writes_the_request_only_for_live_runs(data_dir, tmp_path):
    live = create_run(config(tmp_path), name="live")
    live.write_status(state="running", **this_process())
    assert "stop requested" in stop_run(live)
    assert live.stop_requested()

    done = create_run(config(tmp_path), name="done")
    done.write_status(state="finished")
    assert "not running" in stop_run(done)
    assert not done.stop_requested()

    dead = create_run(config(tmp_path), name="dead")
    dead.write_status(state="running", pid=dead_pid())
    assert "not running (failed)" in stop_run(dead)
    assert not dead.stop_requested()


# --- the queue: one training job per GPU -------------------------------------------------------

@pytest.fixture
def spawned(monkeypatch):
    """Record the processes the runner would start instead of training: these tests are about the
    queue's bookkeeping (test_process starts real ones)."""
    started = []

    def fake_spawn(run, resume=False):
        started.append((run.name, resume))
        run.write_status(state="running", **this_process())

    monkeypatch.setattr(runner_module, "spawn", fake_spawn)
    return started


def test_a_start_while_a_run_trains_is_queued_then_started_when_it_ends(data_dir, tmp_path, spawned):
    first = start_run(config(tmp_path), name="first")
    second = start_run(config(tmp_path), name="second")
    third = start_run(config(tmp_path), name="third")
    assert spawned == [(first.name, False)]
    assert [r.name for r in queued_runs()] == [second.name, third.name]
    assert second.read_status()["state"] == "queued" and active_run().path == first.path
    assert start_next() is None  # the GPU is still taken
    first.write_status(state="finished")
    assert start_next().path == second.path
    assert spawned[-1] == (second.name, False) and [r.name for r in queued_runs()] == [third.name]


def test_queue_reorder_and_cancel(data_dir, tmp_path, spawned):
    start_run(config(tmp_path), name="busy")
    a, b, c = (start_run(config(tmp_path), name=n) for n in ("a", "b", "c"))
    assert "number 1" in move_queued(c, -5)
    assert [r.name for r in queued_runs()] == [c.name, a.name, b.name]
    move_queued(c, 1)
    assert [r.name for r in queued_runs()] == [a.name, c.name, b.name]
    assert "taken out" in stop_run(a)  # Stop on a queued run cancels it
    assert a.read_status()["state"] == "stopped"
    assert "not in the queue" in cancel_queued(a)
    assert [r.name for r in queued_runs()] == [c.name, b.name]


def test_a_dead_active_run_does_not_block_the_queue(data_dir, tmp_path, spawned):
    crashed = start_run(config(tmp_path), name="crashed")
    waiting = start_run(config(tmp_path), name="waiting")
    crashed.write_status(pid=dead_pid())  # killed -9: it never got to start the next run
    assert start_next().path == waiting.path


def test_queue_file_survives_garbage(data_dir, tmp_path, spawned):
    (data_dir / "runs").mkdir(parents=True)
    (data_dir / "runs" / "queue.json").write_text('[{"name": "../../etc"}, 3, "x", {"nope": 1}')
    assert queued_runs() == []
    (data_dir / "runs" / "queue.json").write_text('[{"name": "../../etc"}, 3, "x", {"nope": 1}]')
    assert queued_runs() == []  # an entry that is not a run name is never joined into a path


def test_resume_run_refuses_live_and_finished_runs(data_dir, tmp_path, spawned):
    live = start_run(config(tmp_path), name="live")
    with pytest.raises(RunnerError, match="only a stopped or failed run"):
        resume_run(live)
    live.write_status(state="finished")
    with pytest.raises(RunnerError, match="has finished"):
        resume_run(live)
    live.write_status(state="stopped")
    assert "from the start" in resume_run(live)
    assert spawned[-1] == (live.name, True)


def test_delete_run_removes_only_a_run_that_is_not_training(data_dir, tmp_path, spawned):
    live = start_run(config(tmp_path), name="live")
    with pytest.raises(RunnerError, match="stop it before deleting"):
        delete_run(live)
    queued = start_run(config(tmp_path), name="queued")
    assert "deleted" in delete_run(queued)
    assert not queued.path.exists() and queued_runs() == []
    outside = RunDir(tmp_path / "elsewhere")
    outside.path.mkdir()
    (outside.path / "config.yaml").write_text("model: embedded\n")
    with pytest.raises(RunnerError, match="refusing to delete"):
        delete_run(outside)
    assert outside.path.exists()
