"""Each fault is caused for real (or injected exactly where it would arise) and the outcome checked:
a message a person can act on, and nothing lost beyond the work since the last checkpoint."""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from transformers import Trainer

from engine import checkpoints, runner
from engine.config import RunConfig, load_recipe
from engine.models import ModelError, explained
from engine.rundir import process_created
from engine.runner import create_run, queued_runs, start_run
from engine.faults import disk_message, is_disk_problem
from engine.train import run_training
from progress import run_progress, wait_for, wait_while_moving


def tiny(facts_file, **overrides) -> RunConfig:
    values = dict(data_path=str(facts_file), max_steps=3, save_steps=1, max_seq_len=48,
                  micro_batch_size=2, lora_r=8, lora_alpha=16, compute_dtype="fp32")
    values.update(overrides)
    return load_recipe("quick-test", **values)


def loss_steps(run) -> list[int]:
    return [m["step"] for m in run.read_metrics() if m.get("loss") is not None]


def fail_once_at(monkeypatch, method: str, step: int, action):
    """Wrap Trainer.<method> so that `action(trainer)` runs once, when global_step reaches `step`."""
    original = getattr(Trainer, method)
    fired = []

    def wrapped(self, *args, **kwargs):
        if self.state.global_step == step and not fired:
            fired.append(step)
            action(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, method, wrapped)
    return fired


# --- faults during training (slow: each trains a few steps of the embedded model) ----------------

def queue_behind(run, cfg):
    """A second run, queued because `run` holds the GPU (as this test process, until it trains)."""
    run.write_status(state="running", pid=os.getpid(), pid_created=process_created(os.getpid()))
    second = start_run(cfg, name="next")
    assert second.read_status()["state"] == "queued"
    return second


