"""What went wrong in a training process, in words a person can act on.

Training ends in one of a few ways that are not bugs: the GPU runs out of memory, the disk fills
or the run folder is not writable. engine/train.py tells them from other errors with these
functions and puts the message into status.json.
"""

from __future__ import annotations

import errno
import os

from engine.config import RunConfig
from engine.rundir import RunDir


def is_out_of_memory(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def is_disk_problem(exc: Exception) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES,
                                                  errno.EROFS, errno.EPERM):
        return True
    # torch.save and safetensors report a failed write in their own words, not as OSError.
    text = str(exc)
    return any(words in text for words in ("No space left", "StorageFull", "file write failed",
                                           "Permission denied", "Read-only file system"))


def disk_message(run: RunDir, exc: Exception) -> str:
    last = run.latest_checkpoint()
    kept = (f"the last complete checkpoint ({last.name}) is intact" if last
            else "no checkpoint had been completed yet")
    reason = ("the disk is full" if "space" in str(exc).lower() or getattr(exc, "errno", None)
              in (errno.ENOSPC, errno.EDQUOT) else "the run folder is not writable")
    return (f"could not write to {run.path}: {reason} ({exc}). {kept[0].upper() + kept[1:]}. "
            "Free some space (or fix the folder's permissions), then resume the run")


def oom_message(run: RunDir, cfg: RunConfig, retries: int = 0) -> str:
    """Out of memory in a training step with no retry left."""
    step = run.read_status().get("step", 0)
    text = (f"GPU out of memory at step {step} with sequence length {cfg.max_seq_len} and "
            f"micro-batch {cfg.micro_batch_size}")
    if cfg.micro_batch_size > 1:
        text += (f", after {retries} retries with smaller micro-batches: set micro_batch_size to 1 "
                 f"(and grad_accum_steps {cfg.micro_batch_size}x higher), or lower max_seq_len to "
                 f"{cfg.max_seq_len // 2}")
    else:
        text += f", already the smallest: lower max_seq_len to {cfg.max_seq_len // 2}"
    return text + f", or LoRA rank (now {cfg.lora_r}), or pick a smaller model"


def model_too_big_message(cfg: RunConfig) -> str:
    """Out of memory while loading the model, before any step: a smaller batch cannot help."""
    from engine.catalog import CatalogError
    from engine.planner import detected_vram, model_shape, plan, stack_for

    free_gb, total_gb = detected_vram()
    try:
        shape = model_shape(cfg.model)
    except CatalogError:
        shape = None
    name = shape.name if shape else cfg.model
    text = (f"{name} does not fit in the GPU's memory: it ran out while loading the model, "
            "before training began.")
    if shape:
        need = plan(shape, cfg.max_seq_len, cfg.micro_batch_size, cfg.lora_r,
                    stack=stack_for(cfg.kernels, "cuda", cfg.optimizer)).total_gb
        text += f" This run needs about {need:.1f} GB by our estimate."
    if free_gb is not None:
        text += f" The GPU has {free_gb:.1f} GB free of {total_gb:.1f} GB"
        cap = os.environ.get("QLS_GPU_MEMORY_GB")
        text += f", and training may use {cap} GB of it (QLS_GPU_MEMORY_GB)." if cap else "."
    return text + (" Pick a smaller model, or close the other programs that use the GPU (games, "
                   "a browser, another training run), then start again")


def injected_faults(run: RunDir) -> list:
    """Test-only: QLS_TEST_FAIL_AT="oom:N" makes training step N raise a GPU out-of-memory error,
    once per run (a marker file in the run folder keeps the process that takes over from repeating
    it). It exists because a test cannot reach into a real training subprocess to cause an
    out-of-memory, and a CPU has no GPU memory to fill. Nothing but tests sets the variable."""
    spec = os.environ.get("QLS_TEST_FAIL_AT", "")
    if not spec.startswith("oom:"):
        return []
    import torch
    from transformers import TrainerCallback

    step, marker = int(spec[len("oom:"):]), run.path / "test-fault.fired"

    class OutOfMemoryAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step and not marker.exists():
                marker.write_text(spec)
                raise torch.OutOfMemoryError(f"CUDA out of memory (QLS_TEST_FAIL_AT={spec})")

    return [OutOfMemoryAt()]
