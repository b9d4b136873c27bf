"""The job runner: starts each training run as its own process and finds runs again later.

The UI and the command line call these functions; from the moment a run is spawned, the UI and the
training process share nothing but the run directory, so a closed tab or a restarted UI loses
nothing. What the runner does with a run (queued it, started pid N on GPU g, could not start it,
cancelled it) goes into the run's launch.json; status.json is the training process's alone, and
RunDir.read_status shows the two as one. Every check-and-act (start, resume, stop, cancel,
delete, start the next) holds the queue lock, so two clicks, two tabs or two processes never both
act on what they saw; launch.json is written under that lock, except by the one process that owns
the run at that moment (the one creating it, the one training it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from engine.config import ConfigError, RunConfig
from engine import hardware
from engine.hardware import Gpu, pick_gpu, pin_env, run_gpu, visible_gpus
from engine.paths import PROJECT_DIR, data_dir, runs_dir
from engine.rundir import LIVE_STATES, RETRYING, RunDir, process_created
from engine.runs import (  # noqa: F401 - the UI finds runs and the queue here too
    ACTIVE_STATES,
    RunnerError,
    active_run,
    cli_runs,
    get_run,
    gpu_holder,
    in_runs_folder,
    is_active,
    list_runs,
    move_queued,
    queue_lock,
    queued_runs,
    read_queue,
    write_cli_runs,
    write_queue,
)

log = logging.getLogger("engine.runner")


def create_run(cfg: RunConfig, name: str = "", parent: Path | None = None,
               path: Path | None = None) -> RunDir:
    """A new run directory holding the resolved config, waiting to start: `path` when given (a
    new or empty folder), else a folder named after the time and `name` under `parent` (runs/)."""
    cfg.validate()
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        run = RunDir(path)
    else:
        run = RunDir(_new_folder(Path(parent) if parent else runs_dir(), name))
    cfg.save(run.config_path)
    run.write_launch(launch=0, state="queued", message="waiting to start", created=time.time())
    return run


def _new_folder(parent: Path, name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    run_id = time.strftime("%Y%m%d-%H%M%S") + (f"-{slug}" if slug else "")
    parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(1, 10_000):
        path = parent / (run_id if suffix == 1 else f"{run_id}-{suffix}")
        try:
            path.mkdir()  # not exists() then mkdir(): two starts in the same second get two folders
            return path
        except FileExistsError:
            continue
    raise RunnerError(f"no free run folder name for {run_id} in {parent}")


def start_run(cfg: RunConfig, name: str = "") -> RunDir:
    """Create a run and start it now, or queue it behind the run that holds the GPU."""
    gpus = _gpus_for(cfg)  # first: a GPU that does not exist leaves no run folder behind
    run = create_run(cfg, name)
    _start_or_queue(run, resume=False, chat_note=_unload_chat_for(gpus))
    return run


def _gpus_for(cfg: RunConfig) -> list[Gpu]:
    """The GPUs a run with this config trains on, one per process, as things stand now; [] on
    the CPU (a CPU run on several processes too)."""
    try:
        return run_gpus(cfg)
    except ConfigError as exc:  # e.g. the GPU it names is gone: another machine, a card removed
        raise RunnerError(str(exc)) from None


def run_gpus(cfg: RunConfig) -> list[Gpu]:
    """gpu (one GPU), or gpus, or the num_processes GPUs with the most free memory; ConfigError
    when this machine lacks them."""
    listed, processes = cfg.gpu_list(), cfg.processes_here()
    if cfg.device == "cpu":
        return []
    if processes == 1:
        gpu = run_gpu(listed[0] if listed else cfg.gpu)
        return [gpu] if gpu else []
    usable = visible_gpus(hardware.detect_gpus()[0])
    if not usable:
        if listed or cfg.device == "cuda":
            raise ConfigError(f"{processes} processes on GPUs were asked for, but this machine has "
                              "no GPU that PyTorch can use: clear gpus and set device to cpu (or "
                              "auto) to train on the CPU")
        return []  # device auto on a machine without GPUs: the processes share the CPU (gloo)
    if listed:
        return [pick_gpu(usable, index) for index in listed]
    if len(usable) < processes:
        raise ConfigError(f"{processes} processes need {processes} GPUs, one each, and this "
                          f"machine has {len(usable)}: set num_processes to {len(usable)} or fewer")
    chosen = sorted(usable, key=lambda gpu: gpu.free_gb, reverse=True)[:processes]
    return sorted(chosen, key=lambda gpu: gpu.index)


def pin_env_for(gpus: list[Gpu]) -> dict[str, str]:
    """The environment that shows a training process (and the processes it starts) exactly the
    run's GPUs; nothing for a CPU run."""
    if len(gpus) <= 1:
        return pin_env(gpus[0]) if gpus else {}
    return {**pin_env(gpus[0]), "CUDA_VISIBLE_DEVICES": ",".join(str(gpu.index) for gpu in gpus)}


