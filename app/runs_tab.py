"""Runs tab: every run with its state, final loss and duration; chosen runs compared (loss curves
overlaid, configs side by side with the differences first); a run's metrics as CSV; the training
queue (cancel, reorder), and deleting a run after a confirmation.

Everything is read from the run directories and runs/queue.json on each refresh, so two browser
tabs, or a restarted UI, show the same state.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from app.errors import EXPECTED, in_words, sentence
from app.train_tab import chooser, duration
from engine import compare
from engine.config import ConfigError, RunConfig
from engine.runner import (
    cancel_queued,
    delete_run,
    get_run,
    list_runs,
    move_queued,
    queued_runs,
    start_next,
)

COLUMNS = ["run", "state", "steps", "final loss", "duration", "model", "message"]
COMPARED = 3  # the newest few runs are compared until the user chooses others
HIGHLIGHT = "background: rgba(250, 200, 0, 0.25)"  # readable on the light and the dark theme


def runs_table(runs: list, metrics: dict[str, list[dict]]) -> pd.DataFrame:
    rows = []
    for run in runs:
        status = run.read_status()
        losses = [m["loss"] for m in metrics[run.name] if m.get("loss") is not None]
        rows.append({
            "run": run.name,
            "state": status.get("state", "?"),
            "steps": f"{status.get('step') or 0}/{status.get('total_steps') or '?'}",
            "final loss": round(losses[-1], 4) if losses else None,
            "duration": duration(status.get("elapsed_s")),
            "model": _model_of(run),
            "message": (status.get("message") or "").split("\n")[0][:120],
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def default_compared() -> list[str]:
    return [run.name for run in list_runs()[:COMPARED]]


def overlay(chosen: list[str] | None, raw: bool = False):
    """The chosen runs' training loss, smoothed (raw too if asked), one colour per run."""
    try:
        runs, _ = compare.find_runs(chosen or [])  # the config table says which runs are gone
        rows = compare.overlay_rows(runs, raw=bool(raw))
    except EXPECTED:  # unreadable metrics: the chart stays as it is; the table says what is wrong
        return gr.skip()
    # None, not an empty frame: after an empty frame Gradio's plot draws no later data.
    # The legend is named explicitly: left to itself it keeps listing curves no longer drawn.
    return gr.update(value=pd.DataFrame(rows) if rows else None,
                     color_map=compare.series_colors(runs) or None,
                     colors_in_legend=list(dict.fromkeys(row["series"] for row in rows)) or None)


def drop_gone(chosen: list[str] | None):
    """The chosen runs that still exist; no update (so no redraw) when none has gone."""
    try:
        kept = [run.name for run in compare.find_runs(chosen or [])[0]]
    except EXPECTED:
        return gr.skip()
    return kept if kept != (chosen or []) else gr.skip()


def configs_html(chosen: list[str] | None) -> str:
    """The chosen runs' settings, one column per run: those that differ first and highlighted,
    those all runs share folded away below."""
    try:
        return _configs_html(chosen)
    except EXPECTED as exc:
        return f"<p>{html.escape(in_words(exc), quote=False)}</p>"


def _configs_html(chosen: list[str] | None) -> str:
    runs, notes = compare.find_runs(chosen or [])
    configs, more = compare.load_configs(runs)
    notes += more
    notes += [f"Run {run.name} has logged no loss yet, so it has no curve." for run in runs
              if run.name in configs and not compare.overlay_rows([run])]
    if len(runs) > compare.OVERLAID:
        notes.append(f"Only the first {compare.OVERLAID} chosen runs are drawn: "
                     "more are unreadable.")
    parts = [f"<p>{html.escape(note)}</p>" for note in notes]
    if not configs:
        return "".join(parts) + "<p>Choose runs above to compare their loss curves and " \
            "settings.</p>"
    rows = compare.config_diff(configs)
    differ = [row for row in rows if row["differs"]]
    same = [row for row in rows if not row["differs"]]
    if len(configs) == 1:
        return "".join(parts) + _settings_table(list(configs), rows)
    parts.append(f"<p><b>{len(differ)} setting(s) differ</b> between these runs "
                 "(highlighted).</p>" if differ else "<p>These runs have the same settings.</p>")
    if differ:
        parts.append(_settings_table(list(configs), differ, highlight=True))
    parts.append(f"<details><summary>{len(same)} setting(s) are the same in every run</summary>"
                 f"{_settings_table(list(configs), same)}</details>")
    return "".join(parts)


