"""Export tab: take a run's result out of the app, as the adapter (zip), a merged 16-bit model or
GGUF with an Ollama Modelfile, optionally pushed to the Hugging Face Hub.

Each export runs in a background process (engine.export_jobs); this tab only starts it and reads
its job file every second, so a reload or a restarted UI shows it again.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import gradio as gr

from app.errors import EXPECTED, in_words
from engine.export import KINDS, ExportError, list_exports
from engine.export_jobs import export_jobs, start_export
from engine.runner import get_run, list_runs

KIND_LABELS = {"adapter": "Adapter (zip): load it with peft on top of the base model",
               "merged": "Merged model (16-bit safetensors): plain transformers, vLLM, the Hub",
               "gguf": "GGUF: llama.cpp, Ollama, LM Studio"}
KIND_CHOICES = [(KIND_LABELS[kind], kind) for kind in KINDS]
ERRORS = (ExportError, *EXPECTED)


def run_choices() -> list[tuple[str, str]]:
    """Runs with a saved adapter (finished or stopped), newest first; chat lists the same."""
    return [(f"{run.name} ({run.read_status().get('state')})", run.name) for run in list_runs()
            if run.has_adapter()]


def refresh_runs(current: str | None):
    choices = run_choices()
    names = [name for _, name in choices]
    return gr.update(choices=choices, value=current if current in names else
                     (names[0] if names else None))


def gguf_types():
    """The GGUF types this machine can write, and, where llama.cpp's quantizer is missing, what
    that leaves out and how to get it."""
    from engine.gguf_export import GGUF_TYPES, QUANTIZED, quantizer_available

    available, why = quantizer_available()
    types = [t for t in GGUF_TYPES if available or t not in QUANTIZED]
    choices = [(t.upper() + (" (the usual choice)" if t == "q8_0" else ""), t) for t in types]
    note = "" if available else f"Q4_K_M and Q5_K_M are not offered here: {why}."
    return gr.update(choices=choices, value="q8_0"), note


def on_kind(kind: str):
    gguf = kind == "gguf"
    return gr.update(visible=gguf), gr.update(visible=gguf)


def start(run_name, kind, gguf_type, repo, token, private):
    """Start the export; the token field is emptied at once (it is never saved)."""
    try:
        if not run_name:
            raise ExportError("choose a run first (only runs that saved an adapter are listed)")
        run = get_run(run_name)
        name = start_export(run, kind, gguf_type or "q8_0", (repo or "").strip(), token or None,
                            bool(private))
    except ERRORS as exc:
        return in_words(exc), "", gr.Timer(active=False)
    return f"Export {name} started.", "", gr.Timer(active=True)


def start_and_show(run_name, kind, gguf_type, repo, token, private):
    """Start, then show the export it started. A refusal stays on screen with the view as it
    was: showing the run's latest export would replace the sentence before anyone read it."""
    message, token, timer = start(run_name, kind, gguf_type, repo, token, private)
    if not timer.active:
        return (token, message) + (gr.update(),) * 5
    return (token, *show(run_name))


def show(run_name):
    """The run's latest export: progress bar, message, files, download, Ollama command; the timer
    keeps ticking only while it runs."""
    empty = ("", "", "", gr.update(value=None, visible=False), gr.update(value="", visible=False),
             gr.Timer(active=False))
    if not run_name:
        return empty
    try:
        run = get_run(run_name)
        jobs = export_jobs(run)
        earlier = list_exports(run)
    except ERRORS as exc:
        return (in_words(exc),) + empty[1:]
    if not jobs:
        return ("No export of this run yet.", "", _earlier(earlier, None)) + empty[3:]
    job = jobs[0]
    running = job["state"] == "running"
    percent = round(100 * (job.get("fraction") or 0))
    bar = (f'<progress value="{percent}" max="100" style="width: 100%"></progress>'
           f"<p><b>{percent}%</b> {html.escape(job.get('message') or '')}</p>")
    if job["state"] == "failed":
        text = in_words(ExportError(job.get("error") or "the export failed"))
    elif running:
        text = f"Exporting {job['kind']} ({job['id']})..."
    else:
        text = f"Export {job['id']} is complete: {job.get('result')}"
    result = Path(job["result"]) if job.get("result") else None
    files = _files(result, job.get("notes") or []) if result and result.is_dir() else ""
    archive = next(result.glob("*.zip"), None) if result and result.is_dir() else None
    modelfile = result / "Modelfile" if result else None
    command = _ollama_command(run.name, modelfile) if modelfile and modelfile.is_file() else ""
    return (text, bar, files + _earlier(earlier, result),
            gr.update(value=str(archive) if archive else None, visible=archive is not None),
            gr.update(value=command, visible=bool(command)), gr.Timer(active=running))