def _unload_chat_for(gpus: list[Gpu]) -> str:
    """Unload this process's chat model when the run will train on the GPU it is on, so training
    gets that memory; the note for the run's record, or '' when nothing was unloaded. Also when
    the run is queued: another process starts it later, and that one cannot free it."""
    from engine import chat

    index = chat.shared_gpu_index()
    if index is None or index not in [gpu.index for gpu in gpus]:
        return ""
    label = chat.unload_shared()
    return "" if label is None else \
        f"the chat model ({label}) was unloaded to free GPU {index} for training"


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
    note = _unload_chat_for(_gpus_for(RunConfig.load(run.config_path)))
    # Checked again under the queue lock: of two Resumes at once (a double click, two tabs) one
    # starts the run and the other is refused, never queued over the running run's status.
    started = _start_or_queue(run, resume=True, check=ensure_resumable, chat_note=note)
    text = f"resuming run {run.name} {where}" if started else \
        f"run {run.name} will resume {where} when the active run ends (queued)"
    return text + (f"; {note}" if note else "")


def _start_or_queue(run: RunDir, resume: bool, check=None, chat_note: str = "") -> bool:
    """Spawn the run now if the GPU is free, else queue it; check(run) first, under the lock."""
    with queue_lock():
        if check is not None:
            check(run)
        if chat_note:
            run.write_launch(chat_unloaded=chat_note)
        if gpu_holder() is None and not read_queue():
            spawn(run, resume=resume)
            return True
        _new_launch(run, state="queued", queued=time.time(),
                    message="queued: starts when the run ahead of it ends")
        write_queue(read_queue() + [{"name": run.name, "resume": resume}])
    start_next()  # the queue may have been waiting on a run that died without starting it
    return False


def _new_launch(run: RunDir, **fields) -> None:
    """Record a new launch of the run (queued, or a process starting), newer than any status the
    training process wrote before: until a process reports on it, this record is the run's state."""
    fresh = dict(pid=None, pid_created=None, error="", predecessor_pid=None,
                 predecessor_created=None)
    run.write_launch(launch=run.latest_launch() + 1, **{**fresh, **fields})


# --- the training process ---------------------------------------------------------------------

def detached_popen_kwargs() -> dict:
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


