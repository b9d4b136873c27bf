"""The Train tab's live charts: built once, then refreshed from the run directory on every tick.

engine.metrics decides what each chart plots; this module only lays the plots out and turns the
rows into the frames Gradio draws. Everything comes from the run directory, so a reload or a
restarted UI draws the same charts again.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from engine import metrics

# The small charts under the loss chart: (chart, title, y axis title, elem_id, y axis format).
SMALL = [
    ("lr", "Learning rate", "learning rate", "lr-chart", ".1e"),
    ("grad_norm", "Gradient norm", "gradient norm", "grad-norm-chart", "~g"),
    ("tokens_per_s", "Speed", "tokens/s", "tokens-chart", None),
    ("memory", "Memory", "GB", "memory-chart", None),
]
LOSS_TITLES = {False: "loss", True: "log10(loss)"}
# Raw training loss faint, its smoothed line bold (as TensorBoard draws them), eval apart.
LOSS_COLOURS = {"train": "#a9c6e8", "train (smoothed)": "#1f5fa8", "eval": "#e8730c"}

# The page's title and a desktop notification when the watched run ends, even while the browser
# tab sits in the background. It runs in the browser on each change of the hidden "run|state"
# box; a run that had already ended when the page opened changes the title but never notifies.
STATE_JS = """
(value) => {
  const [run, state] = (value || "|").split("|");
  const ended = {finished: "✓ finished", failed: "✗ failed", stopped: "■ stopped"}[state];
  const live = {queued: "… queued", running: "▶ running", stopping: "■ stopping"}[state];
  document.title = (ended || live) ? `${ended || live} · QLoRA Studio` : "QLoRA Studio";
  if (live) {
    window.qlsWatched = run;
  } else if (ended && window.qlsWatched === run) {
    window.qlsWatched = null;
    if (window.Notification && Notification.permission === "granted") {
      new Notification(`QLoRA Studio: run ${state}`, {body: run});
    }
  }
  return [];
}
"""
# Start asks for notification permission: browsers grant it only in answer to a user's click.
ASK_PERMISSION_JS = """
() => {
  if (window.Notification && Notification.permission === "default") {
    Notification.requestPermission();
  }
  return [];
}
"""


def _plot(title: str, y_title: str, elem_id: str, x: str = "step", tooltip=("epoch",),
          **kwargs) -> gr.LinePlot:
    # Hovering a point shows its value, step and series, plus the `tooltip` columns.
    # Started as None, never an empty frame: after an empty frame Gradio 6 draws no later data.
    return gr.LinePlot(None, x=x, y="value", color="series", title=title, y_title=y_title,
                       elem_id=elem_id, tooltip=list(tooltip), **kwargs)


def build() -> dict:
    """The log-scale switch and the plots, in a readable grid: the loss chart wide, then rows of
    small charts. Returns the components by name; `outputs` in the order `updates` fills them."""
    log_scale = gr.Checkbox(False, label="Loss on a log scale", elem_id="loss-log-scale")
    loss = _plot("Loss", LOSS_TITLES[False], "loss-chart", height=300, color_map=LOSS_COLOURS,
                 tooltip=["epoch", "loss"])
    small = {}
    with gr.Row():
        for chart, title, y_title, elem_id, fmt in SMALL[:3]:
            # One series each: its name is the axis title already, so no legend.
            small[chart] = _plot(title, y_title, elem_id, height=200, y_axis_format=fmt,
                                 colors_in_legend=[])
    with gr.Row():
        small["memory"] = _plot(*SMALL[3][1:4], height=200)
        # GPU runs only: hidden until the run directory holds health samples.
        health = _plot("GPU health", "% busy / °C", "gpu-health-chart", x="minute", height=200,
                       visible=False, tooltip=[])
    return {"log_scale": log_scale, "loss": loss,
            "outputs": [loss] + [small[chart] for chart, *_ in SMALL] + [health]}


def frame(rows: list[dict]) -> pd.DataFrame | None:
    # None, not an empty frame: after an empty frame Gradio's plot draws no later data.
    return pd.DataFrame(rows) if rows else None


def loss_update(rows: list[dict], log_scale: bool):
    """The loss chart's data and its axis title, which says when the scale is logarithmic."""
    return gr.update(value=frame(rows), y_title=LOSS_TITLES[bool(log_scale)])


def updates(records: list[dict], health: list[dict], log_scale: bool) -> list:
    """New values for `build()`'s outputs, in order."""
    series = metrics.chart_series(records, bool(log_scale))
    health_rows = metrics.health_rows(health)
    return ([loss_update(series["loss"], log_scale)] + [frame(series[chart]) for chart, *_ in SMALL]
            + [gr.update(value=frame(health_rows), visible=bool(health_rows))])
