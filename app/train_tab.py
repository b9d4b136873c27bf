"""Train tab: the few knobs a hobbyist touches, Start/Stop, and the live view of a run."""

from __future__ import annotations

import html
import inspect
import time
from dataclasses import fields

import gradio as gr

from app import charts
from app.errors import EXPECTED, in_words, sentence
from app.hardware_tab import selected_model
from engine import planner, speed
from engine.config import ConfigError, RunConfig, load_recipe, recipe_description, recipe_names
from engine.gpuhealth import health_summary, read_health
from engine.hardware import detect_gpus, visible_gpus
from engine.rundir import LIVE_STATES, RunDir
from engine.runner import (active_run, get_run, list_runs, queued_runs, resume_run, start_run,
                           stop_run)

SETTINGS = {setting.name: setting for setting in fields(RunConfig)}
# Form settings whose inputs are built elsewhere: in the Data tab (its config_inputs, and the
# prompt format), and the GPU picker below (its choices are the cards found at start).
DATA_FIELDS = ("eval_data_path", "eval_share", "data_format", "data_columns", "skip_bad_rows")
MACHINE_FIELDS = ("gpu",)


def _kind(setting) -> str:
    if setting.metadata["choices"]:
        return "choice"
    return {"bool": "bool", "int": "int", "float": "number", "str": "text"}[setting.type]


# The Train tab's own form, in RunConfig's order: (field, label, kind, advanced?)
FIELDS = [(s.name, s.metadata["label"], _kind(s), s.metadata["advanced"]) for s in SETTINGS.values()
          if s.metadata["ui"] and s.name not in ("template", *DATA_FIELDS, *MACHINE_FIELDS)]


def gpu_choices(gpus: list) -> list[tuple[str, int]]:
    """The GPU picker (shown with two or more): auto first, then each card with its free memory."""
    return [("auto: most free memory", -1)] + [
        (f"GPU {g.index}: {g.name}, {g.free_gb:.1f} GB free of {g.total_gb:.0f} GB", g.index)
        for g in gpus]


def _component(field: str, label: str, kind: str, value):
    # Under the label: the setting's one line of why, as `python -m engine train --help` shows it.
    common = {"value": value, "label": label, "info": SETTINGS[field].metadata["help"],
              "elem_id": f"cfg-{field}"}
    if kind == "choice":
        return gr.Dropdown(list(SETTINGS[field].metadata["choices"]), **common)
    if kind == "bool":
        return gr.Checkbox(**common)
    if kind == "text":
        return gr.Textbox(**common)
    return gr.Number(precision=0 if kind == "int" else None, **common)


def recipe_values(recipe: str) -> list:
    """The recipe's description and its value of every form setting; a recipe that cannot be
    read leaves the form as it is and says why."""
    try:
        cfg = load_recipe(recipe)
        return [recipe_description(recipe)] + [getattr(cfg, field) for field, *_ in FIELDS]
    except EXPECTED as exc:
        return [in_words(exc)] + [gr.skip()] * len(FIELDS)


def start(recipe, model_choice, custom_model, data_path, template, *values):
    """Start (or queue) a run; values are the settings named in VALUES, in that order."""
    if not data_path:
        return gr.update(), "⚠️ Upload a valid training file in the Data tab first."
    overrides = dict(zip(VALUES, values))
    try:
        cfg = load_recipe(recipe, model=selected_model(model_choice, custom_model),
                          data_path=data_path, template=template, **overrides)
        refusal = memory_refusal(cfg)
        if refusal:
            return gr.update(), f"⚠️ {refusal}"
        run = start_run(cfg, name=cfg.model.split("/")[-1])
        return gr.update(choices=run_choices(), value=run.name), started_message(run)
    except EXPECTED as exc:
        return gr.update(), in_words(exc)


# The settings start takes after its named parameters; the API names each by its field.
VALUES = [field for field, *_ in FIELDS] + list(DATA_FIELDS) + list(MACHINE_FIELDS)
start.__signature__ = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in
     ["recipe", "model_choice", "custom_model", "data_path", "template", *VALUES]])


