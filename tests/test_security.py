"""A safe server: a login is enforced over real HTTP, only the data directory is served, oversized
uploads are refused, and no name a user sends is joined into a path unchecked."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.readers import UploadError, store_upload
from engine.runner import RunnerError, get_run

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "hobbyist", "s3cret-pass"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app, started as a user would, with --auth on a free port."""
    data = tmp_path_factory.mktemp("data")
    (data / "runs").mkdir()
    (data / "inside.txt").write_text("served")
    port = free_port()
    env = dict(os.environ, QLS_MAX_UPLOAD_MB="1", GRADIO_ANALYTICS_ENABLED="")
    log = open(data.parent / "app.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), "--auth", f"{USER}:{PASSWORD}",
         "--no-browser", "--data-dir", str(data)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # a hang guard: it fails at once if the app exits
    while time.time() < deadline:
        try:
            httpx.get(url + "/", timeout=2)
            break
        except httpx.HTTPError:
            if process.poll() is not None:
                pytest.fail(f"the app exited: {(data.parent / 'app.log').read_text()[-3000:]}")
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("the app did not start within 180 s")
    try:
        yield url, data
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def logged_in(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)  # the login cookie lives in the client
    response = client.post("/login", data={"username": USER, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client


@pytest.mark.slow
def test_api_refuses_requests_without_login(server):
    url, _ = server
    for path in ("/config", "/gradio_api/info"):
        response = httpx.get(url + path, timeout=30)
        assert response.status_code in (401, 403), (path, response.status_code)
    response = httpx.post(url + "/gradio_api/call/stop_training", json={"data": [None]}, timeout=30)
    assert response.status_code in (401, 403)
    wrong = httpx.post(url + "/login", data={"username": USER, "password": "guess"}, timeout=30)
    assert wrong.status_code in (400, 401)
    client = logged_in(url)
    assert client.get("/config").status_code == 200  # the same request, logged in


@pytest.mark.slow
def test_only_the_data_directory_is_served(server):
    url, data = server
    client = logged_in(url)
    assert client.get(f"/gradio_api/file={data / 'inside.txt'}").text == "served"
    for outside in (ROOT / "engine" / "config.py", Path("/etc/passwd"), data / ".." / "x"):
        assert client.get(f"/gradio_api/file={outside}").status_code in (403, 404), outside


@pytest.mark.slow
def test_oversized_upload_is_refused_over_http(server):
    url, _ = server
    client = logged_in(url)
    big = b'{"text": "x"}\n' * (2 * 1024 * 1024 // 14)  # 2 MB against a 1 MB limit
    response = client.post("/gradio_api/upload", files={"files": ("big.jsonl", big)})
    assert response.status_code == 413, response.text[:300]
    small = client.post("/gradio_api/upload", files={"files": ("ok.jsonl", b'{"text": "x"}\n')})
    assert small.status_code == 200


def test_oversized_or_wrong_uploads_are_refused_by_the_store(tmp_path):
    target = tmp_path / "uploads"
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"text": "x"}\n' * 10_000)
    with pytest.raises(UploadError, match="above the upload limit"):
        store_upload(big, target, max_bytes=1024)
    binary = tmp_path / "fake.jsonl"
    binary.write_bytes(b"\x7fELF\x00\x00binary")
    with pytest.raises(UploadError, match="binary"):
        store_upload(binary, target)
    script = tmp_path / "evil.py"
    script.write_text("print('hi')")
    with pytest.raises(UploadError, match="is not a"):
        store_upload(script, target)
    assert not target.exists() or not any(target.iterdir())  # nothing refused was kept


def test_an_upload_name_never_becomes_a_path(tmp_path):
    sneaky = tmp_path / "a" / ".." / "..%2f..%2fescape.jsonl"
    sneaky.parent.mkdir(parents=True, exist_ok=True)
    sneaky.write_text('{"text": "x"}\n')
    stored = store_upload(sneaky, tmp_path / "uploads")
    assert stored.parent == tmp_path / "uploads" and "escape" not in stored.name


@pytest.mark.parametrize("name", ["../runs", "..", "../../etc/passwd", "/etc", "a/../../b", "x\x00y",
                                  "%2e%2e", "C:\\Windows", "run\nname", " ", "~root"])
def test_run_names_that_would_leave_the_runs_folder_are_refused(data_dir, name):
    with pytest.raises(RunnerError, match="is not a run name"):
        get_run(name)