def _files(folder: Path, notes: list[str]) -> str:
    rows = "".join(f"<li><code>{html.escape(p.name)}</code> ({_size(p.stat().st_size)})</li>"
                   for p in sorted(folder.iterdir()) if p.is_file())
    # The engine's notes mark commands `like this`, for a terminal; here they become code
    said = "".join("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(note)) + "</p>"
                   for note in notes)
    return f"<p>In <code>{html.escape(str(folder))}</code>:</p><ul>{rows}</ul>{said}"


def _size(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count >= 100_000 else f"{count / 1e3:,.1f} kB"


def _earlier(exports: list[Path], shown: Path | None) -> str:
    others = [p for p in exports if p != shown]
    if not others:
        return ""
    rows = "".join(f"<li><code>{html.escape(str(p))}</code></li>" for p in others)
    return (f"<details><summary>{len(others)} earlier export(s) of this run</summary>"
            f"<ul>{rows}</ul></details>")


def _ollama_command(run_name: str, modelfile: Path) -> str:
    from engine.ollama import ollama_command, ollama_name

    return ollama_command(ollama_name(run_name), modelfile)


def build() -> dict:
    gr.Markdown("Take the tuned model out of the app. Each export is written into the run's "
                "folder (`exports/`), complete or not at all, by a background process: closing "
                "this page does not stop it.")
    with gr.Row():
        run = gr.Dropdown(choices=run_choices(), label="Run", elem_id="export-run", scale=4,
                          allow_custom_value=True)
        refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id="export-refresh")
    kind = gr.Radio(KIND_CHOICES, value="adapter", label="Export as", elem_id="export-kind")
    types, note = gguf_types()
    gguf_type = gr.Dropdown(types["choices"], value="q8_0", label="GGUF type", visible=False,
                            elem_id="export-gguf-type",
                            info="Q8_0 is close to the 16-bit model at about half its size")
    gguf_note = gr.Markdown(note, visible=False, elem_id="export-gguf-note")
    with gr.Accordion("Also push it to the Hugging Face Hub (optional)", open=False):
        repo = gr.Textbox(label="Repository", placeholder="your-name/my-model",
                          elem_id="export-repo")
        token = gr.Textbox(label="Hugging Face token (write access)", type="password",
                           elem_id="export-token",
                           info="Used for this push only: never saved. Empty: HF_TOKEN or "
                           "`hf auth login` of the machine running the app.")
        private = gr.Checkbox(value=True, label="Private repository", elem_id="export-private")
    start_button = gr.Button("Start export", variant="primary", elem_id="export-start")
    message = gr.Markdown(elem_id="export-message")
    progress = gr.HTML(elem_id="export-progress")
    result = gr.HTML(elem_id="export-result")
    download = gr.File(label="Download the adapter", visible=False, interactive=False,
                       elem_id="export-download")
    command = gr.Textbox(label="Add it to Ollama (run this where Ollama is installed)",
                         visible=False, interactive=False, buttons=["copy"],
                         elem_id="export-ollama")
    timer = gr.Timer(1.0, active=False)

    view = [message, progress, result, download, command, timer]
    kind.change(on_kind, kind, [gguf_type, gguf_note], api_name=False)
    start_button.click(start_and_show, [run, kind, gguf_type, repo, token, private],
                       [token, *view], api_name="start_export")
    run.change(show, run, view, api_name=False)
    timer.tick(show, run, view, api_name=False, show_progress="hidden")
    refresh.click(refresh_runs, run, run, api_name=False)

    def on_load(current):
        choices, note = gguf_types()
        return refresh_runs(current), choices, note

    # on_load: runs that finished since, and llama.cpp's quantizer if installed since
    return {"run": run, "on_load": on_load, "load_outputs": [run, gguf_type, gguf_note],
            "refresh": refresh_runs, "show": show, "view": view}