def spawn(run: RunDir, resume: bool = False, predecessor: int | None = None) -> subprocess.Popen:
    """Start the run's training process (the caller holds the queue lock and found the GPU free).
    `predecessor`: the pid of the process handing the run over after a GPU out-of-memory; the new
    process waits for it to exit before it loads anything."""
    if predecessor is None:
        # Cleared here, not in the trainer: a stop asked for while the new process is still
        # starting must not be lost. A hand-over keeps it: that Stop is meant for the new process.
        run.stop_path.unlink(missing_ok=True)
    handing_over = {"predecessor_pid": predecessor,
                    "predecessor_created": process_created(predecessor)} if predecessor else {}
    _new_launch(run, state="queued", message="starting the training process", **handing_over)
    env = dict(os.environ, QLS_DATA_DIR=str(data_dir()), PYTHONUNBUFFERED="1", **_pin_to_gpu(run))
    command = [sys.executable, "-m", "engine", "train", str(run.path), "--background"]
    if resume:
        command.append("--resume")
    try:
        with open(run.log_path, "ab") as log_file:
            process = subprocess.Popen(
                command, cwd=PROJECT_DIR, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **detached_popen_kwargs(),  # survives the UI: Ctrl-C on it does not reach it
            )
    except OSError as exc:
        _record_failure(run, f"the training process could not be started: {exc}")
        raise RunnerError(f"run {run.name} cannot start: {exc}") from None
    # "running" from the moment the process exists, so a second start sees the GPU as taken.
    try:
        created = process_created(process.pid)
    except Exception:  # noqa: BLE001 - it already ended before we could see it
        process.wait()
        # Shown only if it never reported on this launch: a status it wrote says why it ended.
        _record_failure(run, f"the training process ended at once (exit code {process.returncode}) "
                        "before it could report", run.log_tail(5))
        return process
    run.write_launch(state="running", pid=process.pid, pid_created=created,
                     message="starting the training process")
    return process


def _record_failure(run: RunDir, message: str, details: str = "") -> None:
    run.write_launch(state="failed", pid=None, pid_created=None, message=message,
                     error=message + (f". Last log lines:\n{details}" if details else ""))


def _pin_to_gpu(run: RunDir) -> dict[str, str]:
    """The child's environment for exactly the run's GPUs (its gpu or gpus setting, or those with
    the most free memory now), recorded for chat and the UI; nothing for a CPU run."""
    try:
        gpus = _gpus_for(RunConfig.load(run.config_path))
    except (ConfigError, RunnerError) as exc:
        _record_failure(run, str(exc))
        raise RunnerError(f"run {run.name} cannot start: {exc}") from None
    record_gpus(run, gpus)
    return pin_env_for(gpus)


def record_gpu(run: RunDir, gpu: Gpu | None) -> None:
    """Record the GPU a run's process trains on (None: the CPU). Outside the lock only for a run
    this process trains itself: nobody else writes the record of a run that is training."""
    record_gpus(run, [gpu] if gpu else [])


def record_gpus(run: RunDir, gpus: list[Gpu]) -> None:
    """record_gpu for a run on one GPU or several (gpu: the first; gpus: all of them)."""
    first = gpus[0] if gpus else None
    run.write_launch(gpu=first.index if first else None, gpu_name=first.name if first else "",
                     gpus=[gpu.index for gpu in gpus])


def start_here(run: RunDir, resume: bool = False) -> None:
    """Claim the GPU for a run this process trains itself (`python -m engine train` in the
    foreground). Refused, never queued, while another of our runs trains: a terminal that waits
    an unknown time for someone else's run is worse than a clear answer now."""
    with queue_lock():
        if resume:
            ensure_resumable(run)
        elif is_active(run):
            raise RunnerError(f"run {run.name} is already training")
        ensure_gpu_free()
        if in_runs_folder(run):  # started by hand while queued: it must not start again later
            write_queue([entry for entry in read_queue() if entry["name"] != run.name])
        run.stop_path.unlink(missing_ok=True)  # an old stop request is not meant for this session
        pid = os.getpid()
        _new_launch(run, state="running", pid=pid, pid_created=process_created(pid),
                    message="starting the training process")
        if not in_runs_folder(run):  # the queue must see it: its runs wait until this one ends
            write_cli_runs([*cli_runs(), run])


def ensure_gpu_free() -> None:
    """Raise while one of our runs trains (asked again under the lock before a run starts)."""
    holder = gpu_holder()
    if holder is not None:
        raise RunnerError(f"run {holder.name} is training ({holder.path}), and one run trains "
                          "at a time: wait for it to end or stop it, then start this one again")


