"""Runs tab: every run with its state, final loss and duration, their loss curves overlaid, the
training queue (cancel, reorder), and deleting a run after a confirmation.

Everything is read from the run directories and runs/queue.json on each refresh, so two browser
tabs, or a restarted UI, show the same state.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app.train_tab import duration
from engine.config import ConfigError, RunConfig
from engine.runner import (
    RunnerError,
    cancel_queued,
    delete_run,
    get_run,
    list_runs,
    move_queued,
    queued_runs,
    start_next,
)

COLUMNS = ["run", "state", "steps", "final loss", "duration", "model", "message"]
OVERLAID = 8  # more curves than this on one chart are unreadable


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


def loss_overlay(runs: list, metrics: dict[str, list[dict]]) -> pd.DataFrame | None:
    """Training loss per step of the newest few runs, one series per run."""
    points = [{"step": m["step"], "loss": m["loss"], "run": run.name}
              for run in runs[:OVERLAID] for m in metrics[run.name] if m.get("loss") is not None]
    # None, not an empty frame: after an empty frame Gradio's plot draws no later data.
    return pd.DataFrame(points) if points else None


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


def confirm_delete(name: str):
    try:
        message = delete_run(get_run(name))
    except RunnerError as exc:
        message = f"⚠️ {exc}"
    return (gr.update(visible=False), message) + refresh()


def queue_action(name: str, action: str) -> str:
    try:
        run = get_run(name)
    except RunnerError as exc:
        return f"⚠️ {exc}"
    if action == "cancel":
        return cancel_queued(run)
    return move_queued(run, -1 if action == "up" else 1)


def refresh():
    # A run killed while others waited leaves the queue stuck; whoever looks first moves it on.
    start_next()
    runs, metrics = _snapshot()
    queued = [run.name for run in queued_runs()]
    return (runs_table(runs, metrics), loss_overlay(runs, metrics), queue_markdown(),
            gr.update(choices=[run.name for run in runs]), gr.update(choices=queued))


def _snapshot() -> tuple[list, dict[str, list[dict]]]:
    """The runs, newest first, and each one's metrics, read once for the table and the chart."""
    runs = list_runs()
    return runs, {run.name: run.read_metrics() for run in runs}


def _model_of(run) -> str:
    try:
        return RunConfig.load(run.config_path).model
    except (OSError, ConfigError):
        return ""


def build() -> dict:
    runs, metrics = _snapshot()
    table = gr.Dataframe(runs_table(runs, metrics), label="Runs", interactive=False,
                         elem_id="runs-table")
    chart = gr.LinePlot(loss_overlay(runs, metrics), x="step", y="loss", color="run", title="Training loss",
                        height=320, elem_id="runs-chart")
    with gr.Row():
        queue = gr.Markdown(queue_markdown(), elem_id="queue-view")
        with gr.Column():
            queued = gr.Dropdown([r.name for r in queued_runs()], label="Queued run",
                                 elem_id="queued-choice")
            with gr.Row():
                up = gr.Button("Sooner", elem_id="queue-up")
                down = gr.Button("Later", elem_id="queue-down")
                cancel = gr.Button("Cancel", variant="stop", elem_id="queue-cancel")
    with gr.Row():
        victim = gr.Dropdown([r.name for r in runs], label="Run to delete", elem_id="delete-choice")
        delete = gr.Button("Delete run…", variant="stop", elem_id="delete-button")
    with gr.Row(visible=False) as confirm_row:
        confirm = gr.Button("Yes, delete it", variant="stop", elem_id="delete-confirm")
        keep = gr.Button("No, keep it", elem_id="delete-cancel")
    message = gr.Markdown(elem_id="runs-message")
    refresh_button = gr.Button("Refresh", size="sm")
    timer = gr.Timer(5.0)

    views = [table, chart, queue, victim, queued]
    delete.click(ask_delete, victim, [confirm_row, message], api_name=False)
    keep.click(lambda: (gr.update(visible=False), "Kept."), None, [confirm_row, message], api_name=False)
    confirm.click(confirm_delete, victim, [confirm_row, message] + views, api_name=False)
    for button, action in ((up, "up"), (down, "down"), (cancel, "cancel")):
        button.click(lambda name, a=action: queue_action(name, a), queued, message,
                     api_name=False).then(refresh, None, views, api_name=False)
    refresh_button.click(refresh, None, views, api_name=False)
    timer.tick(refresh, None, views, api_name=False, show_progress="hidden")
    return {"refresh": refresh, "views": views}
