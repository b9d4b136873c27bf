"""A safe server: a login is enforced over real HTTP, only the data directory is served, oversized
uploads are refused, and no name a user sends is joined into a path unchecked."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.login import FREE_FAILURES, MAX_ADDRESSES, MAX_DELAY_S, LoginThrottle
from engine.readers import UploadError, store_upload
from engine.runner import RunnerError, get_run

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "hobbyist", "s3cret-pass"
# The lockout's base delay in the app under test: short, yet far longer than two back-to-back
# local requests take, so a refusal is never missed because the lock already ran out.
LOGIN_DELAY_S = 2


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
    env = dict(os.environ, QLS_MAX_UPLOAD_MB="1", GRADIO_ANALYTICS_ENABLED="",
               QLS_LOGIN_DELAY_S=str(LOGIN_DELAY_S))
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


def client_from(url: str, address: str) -> httpx.Client:
    """A client whose requests come from `address` (any 127.x.y.z is this machine), so that
    locking it out leaves the other tests, which come from 127.0.0.1, alone."""
    return httpx.Client(base_url=url, timeout=30,
                        transport=httpx.HTTPTransport(local_address=address))


def refusal_delay_s(response: httpx.Response) -> int:
    """The delay a refused login names; fails unless it is the lockout refusal."""
    assert response.status_code == 429, (response.status_code, response.text)
    found = re.fullmatch(r"Too many failed logins from this address: try again in (\d+) s",
                         response.json()["detail"])
    assert found, response.text
    return int(found.group(1))


@pytest.mark.slow
def test_login_guessing_is_slowed_down_per_address(server):
    url, data = server
    with client_from(url, "127.0.0.2") as guesser:
        wrong = {"username": USER, "password": "guess-1"}
        right = {"username": USER, "password": PASSWORD}
        for _ in range(FREE_FAILURES):  # typos get the normal answer
            assert guesser.post("/login", data=wrong).status_code == 400
        first = refusal_delay_s(guesser.post("/login", data=wrong))
        assert first == LOGIN_DELAY_S
        # A forged header does not make a new address, and the lockout is this address's alone.
        forged = guesser.post("/login", data=wrong, headers={"X-Forwarded-For": "10.9.8.7"})
        assert forged.status_code == 429
        assert logged_in(url).get("/config").status_code == 200  # 127.0.0.1 is not locked out

        time.sleep(first + 0.2)
        assert guesser.post("/login", data=wrong).status_code == 400  # one more try, wrong again
        second = refusal_delay_s(guesser.post("/login", data=wrong))
        assert second == 2 * first  # the delay grows
        refusal_delay_s(guesser.post("/login", data=right))  # even the right password waits

        time.sleep(second + 0.2)
        assert guesser.post("/login", data=right).status_code == 200
        assert guesser.get("/config").status_code == 200
        # The success reset the count: the next typo is an ordinary one.
        assert guesser.post("/login", data=wrong).status_code == 400

    log = (data.parent / "app.log").read_text()
    failures = [line for line in log.splitlines() if "Failed login" in line and "127.0.0.2" in line]
    assert len(failures) == FREE_FAILURES + 2, log[-3000:]  # refused tries were never checked
    assert all("WARNING" in line and f"user {USER!r}" in line for line in failures)
    assert PASSWORD not in log and "guess-1" not in log


def test_login_throttle_doubles_up_to_a_cap_and_forgets(caplog):
    now = [1000.0]
    throttle = LoginThrottle(base_delay_s=1, clock=lambda: now[0])
    for _ in range(FREE_FAILURES - 1):
        assert not throttle.attempt("10.0.0.1", "bob", correct=False)
        assert throttle.wait_s("10.0.0.1") == 0
    delays = []
    for _ in range(12):
        assert not throttle.attempt("10.0.0.1", "bob", correct=False)
        delays.append(throttle.wait_s("10.0.0.1"))
        now[0] += delays[-1]
    assert delays[:4] == [1, 2, 4, 8] and delays[-1] == MAX_DELAY_S
    assert throttle.wait_s("10.0.0.2") == 0  # another address is not affected

    assert not throttle.attempt("10.0.0.1", "bob", correct=False)
    assert not throttle.attempt("10.0.0.1", "bob", correct=True)  # locked: refused unchecked
    now[0] += MAX_DELAY_S
    assert throttle.attempt("10.0.0.1", "bob", correct=True)
    assert len(throttle) == 0  # a success forgets the address
    assert "Failed login for user 'bob' from 10.0.0.1" in caplog.text

    # Memory stays bounded: idle addresses are forgotten after an hour, and the table is capped.
    throttle.attempt("10.0.0.3", "eve", correct=False)
    now[0] += 3601
    throttle.attempt("10.0.0.4", "eve", correct=False)
    assert len(throttle) == 1
    for i in range(MAX_ADDRESSES + 10):
        throttle.attempt(f"fd00::{i:x}", "eve", correct=False)
    assert len(throttle) == MAX_ADDRESSES


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
