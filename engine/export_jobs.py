"""Exports as jobs: a background process per export whose progress is a small JSON file, and
pushing an export to the Hugging Face Hub.

    RUN/exports/<name>.job.json   kind, options, pid, state (running|finished|failed), fraction,
                                  message, error, result (the export folder)
    RUN/exports/<name>.log        the export process's output
    RUN/exports/<name>/           the export itself, once complete (engine.export)

Like training, an export never runs in the UI process: `start_export` spawns
`python -m engine export RUN_DIR --format KIND --job FILE`, which survives a closed tab or UI.
A Hub token reaches that process through its environment only: never a file, a log or its
command line (which other users of the machine can list).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from filelock import FileLock

from engine.export import (
    ExportError,
    Progress,
    check_request,
    export,
    export_running,
    exports_dir,
    kind_of,
    new_name,
)
from engine.paths import PROJECT_DIR, data_dir
from engine.rundir import RunDir, process_alive, process_created, replace_atomically

JOB_SUFFIX = ".job.json"
EVERY_S = 0.5  # progress is written at most this often (a model loads thousands of tensors)
PUSH_SHARE = 0.1  # of the progress bar, for the upload after an export


def job_path(run: RunDir, name: str) -> Path:
    return exports_dir(run) / f"{name}{JOB_SUFFIX}"


def start_export(run: RunDir, kind: str, gguf_type: str = "q8_0", push_repo: str = "",
                 token: str | None = None, private: bool = True) -> str:
    """Check the request, then start the export in a process of its own; returns the job's name
    (also the export folder's, once complete). Refused while another export of the run runs."""
    from engine.runner import detached_popen_kwargs  # the Windows-safe way to outlive the UI

    run = RunDir(Path(run.path).resolve())
    check_request(run, kind, gguf_type)
    if push_repo:
        hub_token(token)  # offline or no token: said now, not after a long export
    with _jobs_lock(run):
        running = active_job(run)
        if running or export_running(run):
            what = f" ({running['kind']}, {running.get('fraction', 0):.0%})" if running else ""
            raise ExportError(f"an export of run {run.name} is already under way{what}: wait for "
                              "it to end, then start this one")
        name = new_name(run, kind)
        job = job_path(run, name)
        update_job(job, kind=kind, gguf_type=gguf_type if kind == "gguf" else None,
                   push_repo=push_repo or None, state="running", fraction=0.0, error="",
                   message="starting the export process", result=None, started=time.time())
        command = [sys.executable, "-m", "engine", "export", str(run.path), "--format", kind,
                   "--gguf-type", gguf_type, "--job", str(job)]
        if push_repo:
            command += ["--push", push_repo] + ([] if private else ["--public"])
        env = dict(os.environ, QLS_DATA_DIR=str(data_dir()), PYTHONUNBUFFERED="1")
        if token:
            env["HF_TOKEN"] = token  # this process's environment only
        with open(job.with_name(f"{name}.log"), "ab") as log:
            process = subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       **detached_popen_kwargs())
        try:
            update_job(job, pid=process.pid, pid_created=process_created(process.pid))
        except Exception:  # noqa: BLE001 - it ended before we could see it: export_jobs says why
            update_job(job, pid=process.pid)
    return name


def export_jobs(run: RunDir) -> list[dict]:
    """The run's export jobs, newest first; one whose process is gone reads as failed, with why."""
    jobs = []
    for path in exports_dir(run).glob(f"*{JOB_SUFFIX}"):
        job = _read(path)
        if not job:
            continue
        job["id"] = path.name.removesuffix(JOB_SUFFIX)
        if job.get("state") == "running" and not _alive(job):
            tail = _log_tail(path.with_name(f"{job['id']}.log"))
            job["state"] = "failed"
            job["error"] = job["message"] = (
                "the export process ended without saying why (killed, crashed, or the machine "
                "restarted); what it had written is not taken for an export, and the next export "
                "removes it" + (f". Last log lines:\n{tail}" if tail else ""))
        jobs.append(job)
    return sorted(jobs, key=lambda job: job.get("started") or 0, reverse=True)


def active_job(run: RunDir) -> dict | None:
    return next((job for job in export_jobs(run) if job["state"] == "running"), None)


def _alive(job: dict) -> bool:
    if job.get("pid"):
        return process_alive(job["pid"], job.get("pid_created"))
    return time.time() - (job.get("started") or 0) < 30  # a moment between writing it and spawning


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _jobs_lock(run: RunDir) -> FileLock:
    exports_dir(run).mkdir(parents=True, exist_ok=True)
    return _lock_in(exports_dir(run))


def _lock_in(folder: Path) -> FileLock:
    # One instance per file, reentrant: start_export writes job files while it holds the lock.
    return FileLock(str(folder / ".jobs.lock"), timeout=30, is_singleton=True)


def update_job(path: Path, **changes) -> dict:
    """Merge changes into a job file, replaced atomically; under a lock, as the UI process and the
    export process both write it."""
    with _lock_in(path.parent):
        job = {**_read(path), **changes, "updated": time.time()}
        replace_atomically(path, json.dumps(job, indent=1))
    return job


# --- the export process (`python -m engine export`) ----------------------------------------------

