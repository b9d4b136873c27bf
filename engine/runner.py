"""The job runner: starts each training run as its own process and finds runs again later.

The UI calls these functions; from the moment a run is spawned, the UI and the training process
share nothing but the run directory, so a closed tab or a restarted UI loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock  # cross-platform file lock (a dependency of huggingface_hub)

from engine.config import ConfigError, RunConfig
from engine.hardware import Gpu, pin_env, run_gpu
from engine.paths import PROJECT_DIR, data_dir, runs_dir
from engine.rundir import LIVE_STATES, RunDir, process_created, replace_atomically

ACTIVE_STATES = ("running", "stopping")  # states in which a run's process holds the GPU
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunnerError(RuntimeError):
    """A run cannot be started or found; the message says why."""


def create_run(cfg: RunConfig, name: str = "", parent: Path | None = None) -> RunDir:
    """A new run directory holding the resolved config and a 'queued' status."""
    cfg.validate()
    parent = Path(parent) if parent else runs_dir()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    run_id = time.strftime("%Y%m%d-%H%M%S") + (f"-{slug}" if slug else "")
    path = parent / run_id
    suffix = 1
    while path.exists():
        suffix += 1
        path = parent / f"{run_id}-{suffix}"
    path.mkdir(parents=True)
    run = RunDir(path)
    cfg.save(run.config_path)
    run.write_status(state="queued", step=0, total_steps=None, message="waiting to start",
                     created=time.time())
    return run


def start_run(cfg: RunConfig, name: str = "") -> RunDir:
    """Create a run and start it now, or queue it behind the run that holds the GPU."""
    gpu = _gpu_for(cfg)  # first: a GPU that does not exist leaves no run folder behind
    run = create_run(cfg, name)
    _unload_chat_for(run, gpu)
    _start_or_queue(run, resume=False)
    return run


def _gpu_for(cfg: RunConfig) -> Gpu | None:
    """The GPU a run with this config trains on, as things stand now; None on the CPU."""
    try:
        return None if cfg.device == "cpu" else run_gpu(cfg.gpu)
    except ConfigError as exc:  # e.g. the GPU it names is gone: another machine, a card removed
        raise RunnerError(str(exc)) from None


def _unload_chat_for(run: RunDir, gpu: Gpu | None) -> str:
    """Unload this process's chat model when the run will train on the GPU it is on, so training
    gets that memory, and note it in the run's status; the note, or '' when nothing was unloaded.
    Also when the run is queued: another process starts it later, and that one cannot free it."""
    from engine import chat

    if gpu is None or chat.shared_gpu_index() != gpu.index:
        return ""
    label = chat.unload_shared()
    if label is None:
        return ""
    note = f"the chat model ({label}) was unloaded to free GPU {gpu.index} for training"
    run.write_status(chat_unloaded=note)
    return note


def ensure_resumable(run: RunDir) -> None:
    """Raise unless the run is stopped or failed (a queued or training run is still on its way)."""
    state = run.read_status().get("state")
    if state in LIVE_STATES:
        raise RunnerError(f"run {run.name} is {state}: only a stopped or failed run can be resumed")
    if state == "finished":
        raise RunnerError(f"run {run.name} has finished: start a new run to train further")


def resume_run(run: RunDir) -> str:
    """Continue a stopped or failed run from its last checkpoint (now, or after the active run)."""
    ensure_resumable(run)  # a clear answer before the chat model is unloaded for nothing
    checkpoint = run.latest_checkpoint()
    where = f"from {checkpoint.name}" if checkpoint else "from the start (it has no checkpoint yet)"
    note = _unload_chat_for(run, _gpu_for(RunConfig.load(run.config_path)))
    # Checked again under the queue lock: of two Resumes at once (a double click, two tabs) one
    # starts the run and the other is refused, never queued over the running run's status.
    started = _start_or_queue(run, resume=True, check=ensure_resumable)
    text = f"resuming run {run.name} {where}" if started else \
        f"run {run.name} will resume {where} when the active run ends (queued)"
    return text + (f"; {note}" if note else "")


def _start_or_queue(run: RunDir, resume: bool, check=None) -> bool:
    """Spawn the run now if the GPU is free, else queue it; check(run) first, under the lock."""
    with _queue_lock():
        if check is not None:
            check(run)
        if active_run() is None and not _read_queue():
            spawn(run, resume=resume)
            return True
        run.write_status(state="queued", pid=None, pid_created=None, queued=time.time(),
                         message="queued: starts when the run ahead of it ends", error="")
        _write_queue(_read_queue() + [{"name": run.name, "resume": resume}])
    start_next()  # the queue may have been waiting on a run that died without starting it
    return False


def _detached_popen_kwargs() -> dict:
    """Popen arguments that let the training process outlive the UI: Ctrl-C on the UI, or its
    closed console window, must not reach it (it stops through stop.request, never a signal)."""
    if sys.platform != "win32":
        return {"start_new_session": True}
    # A process group of its own: Ctrl-C in the UI's console is not delivered to it.
    # CREATE_NO_WINDOW: a console of its own, hidden, so closing the UI's window does not end it
    # and the console programs it starts (nvidia-smi, compilers) open no window. DETACHED_PROCESS
    # would survive too, but every console program it started would pop up a window of its own.
    # stdout still goes to train.log either way: Popen hands the file over explicitly.
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}


def spawn(run: RunDir, resume: bool = False) -> subprocess.Popen:
    # Clear an old stop request here, not in the trainer: a stop asked for while the new process
    # is still starting must not be lost.
    run.stop_path.unlink(missing_ok=True)
    env = dict(os.environ, QLS_DATA_DIR=str(data_dir()), PYTHONUNBUFFERED="1", **_pin_to_gpu(run))
    command = [sys.executable, "-m", "engine", "train", str(run.path), "--background"]
    if resume:
        command.append("--resume")
    with open(run.log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **_detached_popen_kwargs(),  # survives the UI process: Ctrl-C on it does not reach it
        )
    # "running" from the moment the process exists, so a second start sees the GPU as taken.
    try:
        created = process_created(process.pid)
    except Exception:  # noqa: BLE001 - it already ended before we could see it
        process.wait()
        if run.read_status().get("pid") != process.pid:  # it never wrote a status of its own
            tail = run.log_tail(5)
            message = (f"the training process ended at once (exit code {process.returncode}) "
                       "before it could report")
            run.write_status(state="failed", pid=None, message=message,
                             error=message + (f". Last log lines:\n{tail}" if tail else ""))
        return process
    run.write_status(state="running", pid=process.pid, pid_created=created,
                     message="starting the training process", error="")
    return process


def _pin_to_gpu(run: RunDir) -> dict[str, str]:
    """The child's environment for exactly the run's GPU (its gpu setting, or the one with the most
    free memory now), recorded in status.json for chat and the UI; nothing for a CPU run."""
    try:
        gpu = _gpu_for(RunConfig.load(run.config_path))
    except (ConfigError, RunnerError) as exc:
        run.write_status(state="failed", pid=None, message=str(exc), error=str(exc))
        raise RunnerError(f"run {run.name} cannot start: {exc}") from None
    run.write_status(gpu=gpu.index if gpu else None, gpu_name=gpu.name if gpu else "")
    return pin_env(gpu) if gpu else {}


# --- the queue: one training job per GPU ------------------------------------------------------
# A file (runs/queue.json, a list of {"name", "resume"}) rather than memory, so every browser tab,
# a restarted UI and the training process itself see and change the same queue. The training
# process starts the next entry when it ends, so the queue moves on with no UI open.

def queued_runs() -> list[RunDir]:
    return [RunDir(runs_dir() / entry["name"]) for entry in _read_queue()]


def start_next() -> RunDir | None:
    """Start the first queued run if the GPU is free; returns it, or None."""
    with _queue_lock():
        if active_run() is not None:
            return None
        queue = _read_queue()
        while queue:
            entry = queue.pop(0)
            run = RunDir(runs_dir() / entry["name"])
            if run.is_run() and run.read_status().get("state") == "queued":
                _write_queue(queue)
                spawn(run, resume=bool(entry.get("resume")))
                return run
        _write_queue(queue)
    return None


def cancel_queued(run: RunDir) -> str:
    with _queue_lock():
        queue = _read_queue()
        if run.name not in [entry["name"] for entry in queue]:
            return f"run {run.name} is not in the queue"
        _write_queue([entry for entry in queue if entry["name"] != run.name])
        run.write_status(state="stopped", message="cancelled while queued; nothing was trained")
    return f"run {run.name} taken out of the queue"


def move_queued(run: RunDir, offset: int) -> str:
    """Move a queued run `offset` places (negative = sooner)."""
    with _queue_lock():
        queue = _read_queue()
        names = [entry["name"] for entry in queue]
        if run.name not in names:
            return f"run {run.name} is not in the queue"
        old = names.index(run.name)
        new = min(max(old + offset, 0), len(queue) - 1)
        queue.insert(new, queue.pop(old))
        _write_queue(queue)
    return f"run {run.name} is now number {new + 1} in the queue"


def _queue_path() -> Path:
    return runs_dir() / "queue.json"


def _queue_lock() -> FileLock:
    runs_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(runs_dir() / ".queue.lock"), timeout=30)


def _read_queue() -> list[dict]:
    try:
        entries = json.loads(_queue_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)
            and _NAME.fullmatch(e["name"])] if isinstance(entries, list) else []


def _write_queue(entries: list[dict]) -> None:
    replace_atomically(_queue_path(), json.dumps(entries, indent=1))


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


def active_run() -> RunDir | None:
    """The run holding the GPU (a queued run waits without holding it)."""
    return next((r for r in list_runs() if r.read_status().get("state") in ACTIVE_STATES), None)


def delete_run(run: RunDir) -> str:
    """Remove a run's folder for good (the UI asks for confirmation first)."""
    if run.read_status().get("state") in ACTIVE_STATES:
        raise RunnerError(f"run {run.name} is training: stop it before deleting it")
    cancel_queued(run)
    # get_run() checked the name; this second check guards callers that built a RunDir themselves.
    if run.path.resolve().parent != runs_dir().resolve():
        raise RunnerError(f"{run.path} is not inside {runs_dir()}: refusing to delete it")
    shutil.rmtree(run.path)
    return f"run {run.name} deleted"


def stop_run(run: RunDir) -> str:
    state = run.read_status().get("state")
    if state == "queued":
        return cancel_queued(run)
    if state not in LIVE_STATES:
        return f"run {run.name} is not running ({state})"
    run.request_stop()
    return f"stop requested: run {run.name} saves its adapter and stops after the current step"
