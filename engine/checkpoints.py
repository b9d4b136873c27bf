"""Resumable checkpoints that are either complete or absent.

transformers' Trainer writes checkpoint-N/ file by file (adapter, optimizer, scheduler, RNG, and
trainer_state.json last) straight into its final name, so a kill or a full disk mid-save leaves a
half-written folder that looks like the newest checkpoint. We add a marker file once every file
is on disk (fsynced), and resume only from marked folders; unmarked ones are removed before a
resume so they never count against the "keep the last few" limit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

MARKER = "checkpoint.complete"
PREFIX = "checkpoint-"
# What a resume needs; without any of these, the folder is not a checkpoint we can continue from.
REQUIRED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
# In a checkpoint of a sharded (FSDP) run, the folder its processes write together instead.
SHARDED = {"adapter_model.safetensors": "pytorch_model_fsdp_0", "optimizer.pt": "optimizer_0"}


def step_of(path: Path) -> int:
    tail = path.name[len(PREFIX):]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else -1


def all_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """checkpoint-N folders, complete or not, oldest step first."""
    if not Path(checkpoints_dir).is_dir():
        return []
    found = [p for p in Path(checkpoints_dir).iterdir() if p.is_dir() and step_of(p) >= 0]
    return sorted(found, key=step_of)


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest(checkpoints_dir: Path) -> Path | None:
    complete = [p for p in all_checkpoints(checkpoints_dir) if is_complete(p)]
    return complete[-1] if complete else None


def problem(path: Path, trainable_params=()) -> str:
    """Why a just-written checkpoint must not be resumed from, or '' when it is sound."""
    path = Path(path)
    for name in REQUIRED:
        file = path / name
        shards = path / SHARDED.get(name, name)
        if (not file.is_file() or file.stat().st_size == 0) and not \
                (shards.is_dir() and any(shards.iterdir())):
            return f"{name} is missing or empty"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    for param in trainable_params:
        local = param.to_local() if hasattr(param, "to_local") else param  # this process's shard
        if not bool(local.detach().isfinite().all()):
            return "the adapter weights are not finite (NaN/inf)"
    return ""


def mark_complete(path: Path) -> None:
    """Flush every file of the checkpoint to disk, then add the marker (itself written atomically)."""
    path = Path(path)
    entries = list(path.rglob("*"))  # a sharded checkpoint's folders too
    for file in entries:
        if file.is_file():
            # Opened for writing: Windows refuses to fsync a read-only handle (EBADF).
            with open(file, "r+b") as fh:
                os.fsync(fh.fileno())
    for folder in [path, *(entry for entry in entries if entry.is_dir())]:
        _fsync_dir(folder)  # the files' names are on disk before the marker is
    tmp = path / (MARKER + ".tmp")
    tmp.write_text("complete\n")
    os.replace(tmp, path / MARKER)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new and renamed names) to disk where the OS allows it: POSIX.
    Windows cannot open a folder with os.open."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (network shares) cannot fsync a folder; the files still are
    finally:
        os.close(fd)


def remove_incomplete(checkpoints_dir: Path) -> list[str]:
    removed = []
    for path in all_checkpoints(checkpoints_dir):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def finite(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))