def stop(run_name):
    return _on_run(run_name, stop_run)


# --- resume and the queue (one training job per GPU; the Runs tab reorders and cancels) ---------

def resume(run_name):
    return _on_run(run_name, resume_run)


def _on_run(run_name, action) -> str:
    if not run_name:
        return "No run selected."
    try:
        return action(get_run(run_name))
    except EXPECTED as exc:
        return in_words(exc)


def started_message(run) -> str:
    if run.read_status().get("state") == "queued":
        return (f"Queued run **{run.name}**: it starts when the run ahead of it ends (Runs tab: "
                f"reorder, cancel).{_chat_note(run)}")
    return f"Started run **{run.name}**." + _chat_note(run)


def _chat_note(run) -> str:
    note = run.read_status().get("chat_unloaded")
    return f" Note: {note} (the Chat tab loads it again when you next ask)." if note else ""


def queue_note() -> str:
    names = [run.name for run in queued_runs()]
    return f"\n\nWaiting for the GPU: {', '.join(names)} (Runs tab: reorder, cancel)" if names else ""


def run_choices() -> list[str]:
    return [run.name for run in list_runs()]


def default_run() -> str | None:
    active = active_run()
    runs = run_choices()
    return active.name if active else (runs[0] if runs else None)


def on_load():
    """The run picker of a page just opened: every run, the running (else newest) one chosen."""
    try:
        return gr.update(choices=run_choices(), value=default_run())
    except EXPECTED:
        return gr.skip()  # the live view says what is wrong when it reads the runs


def run_picker(current: str | None = None):
    """The run picker's choices read again (as its list opens), with its value: see chooser."""
    try:
        return chooser(run_choices(), current)
    except EXPECTED:
        return gr.skip()  # the live view says what is wrong when it reads the runs


def chooser(names: list[str], current: str | None):
    """New choices for a run chooser, and its value only where it has left them: a run deleted
    meanwhile (in the Runs tab, another window, the command line) is cleared, so no chooser holds
    a name missing from its choices. A value still there is not sent: it would undo what a
    person picks while the update is on its way."""
    if current and current not in names:
        return gr.update(choices=names, value=None)
    return gr.update(choices=names)


def show_run(run_name, log_scale=False):
    """Status text and loss chart of one run (the API's /run_status): the first two of live_view."""
    return live_view(run_name, log_scale)[:2]


def live_view(run_name, log_scale=False) -> list:
    """Everything the live view shows, read from the run directory: the status, every chart
    (charts.build's outputs), the "run|state" the page title follows, and the reproduce command."""
    try:
        if run_name:
            return run_view(get_run(run_name), log_scale)
        if run_choices():
            return ["Choose a run to follow."] + blank_view()
    except EXPECTED as exc:
        return [in_words(exc)] + blank_view()
    return ["No run yet: upload data, then press Start."] + blank_view()


def blank_view() -> list:
    """No run: no plots (None, never an empty frame), no state, no command."""
    return charts.updates([], [], False) + ["", ""]


def run_view(run: RunDir, log_scale=False) -> list:
    status, metrics = run.read_status(), run.read_metrics()
    health, health_text = gpu_health(run)
    text = status_markdown(status, metrics) + queue_note()
    if health_text:
        text += f"\n\n{health_text}"
    return ([text] + charts.updates(metrics, health, log_scale)
            + [f"{run.name}|{status.get('state', '')}", reproduce_command(run)])


def gpu_health(run: RunDir) -> tuple[list[dict], str]:
    """The GPU's health samples and their summary in words; nothing on a CPU run."""
    records = read_health(run)
    return records, health_summary(records) if records else ""


def reproduce_command(run: RunDir) -> str:
    """The command that trains this run again, headless, into a new folder beside it."""
    return (f"python -m engine train --config {_quoted(run.config_path)} "
            f"--out {_quoted(run.path.parent / (run.name + '-again'))}")


