"""The Export tab in a real browser (Playwright driving Debian's chromium, as tests/test_e2e.py
does): the run that learned the five facts exported as GGUF Q8_0 from the UI (merge, GGUF file,
Ollama Modelfile), its progress shown while the background process works, its folder, files and
`ollama create` command shown when it ends; and refusals shown as sentences, not error popups.

With QLS_SCREENSHOTS=DIR the finished export is saved there as export.png (the README's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from appserver import AppServer, app_page
from engine.rundir import process_alive
from progress import wait_while_moving

GGUF_LABEL = "GGUF: llama.cpp, Ollama, LM Studio"
FOLDER = re.compile(r"^gguf-\d{8}-\d{6}$")


@pytest.fixture(scope="module")
def app(tmp_path_factory, learned_run):
    """The app on a data dir with a copy of the learned run ("facts") and a run that saved no
    adapter ("untrained": its config only, like a run that failed before it saved anything)."""
    runs = tmp_path_factory.mktemp("e2e-export") / "data" / "runs"
    shutil.copytree(learned_run.path, runs / "facts", ignore=shutil.ignore_patterns("checkpoint*"))
    (runs / "untrained").mkdir()
    shutil.copy(learned_run.config_path, runs / "untrained" / "config.yaml")
    server = AppServer(runs.parent).wait_ready()
    yield server
    server.stop()
    kill_export_processes(runs)


def kill_export_processes(runs: Path) -> None:
    """An export process outlives the app (it has a session of its own): end any that a failed
    test left running."""
    for job_file in runs.glob("*/exports/*.job.json"):
        job = json.loads(job_file.read_text())
        if job.get("state") == "running" and job.get("pid") \
                and process_alive(job["pid"], job.get("pid_created")):
            os.killpg(job["pid"], signal.SIGKILL)


@pytest.fixture
def export_page(app):
    from playwright.sync_api import expect

    with app_page(app.url, "Export") as page:
        expect(page.locator("#export-run input")).to_have_value(re.compile(r"^facts"))
        yield page


def choose_run(page, name: str) -> None:
    """Type into the run list (it takes a typed name), then leave it, as a person would."""
    page.locator("#export-run input").click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Backspace")
    if name:
        page.keyboard.type(name)
        page.keyboard.press("Enter")
    page.locator("#export-kind").click()


@pytest.mark.slow  # the learned run it exports is trained once per session (minutes on a CPU)
@pytest.mark.browser
def test_refusals_are_sentences_that_stay_on_screen(app, export_page):
    from playwright.sync_api import expect

    page = export_page
    message = page.locator("#export-message")
    choose_run(page, "")
    page.locator("#export-start").click()
    expect(message).to_contain_text("⚠️ Choose a run first")

    choose_run(page, "untrained")
    expect(message).to_have_text("No export of this run yet.")
    page.locator("#export-start").click()
    expect(message).to_contain_text("⚠️ Run untrained has no saved adapter yet, so there is "
                                    "nothing to export")
    assert page.locator("[data-testid=toast-body]").count() == 0  # no Gradio error popup
    assert not (app.data_dir / "runs" / "untrained" / "exports").exists()


@pytest.mark.slow
@pytest.mark.browser
def test_a_gguf_export_shows_its_progress_then_its_files(app, export_page):
    from playwright.sync_api import expect

    page = export_page
    exports = app.data_dir / "runs" / "facts" / "exports"
    message, bar = page.locator("#export-message"), page.locator("#export-progress")
    expect(message).to_have_text("No export of this run yet.")
    assert not re.search(r"\d+%", bar.inner_text())
    page.get_by_label(GGUF_LABEL).check()
    gguf_type = page.locator("#export-gguf-type input")
    gguf_type.click()
    page.get_by_role("option", name=re.compile(r"^Q8_0")).click()
    expect(gguf_type).to_have_value(re.compile(r"^Q8_0"))
    page.locator("#export-start").click()

    percents, messages = [], set()  # what the page showed while the export ran, in order

    def ended():
        text = message.inner_text().strip()
        messages.add(text)
        shown = re.search(r"(\d+)%", bar.inner_text())
        if shown and (not percents or percents[-1] != int(shown[1])):
            percents.append(int(shown[1]))
        return "is complete" in text or text.startswith("⚠️")

    def moving():  # the page, and the export process's log
        return bar.inner_text(), sorted(p.stat().st_size for p in exports.glob("*.log"))

    wait_while_moving(ended, moving, "the export to end", interval=0.2)
    text = message.inner_text().strip()
    logs = "".join(p.read_text() for p in exports.glob("*.log"))
    assert "is complete" in text, f"{text}\n{logs}"

    # (a) the bar moved from 0 to 100 while it ran, never back, and said what was happening
    assert any("Exporting gguf (gguf-" in m for m in messages), messages
    assert len([p for p in percents if p < 100]) >= 2 and percents[-1] == 100, percents
    assert percents == sorted(percents), percents

    # (b) the page names the finished folder, its files and the Ollama command
    folder = Path(re.search(r"is complete: (\S+)", text)[1])
    assert folder.parent.resolve() == exports.resolve() and FOLDER.match(folder.name), folder
    result = page.locator("#export-result")
    expect(result).to_contain_text(str(folder))
    expect(result).to_contain_text("facts-q8_0.gguf")
    expect(result).to_contain_text(re.compile(r"Modelfile \(\d+\.\d kB\)"))  # not 0.0 MB
    expect(result.locator("code", has_text="ollama create facts -f Modelfile")).to_be_visible()
    expect(page.locator("#export-ollama textarea")).to_have_value(
        f"ollama create facts -f {folder / 'Modelfile'}")
    expect(page.locator("#export-download")).to_be_hidden()  # a download is for the adapter zip
    assert page.locator("[data-testid=toast-body]").count() == 0
    shots = os.environ.get("QLS_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / "export.png"), full_page=True)

    # (c) on disk: the GGUF and its Modelfile, complete, and nothing half-written beside them
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "facts-q8_0.gguf"]
    gguf_file = folder / "facts-q8_0.gguf"
    assert gguf_file.read_bytes()[:4] == b"GGUF"
    assert gguf_file.stat().st_size > 100e6  # 135M weights at 8.5 bits each: not a stub
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./facts-q8_0.gguf" in modelfile and "PARAMETER stop" in modelfile
    assert not list(exports.glob("*.partial")) and not list(exports.glob(".*.partial"))
    job = json.loads((exports / f"{folder.name}.job.json").read_text())
    assert job["state"] == "finished" and job["result"] == str(folder)
