"""The run directory: the only channel between the UI and a training process.

Two files say how a run stands, each with one writer: status.json is the training process's own
report; launch.json is the job runner's record of what it did with the run (queued it, started a
process with this pid on this GPU, could not start one, cancelled it). `read_status` shows every
reader one merged status. Both are replaced atomically (write a temp file, then rename) so a
reader never sees half of one; metrics.jsonl is append-only with one whole line per write, so a
reader skips at most a line still being written. A stop is a file (`stop.request`) the trainer
polls each step, so nobody but the training process writes status.json.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil

from engine import checkpoints

STATES = ("queued", "running", "stopping", "finished", "failed", "stopped")
# In adapter/: the prompt template and base model a run trained with, so chat renders the same way.
TEMPLATE_FILE = "prompt_template.json"
LIVE_STATES = ("queued", "running", "stopping")
# What the recipe returns, instead of an end state, when a GPU out-of-memory asks for the run to go
# on in a fresh process with a smaller micro-batch (the job runner starts that process).
RETRYING = "retrying"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # Files of the contract
    config_path = property(lambda self: self.path / "config.yaml")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    log_path = property(lambda self: self.path / "train.log")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    adapter_dir = property(lambda self: self.path / "adapter")
    stop_path = property(lambda self: self.path / "stop.request")
    launch_path = property(lambda self: self.path / "launch.json")

    @property
    def name(self) -> str:
        return self.path.name

    def write_status(self, **changes) -> dict:
        """Merge changes into status.json and replace it atomically (the training process only)."""
        return _merge_into(self.status_path, changes)

    def write_launch(self, **changes) -> dict:
        """Merge changes into launch.json (the job runner only, under its queue lock)."""
        return _merge_into(self.launch_path, changes)

    def latest_launch(self) -> int:
        """The number of the run's latest launch, as either file knows it (0: never launched)."""
        return max(_launch_of(_read_json(path)) for path in (self.launch_path, self.status_path))

    def read_status(self) -> dict:
        """The run's state as every reader sees it, one dict with the keys of status.json.

        The training process's report wins once it has reported on the latest launch (it copies
        the launch number into status.json as it starts); until then, what the runner recorded
        since wins: queued, starting as pid N, could not start, cancelled. A live state whose
        process is gone is a failure."""
        status = self._merged()
        if self._gone(status):
            status = self._merged()  # it may have reported its end just before it exited
        if self._gone(status):
            tail = self.log_tail(5)
            status["state"] = "failed"
            status["message"] = "the training process ended without saying why (killed, crashed " \
                "or the machine restarted); the last checkpoint, if any, is intact"
            status["error"] = status["message"] + (f". Last log lines:\n{tail}" if tail else "")
        return status

    def _merged(self) -> dict:
        status, launch = _read_json(self.status_path), _read_json(self.launch_path)
        if not status and not launch:
            return {"state": "failed", "message": "this run has no status.json (not a run folder?)"}
        if status and _launch_of(status) >= _launch_of(launch):
            return {"step": 0, **launch, **status}
        return {"step": 0, **status, **launch}

    @staticmethod
    def _gone(status: dict) -> bool:
        return status.get("state") in LIVE_STATES and bool(status.get("pid")) and not \
            process_alive(status.get("pid"), status.get("pid_created"))

    def append_metric(self, record: dict) -> None:
        append_line(self.metrics_path, record)

    def read_metrics(self) -> list[dict]:
        return read_lines(self.metrics_path)

    def request_stop(self) -> None:
        self.stop_path.write_text(str(time.time()))

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def has_adapter(self) -> bool:
        """Whether the run saved an adapter (finished or stopped): what chat and export need."""
        return (self.adapter_dir / "adapter_config.json").is_file()

    def is_run(self) -> bool:
        return self.config_path.is_file()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint; a half-written one (killed, disk full) is never chosen."""
        return checkpoints.latest(self.checkpoints_dir)

    def drop_metrics_after(self, step: int) -> int:
        """Forget records past `step` (work a resume repeats), so the chart never goes back in
        steps or shows a step twice. Replaced atomically, like status.json; returns how many went."""
        records = self.read_metrics()
        kept = [r for r in records if (r.get("step") or 0) <= step]
        if len(kept) == len(records):
            return 0
        replace_atomically(self.metrics_path, "".join(map(_metric_line, kept)))
        return len(records) - len(kept)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _launch_of(record: dict) -> int:
    number = record.get("launch", 0)
    return number if isinstance(number, int) else 0


def _merge_into(path: Path, changes: dict) -> dict:
    record = _read_json(path)
    record.update(changes)
    record["updated"] = time.time()
    replace_atomically(path, json.dumps(record, indent=1))
    return record


def replace_atomically(path: Path, text: str) -> None:
    """Write a temp file beside `path`, then rename it over `path`: a reader sees the old file or
    the new one, never half of one."""
    # Unique per process and thread: two writers must never share (and clobber) one temp file.
    tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text, encoding="utf-8")
    try:
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the replace failed


# On Windows, renaming over a file fails while another process has it open (the UI reading
# status.json, an antivirus or backup tool scanning it); such holds last milliseconds.
_REPLACE_WAITS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def replace_file(source: Path, target: Path) -> None:
    """os.replace, retried for a moment on Windows while another program holds `target` open."""
    for wait in (*_REPLACE_WAITS, None):
        try:
            os.replace(source, target)
            return
        except PermissionError as error:
            if sys.platform != "win32":
                raise  # on POSIX a rename is never blocked by readers: a real permission problem
            if wait is None:
                raise PermissionError(
                    f"could not replace {target}: another program keeps it open (an antivirus, "
                    "a backup or sync tool, an editor). Close it or exclude the folder "
                    f"{Path(target).parent} from it, then try again") from error
            time.sleep(wait)


def _metric_line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def append_line(path: Path, record: dict) -> None:
    """One whole JSON line at the end of an append-only file (metrics.jsonl, gpu.jsonl)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(_metric_line(record))
        fh.flush()


def read_lines(path: Path) -> list[dict]:
    """The records of an append-only JSON-lines file; [] when it does not exist yet."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line may be mid-write; it will be whole next time
    return records


def process_created(pid: int) -> float:
    """Creation time of a process: with the pid it tells a reused pid from ours after a reboot."""
    return psutil.Process(pid).create_time()


def process_alive(pid, created=None) -> bool:
    try:
        proc = psutil.Process(int(pid))
        if created is not None and abs(proc.create_time() - float(created)) > 1.0:
            return False
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