def _quoted(path) -> str:
    # Double quotes work in bash, zsh, cmd and PowerShell alike; most paths need none.
    text = str(path)
    return f'"{text}"' if any(c in text for c in ' &()[]{};\'"$`') else text


def status_markdown(status: dict, metrics: list[dict]) -> str:
    state = status.get("state", "?")
    step, total = status.get("step") or 0, status.get("total_steps")
    parts = [f"**{state}**", f"step {step}/{total or '?'}"]
    if status.get("elapsed_s") is not None:
        parts.append(f"elapsed {duration(status['elapsed_s'])}")
    if state in LIVE_STATES and status.get("eta_s") is not None:
        parts.append(f"ETA {duration(status['eta_s'])}")
    train_points = [m for m in metrics if m.get("loss") is not None]
    if train_points:
        last = train_points[-1]
        parts.append(f"loss {last['loss']:.4f}")
        if last.get("tokens_per_s"):
            parts.append(f"{last['tokens_per_s']:.0f} tokens/s")
        if last.get("gpu_mem_gb") is not None:
            reserved = last.get("gpu_reserved_gb")
            parts.append(f"GPU memory {last['gpu_mem_gb']:.1f} GB"
                         + (f" (reserved {reserved:.1f} GB)" if reserved is not None else ""))
        elif last.get("ram_gb") is not None:
            parts.append(f"RAM {last['ram_gb']:.1f} GB")
    text = " · ".join(parts)
    if status.get("message"):
        text += f"\n\n{status['message']}"
    if status.get("compute_why") and status.get("compute_why") not in status.get("message", ""):
        text += f"\n\nOn {status.get('device', '?')}, computing in {status['compute_why']}"
    done, total = status.get("download_done_gb") or 0, status.get("download_total_gb")
    if state in LIVE_STATES and total and done < total:
        filled = round(24 * done / total)
        text += f"\n\n`{'█' * filled}{'░' * (24 - filled)}` {100 * done / total:.0f}%"
    if state == "failed" and status.get("error") and status["error"] != status.get("message"):
        text += f"\n\n```\n{status['error']}\n```"
    return text


def duration(seconds: float | None) -> str:
    """H:MM:SS as the Train and Runs tabs show it; '' when unknown."""
    if seconds is None:
        return ""
    return time.strftime("%H:%M:%S", time.gmtime(max(0, int(seconds))))


# --- memory: the planner's breakdown as a stacked bar, and the pre-flight check of Start ----------

BAR_COLOURS = ["#4e79a7", "#59a14f", "#f28e2b", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]


def memory_refusal(cfg) -> str | None:
    """Why this run would run out of GPU memory, or None. Free VRAM counts, not total; on a CPU
    (no GPU, or device cpu) nothing is refused: the planner describes GPU memory only."""
    return planner.config_refusal(cfg, our_run_holds_gpu=active_run() is not None)


def memory_bar(model_choice, custom_model, max_seq_len, micro_batch, lora_r, epochs=0, max_steps=-1,
               grad_accum=1, data_size=None, gpu_index=-1, device="auto", kernels="off",
               optimizer="auto") -> str:
    """HTML: the plan's parts as one stacked bar against the card's free memory, with a legend,
    and the planner's time estimate for the uploaded data."""
    try:
        return _memory_bar(model_choice, custom_model, max_seq_len, micro_batch, lora_r, epochs,
                           max_steps, grad_accum, data_size, gpu_index, device, kernels, optimizer)
    except EXPECTED as exc:
        return f"<p>Memory plan unavailable: {html.escape(sentence(exc), quote=False)}</p>"