@pytest.mark.slow
def test_out_of_memory_hands_the_run_to_a_new_process(data_dir, facts_file, embedded_model,
                                                      monkeypatch, caplog):
    run = create_run(tiny(facts_file), name="oom")
    second = queue_behind(run, tiny(facts_file))

    def oom(trainer):
        run.request_stop()  # a Stop pressed while the run is being handed over
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fired = fail_once_at(monkeypatch, "training_step", 2, oom)  # in the forward of step 3
    # The new training process's command is recorded; an idle process stands in for it.
    commands, real_popen = [], subprocess.Popen

    def popen(command, **kwargs):
        if command[1:4] == ["-m", "engine", "train"]:
            commands.append(command)
            command = [sys.executable, "-c", "import time; time.sleep(600)"]
        return real_popen(command, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    started_next = []
    monkeypatch.setattr(runner, "start_next", lambda: started_next.append(1))
    with caplog.at_level(logging.WARNING, logger="engine.train"):
        assert run_training(str(run.path)) == "retrying", run.read_status()
    runner.after_training(run, "retrying")  # what `python -m engine train` does next
    assert fired == [2]
    assert commands == [[sys.executable, "-m", "engine", "train", str(run.path.resolve()),
                         "--background", "--resume"]]
    status = run.read_status()
    # Still running, now as the new process, which waits for this one to end before loading.
    assert status["state"] == "running" and status["pid"] not in (None, os.getpid())
    assert status["predecessor_pid"] == os.getpid()
    assert len(status["notes"]) == 1 and "micro-batch 2" in status["notes"][0]
    assert "micro-batch 1 and gradient accumulation 2" in status["notes"][0]
    assert "from checkpoint-2" in status["notes"][0]  # only the step in flight is redone
    assert any("out of memory" in r.getMessage() for r in caplog.records)  # in the run's log
    saved = RunConfig.load(run.config_path)
    assert (saved.micro_batch_size, saved.grad_accum_steps) == (1, 2)  # effective batch kept: 2
    assert loss_steps(run) == [1, 2]
    assert run.stop_requested()  # the new process sees the Stop and honours it
    assert started_next == [] and second.read_status()["state"] == "queued"
    assert [r.name for r in queued_runs()] == [second.name]


@pytest.mark.slow
def test_out_of_memory_in_a_real_process_is_finished_by_its_successor(data_dir, facts_file,
                                                                     embedded_model, monkeypatch):
    monkeypatch.setenv("QLS_TEST_FAIL_AT", "oom:2")  # the training process raises it in step 2
    cfg = tiny(facts_file, max_steps=2)
    run = start_run(cfg, name="oom")
    first = wait_for(run, lambda s: s.get("pid"))["pid"]
    second = start_run(cfg, name="next")

    def finished():
        # Read the queued run first: once it starts, the run ahead of it must already be over.
        next_state, status = second.read_status()["state"], run.read_status()
        if next_state != "queued":
            assert status["state"] == "finished", "the GPU was handed on before the run ended"
        return status if status["state"] not in ("running", "stopping") else None

    status = wait_while_moving(finished, lambda: run_progress(run), "the successor to finish")
    assert status["state"] == "finished", (status, run.log_tail(30))
    assert status["pid"] != first and "after 1 out-of-memory retry" in status["message"]
    assert len(status["notes"]) == 1 and "from checkpoint-1" in status["notes"][0]
    assert RunConfig.load(run.config_path).micro_batch_size == 1
    assert loss_steps(run) == [1, 2]
    assert f"taking the run over from process {first}" in run.log_path.read_text()
    started = wait_for(second, lambda s: s["state"] != "queued")
    os.kill(started["pid"], signal.SIGKILL)  # its own training is not this test's subject


def test_out_of_memory_retries_are_capped(data_dir, facts_file, monkeypatch):
    from engine.train import MAX_OOM_RETRIES, _retry_with_half_batch

    monkeypatch.setattr(runner, "spawn", lambda *a, **k: pytest.fail("retried once too often"))
    cfg = tiny(facts_file, micro_batch_size=4)
    run = create_run(cfg, name="capped")
    run.write_status(state="running", step=7, notes=["an earlier retry"] * MAX_OOM_RETRIES)
    assert _retry_with_half_batch(run, cfg) == "failed"
    message = run.read_status()["message"]
    assert f"micro-batch 4, after {MAX_OOM_RETRIES} retries" in message and "step 7" in message
    assert "set micro_batch_size to 1" in message
    assert RunConfig.load(run.config_path).micro_batch_size == 4  # not halved once more


def test_out_of_memory_while_loading_fails_at_once(data_dir, facts_file, embedded_model,
                                                   monkeypatch):
    def load(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("engine.train.load_quantized_model", load)
    monkeypatch.setattr(runner, "spawn", lambda *a, **k: pytest.fail("retried: no batch size fits"))
    run = create_run(tiny(facts_file), name="big")
    assert run_training(str(run.path)) == "failed"
    status = run.read_status()
    for words in ("SmolLM2 135M", "does not fit in the GPU's memory", "while loading",
                  "needs about 0.", "smaller model", "close the other programs"):
        assert words in status["message"], status["message"]
    assert status["notes"] == [] and RunConfig.load(run.config_path).micro_batch_size == 2


@pytest.mark.parametrize("value", ["4", "lots"])
def test_gpu_memory_cap_is_ignored_on_cpu(data_dir, facts_file, embedded_model, monkeypatch,
                                          caplog, value):
    monkeypatch.setenv("QLS_GPU_MEMORY_GB", value)
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        raise ModelError("loading is not this test's subject")

    monkeypatch.setattr("engine.train.load_quantized_model", load)
    run = create_run(tiny(facts_file, device="cpu"), name="cap")
    with caplog.at_level(logging.INFO, logger="engine.train"):
        assert run_training(str(run.path)) == "failed"
    if value == "lots":  # a typo is refused in words, before anything loads
        assert "QLS_GPU_MEMORY_GB is 'lots'" in run.read_status()["message"] and not loads
    else:
        assert "QLS_GPU_MEMORY_GB=4 ignored: training runs on the cpu" in caplog.text
        assert len(loads) == 1


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, facts_file, embedded_model,
                                                           monkeypatch):
    def poison(trainer):
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_A" in name:
                    param.fill_(float("nan"))

    fail_once_at(monkeypatch, "training_step", 2, poison)
    run = create_run(tiny(facts_file, max_steps=4), name="nan")
    assert run_training(str(run.path)) == "failed"
    status = run.read_status()
    assert "loss became nan at step 3" in status["message"]
    assert "checkpoint-2" in status["message"] and "lower the learning rate" in status["message"]
    assert run.latest_checkpoint().name == "checkpoint-2"
    assert [p.name for p in checkpoints.all_checkpoints(run.checkpoints_dir)][-1] == "checkpoint-2"
    assert not run.adapter_dir.exists()  # no adapter of NaN weights to chat with
    assert loss_steps(run) == [1, 2]  # the NaN step is not drawn as a point


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(data_dir, facts_file,
                                                                     embedded_model, monkeypatch):
    def disk_full(trainer):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Trainer writes the adapter and optimizer of checkpoint-2 first; the RNG state then fails.
    fail_once_at(monkeypatch, "_save_rng_state", 2, disk_full)
    run = create_run(tiny(facts_file), name="disk")
    assert run_training(str(run.path)) == "failed"
    message = run.read_status()["message"]
    assert "the disk is full" in message and "checkpoint-1" in message and "resume the run" in message
    half_written = run.checkpoints_dir / "checkpoint-2"
    assert half_written.is_dir() and not checkpoints.is_complete(half_written)
    assert run.latest_checkpoint().name == "checkpoint-1"

    monkeypatch.undo()  # space freed: Resume
    assert run_training(str(run.path), resume=True) == "finished", run.read_status()
    assert loss_steps(run) == [1, 2, 3]
    assert [p.name for p in checkpoints.all_checkpoints(run.checkpoints_dir)] == \
        ["checkpoint-2", "checkpoint-3"]  # all complete; the torn one was cleared first
    assert all(checkpoints.is_complete(p) for p in checkpoints.all_checkpoints(run.checkpoints_dir))


# --- bad inputs at start: the run fails at once, in words -----------------------------------------

def fails_with(cfg: RunConfig, *words) -> str:
    run = create_run(cfg, name="bad")
    assert run_training(str(run.path)) == "failed"
    status = run.read_status()
    for word in words:
        assert word in status["message"], status["message"]
    assert "Traceback" not in status["message"]
    return status["message"]


def test_dataset_file_that_disappeared(data_dir, facts_file, embedded_model):
    cfg = tiny(facts_file)
    facts_file.unlink()
    fails_with(cfg, str(facts_file))


def test_dataset_file_that_is_corrupt(data_dir, facts_file, embedded_model):
    facts_file.write_bytes(b"\x00\xff\xfe garbage \x80\n{not json\n")
    fails_with(tiny(facts_file), "line")


def test_model_folder_that_disappeared(data_dir, facts_file, embedded_model, tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(embedded_model, folder)
    cfg = tiny(facts_file, model=str(folder))
    shutil.rmtree(folder)
    fails_with(cfg, "my-model", "not found")


@pytest.mark.parametrize(("damage", "words"), [
    ("weights", ("damaged or incomplete", "download the model again")),
    ("config", ("config.json", "not a valid JSON")),
    ("no-safetensors", ("no .safetensors weights",)),
])
def test_model_folder_that_is_corrupt(data_dir, facts_file, embedded_model, tmp_path, damage, words):
    folder = tmp_path / "my-model"
    shutil.copytree(embedded_model, folder)
    weights = folder / "model.safetensors"
    if damage == "weights":
        weights.write_bytes(weights.read_bytes()[:4096])  # a download cut short
    elif damage == "config":
        (folder / "config.json").write_text("{ cut short")
    else:
        weights.rename(folder / "pytorch_model.bin")  # pickle only: refused, not loaded
    fails_with(tiny(facts_file, model=str(folder)), *words)


def test_model_that_cannot_be_downloaded_offline(data_dir, facts_file, embedded_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails_with(tiny(facts_file, model="some-org/some-model"), "no connection to the Hugging Face Hub")


def hub_error(kind, status: int):
    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x/y"))
    return kind(f"{status} error", response=response)


@pytest.mark.parametrize(("error", "words"), [
    (hub_error(GatedRepoError, 403), ("is gated", "accept its licence", "hf auth login")),
    (hub_error(RepositoryNotFoundError, 404), ("does not exist on the Hugging Face Hub",)),
    (hub_error(HfHubHTTPError, 401), ("needs a Hugging Face token",)),
    (OSError("org/name is not a local folder and is not a valid model identifier"), ("does not exist",)),
])
def test_hub_errors_are_explained(error, words):
    with pytest.raises(ModelError) as caught:
        with explained("org/name"):
            raise error
    for word in words:
        assert word in str(caught.value)


def test_unwritable_run_dir_is_explained(data_dir, tmp_path):
    run = create_run(RunConfig(data_path=str(tmp_path / "x.jsonl")), name="ro")
    exc = PermissionError(errno.EACCES, "Permission denied")
    assert is_disk_problem(exc)
    assert is_disk_problem(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert not is_disk_problem(ValueError("shapes do not match"))
    message = disk_message(run, exc)
    assert "not writable" in message and "No checkpoint had been completed yet" in message
