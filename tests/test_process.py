"""The training process, as the job runner starts it: stop saves the adapter, a killed process
reads as failed, and a second start waits in the queue until the first one ends."""

import os
import signal

import pytest

from engine.config import load_recipe
from app.train_tab import default_run
from engine.runner import active_run, queued_runs, start_run, stop_run
from progress import run_progress, wait_for, wait_while_moving


@pytest.mark.slow
def test_stop_saves_adapter_and_the_queued_run_starts_by_itself(data_dir, facts_file, embedded_model):
    cfg = load_recipe("quick-test", data_path=str(facts_file), epochs=50, save_steps=1000)
    run = start_run(cfg, name="stop me")
    wait_for(run, lambda s: (s.get("step") or 0) >= 2)
    # A restarted UI (or a second browser tab) finds the live run again from the files alone.
    assert active_run().path == run.path and default_run() == run.name
    second = start_run(cfg, name="second")  # one GPU: queued, not started
    assert second.read_status()["state"] == "queued"
    assert [r.name for r in queued_runs()] == [second.name]
    assert "stop requested" in stop_run(run)
    status = wait_for(run, lambda s: s["state"] in ("stopped", "failed", "finished"))
    assert status["state"] == "stopped", status
    assert status["step"] < status["total_steps"]  # it really stopped early
    # the compute dtype chosen for this machine, and why, in the status and in train.log
    assert status["compute_dtype"] in ("bfloat16", "float32") and status["compute_why"]
    assert f"compute {status['compute_why']}" in run.log_path.read_text()
    assert "computing with " in run.log_path.read_text()  # the CPU threads it chose, and why
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert (run.adapter_dir / "prompt_template.json").is_file()
    assert run.latest_checkpoint() is not None  # resumable, although save_steps was never reached
    assert [m["step"] for m in run.read_metrics() if m.get("loss") is not None][-1] == status["step"]
    # The stopped run's own process hands the GPU on after its status says stopped: no UI takes part.
    started = wait_for(second, lambda s: s["state"] != "queued")
    assert started["state"] == "running" and started["pid"] != status["pid"]
    assert queued_runs() == []
    # the first process logs the hand-over after spawning the second: wait while either moves
    wait_while_moving(lambda: "started the next queued run" in run.log_tail(10),
                      lambda: (run_progress(run), run_progress(second)), "the hand-over's log line")
    os.kill(started["pid"], signal.SIGKILL)  # its own training is not this test's subject


@pytest.mark.slow
def test_killed_process_reads_as_failed_with_log(data_dir, facts_file, embedded_model):
    cfg = load_recipe("quick-test", data_path=str(facts_file), epochs=50)
    run = start_run(cfg, name="kill me")
    status = wait_for(run, lambda s: (s.get("step") or 0) >= 1)
    os.kill(status["pid"], signal.SIGKILL)
    status = wait_for(run, lambda s: s["state"] == "failed")
    assert "ended without saying why" in status["message"]
    assert "step" in status["error"]  # the last log lines travel with the error
    assert active_run() is None  # a dead run no longer blocks new runs