def after_training(run: RunDir, outcome: str) -> None:
    """In a training process, once the recipe returned: a run that ran out of GPU memory goes on
    in a fresh process; any other outcome frees the GPU, and the next queued run starts, so the
    queue moves on with no UI open."""
    if outcome == RETRYING and _hand_over(run):
        return  # the new process holds the GPU next: the queue waits for it
    try:
        with queue_lock():
            write_cli_runs([r for r in cli_runs() if r.path != run.path.resolve()])
        started = start_next()
    except Exception as exc:  # noqa: BLE001 - this run is over; whoever looks next moves the queue
        log.warning("could not start the next queued run: %s", exc)
        return
    if started is not None:
        log.info("started the next queued run: %s", started.name)


def _hand_over(run: RunDir) -> bool:
    """Start the process that goes on with the run after a GPU out-of-memory in this one; whether
    it now holds the run (else the run failed, saying why, and its last checkpoint is kept)."""
    with queue_lock():
        try:
            # absolute: the new process starts in the project folder, not in this one's
            successor = spawn(RunDir(run.path.resolve()), resume=True, predecessor=os.getpid())
        except RunnerError as exc:
            _record_failure(run, f"could not start a new training process for the retry ({exc}); "
                            "the last checkpoint is kept: resuming the run continues from it")
            return False
    log.info("the run goes on in a new training process (pid %d) once this one has exited",
             successor.pid)
    return is_active(run)


# --- the queue (engine/runs.py): one training job at a time ---------------------------------------
# The training process starts the next entry when it ends, so the queue moves on with no UI open.

def start_next() -> RunDir | None:
    """Start the first queued run if the GPU is free; returns it, or None."""
    with queue_lock():
        if gpu_holder() is not None:
            return None
        queue = read_queue()
        while queue:
            entry = queue.pop(0)
            run = RunDir(runs_dir() / entry["name"])
            if not (run.is_run() and run.read_status().get("state") == "queued"):
                continue
            write_queue(queue)
            try:
                spawn(run, resume=bool(entry.get("resume")))
            except RunnerError as exc:  # its record says why; the next in line gets the GPU
                log.warning("%s", exc)
                continue
            return run
        write_queue(queue)
    return None


def cancel_queued(run: RunDir) -> str:
    with queue_lock():
        return _cancel_queued(run)


def _cancel_queued(run: RunDir) -> str:
    queue = read_queue()
    if run.name not in [entry["name"] for entry in queue]:
        return f"run {run.name} is not in the queue"
    write_queue([entry for entry in queue if entry["name"] != run.name])
    run.write_launch(state="stopped", message="cancelled while queued; nothing was trained")
    return f"run {run.name} taken out of the queue"


# --- stopping and deleting runs -----------------------------------------------------------------

def delete_run(run: RunDir) -> str:
    """Remove a run's folder for good (the UI asks for confirmation first)."""
    # get_run() checked the name; this second check guards callers that built a RunDir themselves.
    if not in_runs_folder(run):
        raise RunnerError(f"{run.path} is not inside {runs_dir()}: refusing to delete it")
    with queue_lock():  # not started from the queue between the check and the removal
        if is_active(run):
            raise RunnerError(f"run {run.name} is training: stop it before deleting it")
        _cancel_queued(run)
        shutil.rmtree(run.path)
    return f"run {run.name} deleted"


def stop_run(run: RunDir) -> str:
    with queue_lock():  # a queued run is cancelled, not started from the queue in between
        state = run.read_status().get("state")
        if state == "queued":
            return _cancel_queued(run)
        if state not in LIVE_STATES:
            return f"run {run.name} is not running ({state})"
        run.request_stop()
    return f"stop requested: run {run.name} saves its adapter and stops after the current step"
