"""The runs folder (runs/ in the data directory): which runs there are, which one holds the GPU,
the queue of runs waiting for it, and the lock that every check-and-act on runs holds.

The queue is a file (runs/queue.json, a list of {"name", "resume"}) rather than memory, so every
browser tab, a restarted UI and the training processes themselves see and change the same queue.
engine/runner.py starts, queues and stops runs with these.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from filelock import FileLock  # cross-platform file lock (a dependency of huggingface_hub)

from engine.paths import runs_dir
from engine.rundir import RunDir, replace_atomically

ACTIVE_STATES = ("running", "stopping")  # states in which a run's process holds the GPU
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunnerError(RuntimeError):
    """A run cannot be started or found; the message says why."""


def list_runs() -> list[RunDir]:
    """All runs, newest first."""
    if not runs_dir().is_dir():
        return []
    runs = [RunDir(p) for p in runs_dir().iterdir() if p.is_dir() and RunDir(p).is_run()]
    return sorted(runs, key=lambda r: r.name, reverse=True)


def get_run(name: str) -> RunDir:
    # Names come from the UI: never join a path a person typed without checking it.
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RunnerError(f"'{name}' is not a run name")
    run = RunDir(runs_dir() / name)
    if not run.is_run():
        raise RunnerError(f"run '{name}' not found in {runs_dir()}")
    return run


def in_runs_folder(run: RunDir) -> bool:
    return run.path.resolve().parent == runs_dir().resolve()


def is_active(run: RunDir) -> bool:
    return run.read_status().get("state") in ACTIVE_STATES


def active_run() -> RunDir | None:
    """The run of runs/ holding the GPU (a queued run waits without holding it)."""
    return next((r for r in list_runs() if is_active(r)), None)


def gpu_holder() -> RunDir | None:
    """The run whose process holds the GPU: one of runs/, or one trained from the command line.
    One run trains at a time, so a run on several GPUs (or processes) holds all of them."""
    return active_run() or next((r for r in cli_runs() if is_active(r)), None)


# --- the queue ----------------------------------------------------------------------------------

def queue_lock() -> FileLock:
    runs_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(runs_dir() / ".queue.lock"), timeout=30)


def read_queue() -> list[dict]:
    try:
        entries = json.loads(_queue_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)
            and _NAME.fullmatch(e["name"])] if isinstance(entries, list) else []


def write_queue(entries: list[dict]) -> None:
    replace_atomically(_queue_path(), json.dumps(entries, indent=1))


def queued_runs() -> list[RunDir]:
    return [RunDir(runs_dir() / entry["name"]) for entry in read_queue()]


def move_queued(run: RunDir, offset: int) -> str:
    """Move a queued run `offset` places (negative = sooner)."""
    with queue_lock():
        queue = read_queue()
        names = [entry["name"] for entry in queue]
        if run.name not in names:
            return f"run {run.name} is not in the queue"
        old = names.index(run.name)
        new = min(max(old + offset, 0), len(queue) - 1)
        queue.insert(new, queue.pop(old))
        write_queue(queue)
    return f"run {run.name} is now number {new + 1} in the queue"


def _queue_path() -> Path:
    return runs_dir() / "queue.json"


# --- runs trained from the command line outside runs/ ------------------------------------------
# `python -m engine train --out anywhere` in the foreground: not in the run list, but holding the
# GPU all the same, so the queue waits for them (runs/cli-runs.json, their folders).

def cli_runs() -> list[RunDir]:
    try:
        paths = json.loads(_cli_runs_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [RunDir(p) for p in paths if isinstance(p, str)] if isinstance(paths, list) else []


def write_cli_runs(runs: list[RunDir]) -> None:
    """Record these, keeping only those still training (a killed one never said it ended)."""
    live = {str(run.path.resolve()) for run in runs if is_active(run)}
    if live or _cli_runs_path().exists():
        replace_atomically(_cli_runs_path(), json.dumps(sorted(live), indent=1))


def _cli_runs_path() -> Path:
    return runs_dir() / "cli-runs.json"
