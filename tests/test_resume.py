"""Resume: a run killed with SIGKILL mid-training continues from its last checkpoint, and its loss
curve matches an uninterrupted run of the same config step for step (adapter, optimizer, scheduler,
RNG and the position in the data all restored)."""

import os
import signal
import subprocess
import sys

import pytest

from engine import checkpoints
from engine.config import load_recipe
from engine.rundir import RunDir
from engine.runner import create_run, start_run
from engine.train import run_training
from progress import run_progress, wait_for, wait_while_moving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 6, 2


def tiny_config(facts_path):
    # The quick-test recipe cut to seconds per step: short rows, small batches, a few steps.
    return load_recipe("quick-test", data_path=str(facts_path), max_steps=STEPS, save_steps=SAVE_EVERY,
                       max_seq_len=48, micro_batch_size=2, lora_r=8, lora_alpha=16)


def run_command(args: list[str], run: RunDir, folder) -> subprocess.CompletedProcess:
    """`python -m engine ARGS`, waited for as long as the run it trains makes progress."""
    out, err = open(folder / "out.txt", "w+"), open(folder / "err.txt", "w+")  # pipes could fill up
    with out, err:
        process = subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT,
                                   env=dict(os.environ), stdout=out, stderr=err, text=True)
        wait_while_moving(lambda: process.poll() is not None, lambda: run_progress(run),
                          f"python -m engine {' '.join(args)}")
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())


def losses(run: RunDir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run.read_metrics() if m.get("loss") is not None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_model):
    """An uninterrupted run, and the same run killed with SIGKILL after its first checkpoint and
    resumed from the command line."""
    from facts import write_facts

    base = tmp_path_factory.mktemp("resume")
    facts = write_facts(base / "facts.jsonl")
    patch = pytest.MonkeyPatch()
    patch.setenv("QLS_DATA_DIR", str(base / "data"))
    try:
        reference = create_run(tiny_config(facts), name="uninterrupted")
        assert run_training(str(reference.path)) == "finished", reference.read_status()

        killed = start_run(tiny_config(facts), name="killed")
        status = wait_for(killed, lambda s: (s.get("step") or 0) > SAVE_EVERY or
                          s["state"] not in ("running", "queued"))
        assert status["state"] == "running", status
        os.kill(status["pid"], signal.SIGKILL)
        killed_status = wait_for(killed, lambda s: s["state"] == "failed")
        metrics_before = killed.read_metrics()
        resumed = run_command(["resume", str(killed.path)], killed, base)
        yield reference, killed, killed_status, metrics_before, resumed
    finally:
        patch.undo()


@pytest.mark.slow
def test_killed_run_reads_as_failed_and_keeps_a_complete_checkpoint(runs):
    _, killed, killed_status, metrics_before, _ = runs
    assert "ended without saying why" in killed_status["message"]
    steps_before = [m["step"] for m in metrics_before]
    assert steps_before[:SAVE_EVERY] == list(range(1, SAVE_EVERY + 1))  # the work before the kill


@pytest.mark.slow
def test_resume_continues_to_the_end_from_the_command_line(runs):
    _, killed, _, _, resumed = runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "checkpoint-" in resumed.stderr
    status = killed.read_status()
    assert status["state"] == "finished" and status["step"] == STEPS
    assert (killed.adapter_dir / "adapter_model.safetensors").is_file()
    latest = killed.latest_checkpoint()
    assert checkpoints.is_complete(latest) and checkpoints.step_of(latest) == STEPS


@pytest.mark.slow
def test_metrics_have_each_step_once_in_order_after_resume(runs):
    _, killed, _, _, _ = runs
    steps = [m["step"] for m in killed.read_metrics() if m.get("loss") is not None]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_resumed_loss_curve_matches_the_uninterrupted_run(runs):
    reference, killed, _, _, _ = runs
    expected, got = losses(reference), losses(killed)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        # Same data, same order, same optimizer state: equal up to float noise. A resume that
        # restarted the data or the optimizer differs by far more (losses here fall ~30% per step).
        assert got[step] == pytest.approx(expected[step], rel=0.02, abs=0.02), (step, expected, got)
