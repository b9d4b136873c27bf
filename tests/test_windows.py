"""Windows branches of the run directory, checkpoints, uploads and the job runner, run here on
Linux: sys.platform is set to "win32" and what Windows does differently is simulated (a rename
over a file another process holds open fails; fsync of a read-only handle or a folder fails)."""

import errno
import os
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from engine import checkpoints, readers, rundir, runner
from engine.rundir import RunDir, replace_atomically

ROOT = Path(__file__).resolve().parent.parent
fcntl = pytest.importorskip("fcntl", reason="simulates Windows on POSIX (as CI runs)")


@pytest.fixture
def windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")


@pytest.fixture
def sleeps(monkeypatch):
    """The waits between retries, recorded instead of slept."""
    waits = []
    monkeypatch.setattr(rundir.time, "sleep", waits.append)
    return waits


def sharing_violations(monkeypatch, times):
    """os.replace fails `times` times as on Windows while another process has the target open."""
    real_replace = os.replace
    calls = []

    def replace(source, target):
        calls.append(target)
        if len(calls) <= times:
            raise PermissionError(errno.EACCES, "The process cannot access the file because it is "
                                  "being used by another process", str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    return calls


# --- replacing status.json while someone reads it ------------------------------------------------

def test_a_brief_sharing_violation_is_waited_out(tmp_path, monkeypatch, windows, sleeps):
    status = tmp_path / "status.json"
    status.write_text('{"state": "queued"}')
    calls = sharing_violations(monkeypatch, times=3)
    replace_atomically(status, '{"state": "running"}')
    assert status.read_text() == '{"state": "running"}'
    assert len(calls) == 4
    assert sleeps == sorted(sleeps) and len(sleeps) == 3 and sleeps[0] < sleeps[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left behind


def test_a_file_held_open_for_good_is_a_clear_error_and_the_old_file_stays(tmp_path, monkeypatch,
                                                                        windows, sleeps):
    run = RunDir(tmp_path)
    run.write_status(state="running", step=3)
    sharing_violations(monkeypatch, times=10**6)
    with pytest.raises(PermissionError, match="another program keeps it open") as error:
        run.write_status(step=4)
    assert str(tmp_path) in str(error.value)
    assert sum(sleeps) < 5  # a few short waits, not a hang
    assert run.read_status()["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_on_posix_a_permission_error_is_not_retried(tmp_path, monkeypatch, sleeps):
    monkeypatch.setattr(sys, "platform", "linux")
    calls = sharing_violations(monkeypatch, times=1)
    with pytest.raises(PermissionError):
        replace_atomically(tmp_path / "status.json", "{}")
    assert len(calls) == 1 and sleeps == []


def test_two_threads_never_share_a_temp_file(tmp_path, monkeypatch):
    real_replace = os.replace
    both_written = threading.Barrier(2, timeout=30)
    sources = []

    def replace(source, target):
        sources.append(Path(source).name)
        both_written.wait()  # both temp files exist at once, as when two threads race
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "queue.json"
    other = threading.Thread(target=replace_atomically, args=(target, "[1]"))
    other.start()
    replace_atomically(target, "[2]")
    other.join()
    assert len(set(sources)) == 2
    assert target.read_text() in ("[1]", "[2]")


def test_an_upload_survives_a_sharing_violation(tmp_path, monkeypatch, windows, sleeps):
    upload = tmp_path / "facts.jsonl"
    upload.write_text('{"prompt": "a", "completion": "b"}\n')
    sharing_violations(monkeypatch, times=2)
    stored = readers.store_upload(upload, tmp_path / "uploads")
    assert stored.read_bytes() == upload.read_bytes()
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]


# --- fsync of a finished checkpoint ------------------------------------------------------------

def windows_fsync(monkeypatch):
    """os.fsync as Windows does it: EBADF on a read-only handle; a folder cannot be fsynced."""
    real_fsync = os.fsync
    synced = []

    def fsync(fd):
        folder = stat.S_ISDIR(os.fstat(fd).st_mode)
        if folder and sys.platform == "win32":
            raise PermissionError(errno.EACCES, "Access is denied")
        if not folder and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        synced.append("folder" if folder else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def checkpoint(tmp_path):
    path = tmp_path / "checkpoint-10"
    path.mkdir()
    for name in checkpoints.REQUIRED:
        (path / name).write_bytes(b"{}")
    return path


@pytest.mark.parametrize("platform", ["win32", "linux"])
def test_marking_a_checkpoint_complete_fsyncs_writable_handles(tmp_path, monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform)
    synced = windows_fsync(monkeypatch)
    path = checkpoint(tmp_path)
    checkpoints.mark_complete(path)
    assert checkpoints.latest(tmp_path) == path
    assert synced.count("file") == len(checkpoints.REQUIRED)
    assert [(path / name).read_bytes() for name in checkpoints.REQUIRED] == [b"{}"] * 4  # unchanged
    # The folder (its new names) is flushed where the OS allows it, and never tried on Windows.
    assert ("folder" in synced) == (platform == "linux")


# --- starting and stopping the training process ----------------------------------------------

def test_windows_training_process_gets_its_own_hidden_console_and_process_group(monkeypatch,
                                                                                windows):
    # The real values from Windows' headers; Linux's subprocess module lacks them.
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    assert runner.detached_popen_kwargs() == {"creationflags": 0x08000200}


def test_posix_training_process_gets_its_own_session(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert runner.detached_popen_kwargs() == {"start_new_session": True}


def test_spawn_uses_windows_flags_not_posix_sessions(tmp_path, monkeypatch, windows, data_dir):
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    started = []

    def popen(command, **kwargs):
        started.append(kwargs)
        return types.SimpleNamespace(pid=os.getpid())

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    monkeypatch.setattr(runner, "_pin_to_gpu", lambda run: {})  # no config: not this test's subject
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    runner.spawn(run)
    assert started[0]["creationflags"] == 0x08000200
    assert "start_new_session" not in started[0]  # POSIX only: Popen refuses it on Windows
    assert started[0]["stdout"].name == str(run.log_path)


def test_ctrl_break_is_a_stop_request_on_windows(tmp_path, monkeypatch):
    from engine import train

    handlers = {}
    fake_signal = types.SimpleNamespace(SIGTERM=15, SIGINT=2, SIGBREAK=21,
                                        signal=lambda sig, handler: handlers.update({sig: handler}))
    monkeypatch.setattr(train, "signal", fake_signal)
    monkeypatch.setattr(train, "_train_with_retries", lambda run, resume: "finished")
    assert train.run_training(str(tmp_path)) == "finished"
    assert sorted(handlers) == [2, 15, 21]
    handlers[21](21, None)
    assert RunDir(tmp_path).stop_requested()


def test_nothing_stops_a_process_by_signal():
    # Stopping goes through stop.request, which works the same on every OS; a kill would lose the
    # run's last steps and does not exist in this form on Windows.
    offenders = [f"{path.relative_to(ROOT)}: {word}"
                 for folder in ("engine", "app") for path in (ROOT / folder).rglob("*.py")
                 for word in ("os.kill", "killpg", "SIGKILL")
                 if word in path.read_text(encoding="utf-8")]
    assert offenders == []