def export_and_push(run: RunDir, kind: str, gguf_type: str = "q8_0", push_repo: str = "",
                    token: str | None = None, private: bool = True, job: Path | None = None,
                    echo=print) -> Path:
    """Export (and push, if asked), reporting progress as lines through echo and into the job
    file; a job file is made when none was given, so the UI also follows a command-line export."""
    run = RunDir(Path(run.path).resolve())
    if job is None:
        if push_repo:
            hub_token(token)  # offline or no token: said before a long export, not after it
        check_request(run, kind, gguf_type)
        if active_job(run) or export_running(run):
            raise ExportError(f"an export of run {run.name} is already under way: wait for it to "
                              "end, then start this one")
        job = job_path(run, new_name(run, kind))
        update_job(job, kind=kind, gguf_type=gguf_type if kind == "gguf" else None, error="",
                   push_repo=push_repo or None, state="running", fraction=0.0, result=None,
                   message="starting", started=time.time(), pid=os.getpid(),
                   pid_created=process_created(os.getpid()))
    report = _Reporter(job, echo, 1 - PUSH_SHARE if push_repo else 1.0)
    result, notes = None, []
    try:
        if push_repo:
            hub_token(token)  # checked again here, so that a background job says why it failed
        result = export(run, kind, report, gguf_type, job.name.removesuffix(JOB_SUFFIX), notes)
        if push_repo:
            report.scale = 1.0
            url = push_export(result, push_repo, token, private, report)
            report(1.0, f"pushed to {url}")
    except Exception as exc:
        error = str(exc) if isinstance(exc, ExportError) else f"the export failed: {exc}"
        if result is not None:
            error = f"the export is complete in {result}, but pushing it failed: {error}"
        update_job(job, state="failed", error=error, message=error,
                   result=str(result) if result else None)
        if result is not None and isinstance(exc, ExportError):
            raise ExportError(error) from exc
        raise
    done = f"{kind} export complete" + (f", pushed to {push_repo}" if push_repo else "")
    update_job(job, state="finished", fraction=1.0, result=str(result), error="", message=done,
               files=sorted(p.name for p in result.iterdir()), notes=notes)
    for note in notes:
        echo(note)
    return result


class _Reporter:
    """The progress callable handed to the export: prints a line and updates the job file, at most
    every EVERY_S seconds (and always for the last step). Fractions are scaled by `scale`, so the
    upload after an export gets the end of the bar."""

    def __init__(self, job: Path, echo, scale: float):
        self.job, self.echo, self.scale, self.last = job, echo, scale, float("-inf")

    def __call__(self, fraction: float, message: str) -> None:
        if fraction < 1.0 and time.monotonic() - self.last < EVERY_S:
            return
        self.last = time.monotonic()
        fraction = min(fraction * self.scale, 1.0)
        self.echo(f"{fraction:4.0%}  {message}")
        update_job(self.job, fraction=round(fraction, 3), message=message)


# --- the Hugging Face Hub ------------------------------------------------------------------------

def hub_token(token: str | None = None) -> str:
    """The token to push with (the one given, else HF_TOKEN or `hf auth login`'s); ExportError when
    this machine is offline or has none."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise ExportError("pushing to the Hugging Face Hub needs a connection, and this machine "
                          "works offline (HF_HUB_OFFLINE is set): connect and unset "
                          "HF_HUB_OFFLINE, or copy the export folder to the Hub from another machine")
    token = token or get_token()
    if not token:
        raise ExportError("pushing to the Hugging Face Hub needs a token with write access: create "
                          "one at https://huggingface.co/settings/tokens, then set HF_TOKEN or log "
                          "in with `hf auth login`")
    return token


def push_export(export_dir: str | Path, repo_id: str, token: str | None = None,
                private: bool = True, progress: Progress | None = None) -> str:
    """Upload a finished export to a model repository on the Hub (made, private by default, if it
    does not exist); returns its address. An adapter export is uploaded unzipped (the PEFT folder)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    export_dir = Path(export_dir)
    kind = kind_of(export_dir)
    if kind is None or not export_dir.is_dir():
        raise ExportError(f"{export_dir} is not a finished export folder")
    token = hub_token(token)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ExportError(f"'{repo_id}' is not a Hub repository name: write it as "
                          "your-name/model-name") from None
    progress = progress or (lambda fraction, message: None)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix=".push-", dir=export_dir.parent) as unpacked:
        folder = export_dir
        if kind == "adapter":
            archive = next(export_dir.glob("*.zip"))
            with zipfile.ZipFile(archive) as opened:
                opened.extractall(unpacked)
            folder = next(Path(unpacked).iterdir())
        progress(0.9, f"uploading {export_dir.name} to {repo_id} on the Hugging Face Hub")
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=folder,
                              commit_message=f"{kind} export of a QLoRA Studio run")
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes a sentence
            raise ExportError(_hub_failure(exc, repo_id, token)) from None
    return str(url)


def _hub_failure(exc: Exception, repo_id: str, token: str) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        text = "the Hugging Face Hub did not accept the token: check it is valid and not expired"
    elif status == 403:
        text = (f"the token may not write to {repo_id}: use a token with write access, and a "
                "repository under your own name or an organisation you belong to")
    elif isinstance(exc, OSError) or any(w in str(exc).lower() for w in ("connect", "timed out")):
        text = f"could not reach the Hugging Face Hub ({exc}): check the connection and try again"
    else:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        text = f"pushing to {repo_id} failed: {first_line}"
    return text.replace(token, "<token>")  # an error that quotes the request must not show it