def _settings_table(names: list[str], rows: list[dict], highlight: bool = False) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in ["setting", *names])
    style = f' style="{HIGHLIGHT}"' if highlight else ""
    body = "".join(
        f"<tr{style}><td>{'≠ ' if highlight else ''}{html.escape(row['setting'])}</td>"
        + "".join(f"<td>{html.escape(_shown(value))}</td>" for value in row["values"]) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _shown(value) -> str:
    return "(none)" if value in ("", None) else str(value)


def export_csv(name: str | None):
    """The run's metrics as a CSV file to download, and a sentence about it."""
    if not name:
        return None, "Choose a run to export."
    try:
        run = get_run(name)
        path = compare.export_metrics_csv(run)
        count = len(run.read_metrics())
    except EXPECTED as exc:
        return None, f"⚠️ Cannot export run {name}. {sentence(exc)}"
    if not count:
        return str(path), f"Run {name} has logged no metrics yet: the CSV holds only the header."
    return str(path), f"{count} logged step(s) of run {name}, one row each."


def queue_markdown() -> str:
    queued = queued_runs()
    if not queued:
        return "The training queue is empty."
    lines = [f"{i}. **{run.name}**" for i, run in enumerate(queued, start=1)]
    return "**Waiting for the GPU** (each starts when the run ahead of it ends):\n\n" + "\n".join(lines)


def ask_delete(name: str):
    if not name:
        return gr.update(visible=False), "Choose a run to delete."
    return gr.update(visible=True), f"Delete run **{name}** and all its files (adapter, checkpoints)? " \
        "This cannot be undone."


def confirm_delete(name: str, queued: str | None = None, csv_choice: str | None = None):
    """Delete the run, then every view read again (the deleted run leaves each chooser)."""
    try:
        message = delete_run(get_run(name))
    except EXPECTED as exc:
        message = in_words(exc)
    return (gr.update(visible=False), message) + refresh(name, queued, csv_choice)


def queue_action(name: str, action: str) -> str:
    try:
        run = get_run(name)
        if action == "cancel":
            return cancel_queued(run)
        return move_queued(run, -1 if action == "up" else 1)
    except EXPECTED as exc:
        return in_words(exc)


def refresh(victim: str | None = None, queued: str | None = None, csv_choice: str | None = None):
    """The views, read again: the table, the queue, and each run chooser's choices together with
    its value. What a person chose stays chosen while it exists; a run gone meanwhile (deleted
    here, in another window or by the command line; for the queue, started) is cleared from
    its chooser. The compared runs are kept as chosen: drop_gone runs after each refresh."""
    note = ""
    try:
        # A run killed while others waited leaves the queue stuck; whoever looks first moves it on.
        start_next()
    except EXPECTED as exc:
        note = f"\n\nThe next queued run could not start: {in_words(exc)}"
    try:
        runs, metrics = _snapshot()
        waiting = [run.name for run in queued_runs()]
        queue_view = queue_markdown() + note
    except EXPECTED as exc:
        return (gr.skip(), in_words(exc)) + (gr.skip(),) * 4
    names = [run.name for run in runs]
    return (runs_table(runs, metrics), queue_view, chooser(names, victim),
            chooser(waiting, queued), gr.update(choices=names), chooser(names, csv_choice))


def _snapshot() -> tuple[list, dict[str, list[dict]]]:
    """The runs, newest first, and each one's metrics, read once for the table."""
    runs = list_runs()
    return runs, {run.name: run.read_metrics() for run in runs}


def _model_of(run) -> str:
    try:
        return RunConfig.load(run.config_path).model
    except (OSError, ConfigError):
        return ""


def build() -> dict:
    runs, metrics = _snapshot()
    names = [r.name for r in runs]
    table = gr.Dataframe(runs_table(runs, metrics), label="Runs", interactive=False,
                         elem_id="runs-table")
    # allow_custom_value on every run chooser: a run deleted in another tab may still be chosen
    # here, and the handlers say so in words instead of Gradio refusing the value.
    # The default is a function, so each page load chooses the newest runs of that moment.
    chosen = gr.Dropdown(names, value=default_compared, multiselect=True,
                         allow_custom_value=True, label="Runs to compare", elem_id="compare-choice")
    raw = gr.Checkbox(False, label="Also show the raw (unsmoothed) loss", elem_id="compare-raw")
    start = overlay(default_compared())
    chart = gr.LinePlot(start["value"], x="step", y="loss", color="series",
                        color_map=start["color_map"], colors_in_legend=start["colors_in_legend"],
                        title="Training loss (smoothed)", height=320, elem_id="runs-chart")
    configs = gr.HTML(configs_html(default_compared()), elem_id="compare-configs")
    with gr.Row():
        csv_choice = gr.Dropdown(names, label="Run to export", allow_custom_value=True,
                                 elem_id="csv-choice")
        export = gr.Button("Export metrics as CSV", elem_id="csv-button")
    csv_file = gr.File(label="Metrics CSV", interactive=False, elem_id="csv-file")
    with gr.Row():
        queue = gr.Markdown(queue_markdown(), elem_id="queue-view")
        with gr.Column():
            queued = gr.Dropdown([r.name for r in queued_runs()], label="Queued run",
                                 allow_custom_value=True, elem_id="queued-choice")
            with gr.Row():
                up = gr.Button("Sooner", elem_id="queue-up")
                down = gr.Button("Later", elem_id="queue-down")
                cancel = gr.Button("Cancel", variant="stop", elem_id="queue-cancel")
    with gr.Row():
        victim = gr.Dropdown(names, label="Run to delete", allow_custom_value=True,
                             elem_id="delete-choice")
        delete = gr.Button("Delete run…", variant="stop", elem_id="delete-button")
    with gr.Row(visible=False) as confirm_row:
        confirm = gr.Button("Yes, delete it", variant="stop", elem_id="delete-confirm")
        keep = gr.Button("No, keep it", elem_id="delete-cancel")
    message = gr.Markdown(elem_id="runs-message")
    refresh_button = gr.Button("Refresh", size="sm")
    timer = gr.Timer(5.0)

    views = [table, queue, victim, queued, chosen, csv_choice]
    # The chart follows training on every refresh; the config table only when the choice changes
    # (configs do not change, and redrawing it would fold up what the user unfolded).
    chosen.change(overlay, [chosen, raw], chart, api_name=False, show_progress="hidden")
    chosen.change(configs_html, chosen, configs, api_name=False, show_progress="hidden")
    raw.change(overlay, [chosen, raw], chart, api_name=False, show_progress="hidden")
    export.click(export_csv, csv_choice, [csv_file, message], api_name="export_metrics_csv")
    delete.click(ask_delete, victim, [confirm_row, message], api_name=False)
    keep.click(lambda: (gr.update(visible=False), "Kept."), None, [confirm_row, message], api_name=False)
    choosers = [victim, queued, csv_choice]  # refresh's inputs: each keeps its value if it can
    for button, action in ((up, "up"), (down, "down"), (cancel, "cancel")):
        button.click(lambda name, a=action: queue_action(name, a), queued, message,
                     api_name=False).then(refresh, choosers, views, api_name=False)
    # After each refresh: a run deleted meanwhile (here or in another tab) leaves the comparison
    # (its change event redraws the chart and the table), and the chart gains the latest steps.
    for event in (confirm.click(confirm_delete, choosers, [confirm_row, message] + views,
                                api_name=False),
                  refresh_button.click(refresh, choosers, views, api_name=False),
                  timer.tick(refresh, choosers, views, api_name=False, show_progress="hidden")):
        event.then(drop_gone, chosen, chosen, api_name=False, show_progress="hidden").then(
            overlay, [chosen, raw], chart, api_name=False, show_progress="hidden")
    return {"refresh": refresh, "views": views}
