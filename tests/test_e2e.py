"""The whole journey through the real app: Gradio's Python client, then a real headless browser
(Playwright driving Debian's chromium). Upload, train the embedded model in the background, watch
the chart, reload, stop, and chat with the tuned model.

With QLS_SCREENSHOTS=DIR the browser test also saves a screenshot of each tab there (the README's).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from appserver import AppServer, app_page
from engine.rundir import RunDir
from facts import FACTS
from progress import wait_for



@pytest.fixture(scope="module")
def app(tmp_path_factory, embedded_model):
    data = tmp_path_factory.mktemp("e2e") / "data"
    data.mkdir()
    server = AppServer(data).wait_ready()
    yield server
    server.stop()


def wait_until(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def check(client, path):
    from gradio_client import handle_file

    return client.predict(file=handle_file(str(path)), hub_id="", columns="", custom_model="",
                          api_name="/check_data")


def start_quick_test(client) -> str:
    """Start the quick-test recipe on the file this client's session uploaded; the run's name."""
    # The form keeps the recipe's values (the csv column mapping has no default: it is given).
    run, message = client.predict(recipe="quick-test", model_choice="embedded", custom_model="",
                                  template="guanaco", data_columns="", api_name="/start_training")
    assert "Started run" in message, message
    return run if isinstance(run, str) else run["value"]


def step_of(client, run_name) -> int:
    text, _ = client.predict(run_name, api_name="/run_status")
    match = re.search(r"step (\d+)/", text)
    return int(match.group(1)) if match else 0


@pytest.mark.slow
def test_python_client_checks_data_starts_stops_and_chats(app, facts_file, tmp_path):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(facts_file.read_text().splitlines()[0] + "\n{not json\n")
    summary, *_ = check(client, bad)
    assert "line 2" in summary and "invalid JSON" in summary

    summary, preview, stats, _ = check(client, facts_file)
    assert "30 rows" in summary and "chat" in summary
    trained = "".join(p["token"] for p in preview if p["class_or_confidence"] == "trained")
    assert FACTS[0]["answer"] in trained  # the answer is what the loss is on
    assert "tokens" in stats

    run_name = start_quick_test(client)  # the uploaded file lives in the client's session
    run = RunDir(app.data_dir / "runs" / run_name)
    wait_for(run, lambda s: (s.get("step") or 0) >= 2, "two training steps")
    assert step_of(client, run_name) >= 2  # the app reads the same progress
    assert "stop requested" in client.predict(run_name, api_name="/stop_training")

    def stopped():
        text, _ = client.predict(run_name, api_name="/run_status")
        return text if "stopped" in text else None

    wait_for(run, lambda s: s["state"] not in ("running", "stopping"), "the run to stop")
    status = wait_until(stopped, 60, "the app to show the run stopped")
    assert "adapter saved" in status
    assert (app.data_dir / "runs" / run_name / "adapter" / "adapter_model.safetensors").is_file()

    message, history = client.predict("Hello!", [], run_name, 0.0, 0.9, 16, "embedded", "",
                                      api_name="/chat")
    assert message == ""  # the input box is cleared
    reply = history[-1]
    assert reply["role"] == "assistant"
    assert "".join(part.get("text", "") for part in reply["content"]).strip()


@pytest.mark.slow
def test_a_restarted_ui_reattaches_to_the_running_job(tmp_path, facts_file, embedded_model):
    from gradio_client import Client

    data = tmp_path / "data"
    data.mkdir()
    servers = []
    try:
        first = AppServer(data)
        servers.append(first)
        first.wait_ready()
        client = Client(first.url, verbose=False)
        check(client, facts_file)
        run_name = start_quick_test(client)
        run = RunDir(data / "runs" / run_name)
        wait_for(run, lambda s: (s.get("step") or 0) >= 2, "two steps")
        first.process.terminate()  # the UI alone: its training process lives in its own session
        first.process.wait(timeout=30)

        second = AppServer(data)
        servers.append(second)
        second.wait_ready()
        client = Client(second.url, verbose=False)
        before = step_of(client, run_name)
        text, chart = client.predict(run_name, api_name="/run_status")
        assert "running" in text and chart is not None  # the chart is there at once, not empty
        wait_for(run, lambda s: (s.get("step") or 0) > before, "training to go on")
        assert step_of(client, run_name) > before  # and the new app shows it
    finally:
        for server in servers:
            server.stop()  # also kills the run's training process


def newest_run(data_dir: Path) -> RunDir:
    return RunDir(max((data_dir / "runs").glob("*/config.yaml")).parent)


def chart_points(page, chart: str = "loss-chart") -> int:
    """Points on a chart's longest rendered line: vega draws each as one SVG path, a segment per
    point."""
    paths = page.locator(f"#{chart} svg .mark-line path").all()
    return max((len(re.findall(r"[ML]", p.get_attribute("d") or "")) for p in paths), default=0)


# Every live chart of a CPU run (the GPU health chart stays hidden without a GPU).
CHARTS = ("loss-chart", "lr-chart", "grad-norm-chart", "tokens-chart", "memory-chart")


def axis_titles(page, chart: str) -> list[str]:
    return page.locator(f"#{chart} svg .role-axis-title text").all_text_contents()


# Records the page's notifications instead of showing them, and grants the permission Start asks.
FAKE_NOTIFICATIONS = """
window.qlsNotes = [];
window.Notification = class {
  static permission = "granted";
  static requestPermission() { return Promise.resolve("granted"); }
  constructor(title, options) { window.qlsNotes.push(title); }
};
"""


@pytest.mark.slow
@pytest.mark.browser
def test_browser_upload_train_reload_and_chat(app, facts_file):
    from playwright.sync_api import expect

    shots = os.environ.get("QLS_SCREENSHOTS")

    def screenshot(page, name):
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)

    with app_page(app.url, init_script=FAKE_NOTIFICATIONS) as page:
        expect(page.locator("#hardware-info")).to_contain_text("CPU")
        screenshot(page, "hardware")

        page.get_by_role("tab", name="Data").click()
        page.locator("#data-upload input[type=file]").set_input_files(str(facts_file))
        expect(page.locator("#data-summary")).to_contain_text("30 rows")
        expect(page.locator("#data-preview")).to_contain_text("Mirrowgate")
        expect(page.locator("#data-stats")).to_contain_text("tokens per epoch")
        # The token-length histogram draws its bars (one SVG path each).
        wait_until(lambda: page.locator("#token-histogram svg .mark-rect path").count() > 0, 30,
                   "the histogram's bars")
        screenshot(page, "data")

        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#recipe-choice input")).to_have_value("quick-test")  # CPU default
        # Advanced: our training kernels are on by default (`auto`), with the setting's why
        page.get_by_text("Advanced", exact=True).click()
        expect(page.locator("#cfg-kernels input")).to_have_value("auto")
        expect(page.locator("#cfg-kernels")).to_contain_text("the reference QLoRA stack")
        # the plan guesses the training time from the uploaded data's token count
        expect(page.locator("#memory-plan-html")).to_contain_text("for 8 epochs of")
        page.locator("#start-button").click()
        expect(page.locator("#train-message")).to_contain_text("Started run")
        run = newest_run(app.data_dir)
        wait_for(run, lambda s: (s.get("step") or 0) >= 3 or s["state"] != "running", "3 steps")
        wait_until(lambda: chart_points(page) >= 3, 60, "3 points on the chart")
        for chart in CHARTS:  # learning rate, gradient norm, speed and memory are drawn too
            wait_until(lambda: chart_points(page, chart) >= 2, 60, f"2 points on {chart}")
        before = {chart: chart_points(page, chart) for chart in CHARTS}
        wait_for(run, lambda s: (s.get("step") or 0) > max(before.values()) + 1
                 or s["state"] != "running", "more steps")
        for chart in CHARTS:
            wait_until(lambda: chart_points(page, chart) > before[chart], 60,
                       f"{chart} to gain points")
        expect(page.locator("#gpu-health-chart")).to_be_hidden()  # a CPU run has no GPU health
        expect(page.locator("#run-command textarea")).to_have_value(
            re.compile(rf"^python -m engine train --config \S*{re.escape(run.name)}\S*config\.yaml "
                       r"--out \S+$"))

        # The log-scale switch redraws the loss chart on a log10 axis, and back.
        assert axis_titles(page, "loss-chart") == ["step", "loss"]
        page.locator("#loss-log-scale input").check()
        wait_until(lambda: axis_titles(page, "loss-chart") == ["step", "log10(loss)"], 60,
                   "the loss chart's log axis")
        assert chart_points(page) >= before["loss-chart"]
        page.locator("#loss-log-scale input").uncheck()
        wait_until(lambda: axis_titles(page, "loss-chart") == ["step", "loss"], 60,
                   "the loss chart's linear axis")

        # A reload (a closed tab, a restarted UI) finds the running job and its charts again.
        page.reload()
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#run-status")).to_contain_text("running", timeout=30_000)
        for chart in CHARTS:
            wait_until(lambda: chart_points(page, chart) >= before[chart], 60,
                       f"{chart} after the reload")
        expect(page).to_have_title(re.compile("running"), timeout=30_000)
        wait_for(run, lambda s: s["state"] != "running", "the run to finish")
        expect(page.locator("#run-status")).to_contain_text("finished", timeout=60_000)
        # the run the form started trained through our kernels (presets/kernels.yaml, CPU)
        assert "padding_free (attention row by row)" in run.read_status()["kernels"]
        # The title says so (a tab in the background), and the watched run's end notifies.
        expect(page).to_have_title(re.compile("finished"), timeout=30_000)
        assert page.evaluate("window.qlsNotes") == ["QLoRA Studio: run finished"]
        screenshot(page, "train")

        page.get_by_role("tab", name="Chat").click()
        page.locator("#chat-refresh").click()
        run_name = page.locator("#run-choice input").input_value()
        expect(page.locator("#chat-target input")).to_have_value(re.compile(re.escape(run_name)))
        fact = FACTS[0]
        page.locator("#chat-input textarea").fill(fact["held_out"][0])
        page.locator("#chat-input textarea").press("Enter")
        expect(page.locator("#chatbot")).to_contain_text(fact["keyword"], timeout=120_000)
        screenshot(page, "chat")

        # The runs page lists both of this app's runs (the client test's stopped one, this one).
        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#runs-table")).to_contain_text(run_name)
        expect(page.locator("#runs-table")).to_contain_text("stopped")
        expect(page.locator("#runs-table")).to_contain_text("finished")  # refreshed on opening
        screenshot(page, "runs")
