"""The job runner: starts each training run as its own process and finds runs again later.

The UI calls these functions; from the moment a run is spawned, the UI and the training process
share nothing but the run directory, so a closed tab or a restarted UI loses nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from engine.config import RunConfig
from engine.paths import PROJECT_DIR, data_dir, runs_dir
from engine.rundir import LIVE_STATES, RunDir


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
    """Create a run and start its training process, one at a time."""
    active = active_run()
    if active is not None:
        raise RunnerError(f"run {active.name} is still training: stop it or wait for it to finish "
                          "(one run at a time, so runs do not fight over the GPU)")
    run = create_run(cfg, name)
    spawn(run)
    return run


def spawn(run: RunDir, resume: bool = False) -> subprocess.Popen:
    # Clear an old stop request here, not in the trainer: a stop asked for while the new process
    # is still starting must not be lost.
    run.stop_path.unlink(missing_ok=True)
    env = dict(os.environ, QLS_DATA_DIR=str(data_dir()), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "engine", "train", str(run.path), "--background"]
    if resume:
        command.append("--resume")
    with open(run.log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the UI process: Ctrl-C on the UI does not kill it
        )
    run.write_status(pid=process.pid)
    return process


def list_runs() -> list[RunDir]:
    """All runs, newest first."""
    if not runs_dir().is_dir():
        return []
    runs = [RunDir(p) for p in runs_dir().iterdir() if p.is_dir() and RunDir(p).is_run()]
    return sorted(runs, key=lambda r: r.name, reverse=True)


def get_run(name: str) -> RunDir:
    # Names come from the UI: never join a path a person typed without checking it.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise RunnerError(f"'{name}' is not a run name")
    run = RunDir(runs_dir() / name)
    if not run.is_run():
        raise RunnerError(f"run '{name}' not found in {runs_dir()}")
    return run


def active_run() -> RunDir | None:
    return next((r for r in list_runs() if r.read_status().get("state") in LIVE_STATES), None)


def stop_run(run: RunDir) -> str:
    state = run.read_status().get("state")
    if state not in LIVE_STATES:
        return f"run {run.name} is not running ({state})"
    run.request_stop()
    return f"stop requested: run {run.name} saves its adapter and stops after the current step"