def _memory_bar(model_choice, custom_model, max_seq_len, micro_batch, lora_r, epochs, max_steps,
                grad_accum, data_size, gpu_index, device, kernels, optimizer) -> str:
    model = planner.model_shape(selected_model(model_choice, custom_model))
    length, batch, rank = (_int(value, 0) for value in (max_seq_len, micro_batch, lora_r))
    if model is None or min(length, batch, rank) < 1:
        return "<p>Memory plan: unknown model shape (a Hub id outside the catalog) or incomplete settings.</p>"
    gpu = None
    if device != "cpu":
        try:
            gpu = planner.detected_gpu(_int(gpu_index, -1))
        except ConfigError:  # the card it names is gone: plan against the most free one
            gpu = planner.detected_gpu()
    # Memory held by the app's own chat model counts as free: starting the run unloads it.
    free = min(gpu.free_gb + planner.chat_held_gb(gpu), gpu.total_gb) if gpu else None
    # The figure is GPU memory even for a CPU run ("about N GB on a GPU"): plan CUDA's pieces.
    result = planner.plan(model, length, batch, rank, free,
                          planner.stack_for(kernels, "cuda", optimizer))
    scale = max(result.total_gb, free or 0) or 1.0
    segments = "".join(
        f'<div title="{part}: {gb:.2f} GB" style="width:{100 * gb / scale:.2f}%;background:{colour}"></div>'
        for (part, gb), colour in zip(result.parts.items(), BAR_COLOURS) if gb > 0)
    marker = (f'<div style="position:absolute;left:{100 * free / scale:.2f}%;top:-4px;bottom:-4px;'
              'border-left:3px solid #222"></div>') if free else ""
    legend = " ".join(f'<span style="white-space:nowrap"><span style="color:{colour}">■</span> {part} '
                      f'{gb:.2f} GB</span>' for (part, gb), colour in zip(result.parts.items(), BAR_COLOURS))
    if free is None:
        verdict = f"about {result.total_gb:.1f} GB on a GPU; this run trains on the CPU"
    else:
        verdict = (f"{result.total_gb:.1f} GB of {free:.1f} GB free on {gpu.name}: "
                   + ("fits" if result.fits else "does not fit (Start will refuse)"))
    size = data_size or {}
    estimate = speed.estimate_time(
        model, length, gpu, rows=size.get("rows") or 0,
        tokens_per_epoch=size.get("tokens_per_epoch") or 0, epochs=_number(epochs, 0.0),
        max_steps=_int(max_steps, -1), rows_per_step=batch * max(_int(grad_accum, 1), 1))
    return (f'<div id="memory-plan"><b>Memory plan</b>: {verdict}'
            f'<div style="position:relative;display:flex;height:22px;margin:6px 0;background:#eee;'
            f'border-radius:4px">{segments}{marker}</div><small>{legend}<br>'
            f'{html.escape(time_text(estimate), quote=False)}</small></div>')


def time_text(estimate: speed.TimeEstimate) -> str:
    """The planner's time estimate in words, saying that it is one and what speed it assumes."""
    if estimate.tokens_per_s is None:
        return f"No time estimate: {estimate.speed_from}. The live ETA appears once training runs."
    speed = (f"a first-guess speed of about {estimate.tokens_per_s:,.0f} tokens/s "
             f"({estimate.speed_from})")
    if estimate.seconds is None:
        return f"Time estimate: upload data to get one; it will assume {speed}."
    return (f"Time estimate: about {duration(estimate.seconds)} for {estimate.what}, at {speed}. "
            "The live ETA replaces this guess once training runs.")


