"""The real app in its own process, as `python launch.py` starts it, for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    def __init__(self, data_dir: Path, *flags: str):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = data_dir.parent / f"app-{self.port}.log"
        env = dict(os.environ, QLS_DATA_DIR=str(data_dir))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", "--port", str(self.port), "--no-browser",
                 "--data-dir", str(data_dir), *flags],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    # A hang guard, not a speed expectation: a live app process on a slow, busy host may take minutes.
    def wait_ready(self, timeout: float = 600) -> "AppServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the app exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"the app did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        kill_training_processes(self.data_dir)


def kill_training_processes(data_dir: Path) -> None:
    """Kill the training processes of the runs under data_dir: the runner starts each in its own
    session, so the UI's (or a test's) end does not end them."""
    runs = data_dir / "runs"  # the pid the runner recorded, and the one the process reported
    for status_file in [*runs.glob("*/launch.json"), *runs.glob("*/status.json")]:
        try:
            status = json.loads(status_file.read_text())
            pid = int(status.get("pid") or 0)
            # Only a spawned run leads its own process group; a run trained inside this test
            # process records this process's pid, which must live on. A pid reused since is
            # told apart by its start time.
            created = status.get("pid_created")
            if (not pid or pid == os.getpid() or os.getpgid(pid) != pid
                    or (created and abs(psutil.Process(pid).create_time() - created) > 1)):
                continue
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError, psutil.Error):
            pass


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags chromium keeps dialing Google on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def app_page(url: str, tab: str | None = None, init_script: str | None = None):
    """A page of the app in headless chromium (Playwright), on the given tab, with init_script
    run in it before the app's own; the test skips, saying so, where no chromium is installed."""
    import pytest

    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium: install Debian's chromium package (.ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            if init_script:
                page.add_init_script(init_script)
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # a busy 2-core host is slow
            page.goto(url)
            if tab:
                page.get_by_role("tab", name=tab).click()
            yield page
        finally:
            browser.close()
