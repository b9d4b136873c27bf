"""What went wrong in a training process, in words a person can act on.

Training ends in one of a few ways that are not bugs: the GPU runs out of memory, the disk fills
or the run folder is not writable. engine/train.py tells them from other errors with these
functions and puts the message into status.json.
"""

from __future__ import annotations

import errno

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
            "Free some space (or fix the folder's permissions), then press Resume")


def oom_message(run: RunDir, cfg: RunConfig) -> str:
    step = run.read_status().get("step", 0)
    return (f"GPU out of memory at step {step} with sequence length {cfg.max_seq_len} and "
            f"micro-batch {cfg.micro_batch_size}, already the smallest: lower max_seq_len to "
            f"{cfg.max_seq_len // 2}, or LoRA rank (now {cfg.lora_r}), or pick a smaller model")