def same_length(value):
    """The max sequence length copied from one field to the other; an empty field copies nothing."""
    return gr.skip() if value is None else value


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _number(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def build(hardware: dict, data: dict) -> dict:
    names = recipe_names()
    # On a CPU only the quick-test recipe finishes in minutes; a GPU gets the everyday default.
    preferred = "default" if detect_gpus()[0] else "quick-test"
    first = preferred if preferred in names else names[0]
    recipe = gr.Dropdown(names, value=first, label="Recipe", elem_id="recipe-choice")
    description = gr.Markdown(recipe_description(first))
    defaults = load_recipe(first)
    by_field = {}
    with gr.Row():
        for field, label, kind, advanced in FIELDS:
            if not advanced:
                by_field[field] = _component(field, label, kind, getattr(defaults, field))
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            for field, label, kind, advanced in FIELDS:
                if advanced:
                    by_field[field] = _component(field, label, kind, getattr(defaults, field))
    gpus = visible_gpus(detect_gpus()[0])
    gpu = gr.Dropdown(gpu_choices(gpus), value=-1, label="GPU", visible=len(gpus) >= 2,
                      elem_id="cfg-gpu")
    components = [by_field[field] for field, *_ in FIELDS]
    on_recipe = recipe.change(recipe_values, recipe, [description] + components, api_name=False)
    plan_inputs = [hardware["model"], hardware["custom_model"], by_field["max_seq_len"],
                   by_field["micro_batch_size"], by_field["lora_r"], by_field["epochs"],
                   by_field["max_steps"], by_field["grad_accum_steps"], data["data_size"], gpu,
                   by_field["device"], by_field["kernels"], by_field["optimizer"]]
    memory = gr.HTML(memory_bar(*[c.value for c in plan_inputs]), elem_id="memory-plan-html")
    for component in plan_inputs:
        component.change(memory_bar, plan_inputs, memory, api_name=False, show_progress="hidden")

    with gr.Row():
        start_button = gr.Button("Start training", variant="primary", elem_id="start-button")
        stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button")
        resume_button = gr.Button("Resume", elem_id="resume-button")
    message = gr.Markdown(elem_id="train-message")
    # allow_custom_value: a run deleted meanwhile reaches live_view, which says so in words;
    # opening the list refreshes its choices (run_picker).
    run = gr.Dropdown(choices=run_choices(), value=default_run(), label="Run", elem_id="run-choice",
                      allow_custom_value=True)
    status = gr.Markdown(elem_id="run-status")
    plots = charts.build()
    command = gr.Textbox(label="Reproduce this run from a terminal", interactive=False,
                         buttons=["copy"], elem_id="run-command")
    # "run|state", hidden but rendered, so its change runs the page-title/notification script.
    state = gr.Textbox(visible="hidden", elem_id="run-state")
    timer = gr.Timer(2.0)

    # One max sequence length: the Data tab's field shows the value the run trains with, and its
    # change re-runs the statistics there. Each field copies what a person types into the other
    # (input, not change: a copy must not echo back over what they type next); a recipe sets
    # this field, then the Data tab's.
    train_length, data_length = by_field["max_seq_len"], data["max_seq_len"]
    data_length.value = defaults.max_seq_len
    for source, target, event in ((train_length, data_length, train_length.input),
                                  (data_length, train_length, data_length.input),
                                  (train_length, data_length, on_recipe.then)):
        event(same_length, source, target, api_name=False, show_progress="hidden")

    inputs = [recipe, hardware["model"], hardware["custom_model"], data["data_path"], data["template"]]
    data_inputs = [data["config_inputs"][field] for field in DATA_FIELDS]
    start_button.click(start, inputs + components + data_inputs + [gpu], [run, message],
                       api_name="start_training")
    start_button.click(None, js=charts.ASK_PERMISSION_JS)
    stop_button.click(stop, run, message, api_name="stop_training")
    resume_button.click(resume, run, message, api_name="resume_training")
    view = [run, plots["log_scale"]]
    outputs = [status] + plots["outputs"] + [state, command]
    # The API keeps its two outputs (status, loss chart); the page refreshes everything.
    run.change(show_run, view, [status, plots["loss"]], api_name="run_status")
    run.focus(run_picker, run, run, api_name=False, show_progress="hidden")
    run.change(live_view, view, outputs, api_name=False, show_progress="hidden")
    plots["log_scale"].change(live_view, view, outputs, api_name=False, show_progress="hidden")
    timer.tick(live_view, view, outputs, api_name=False, show_progress="hidden")
    state.change(None, state, None, js=charts.STATE_JS)
    return {"run": run, "on_load": on_load}
