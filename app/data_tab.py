"""Data tab: upload a file (or name a Hub dataset), see every problem by line, see rows exactly as
the model will, and the token statistics that decide max_seq_len. The engine does all reading."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from app.errors import EXPECTED, in_words
from app.hardware_tab import selected_model
from engine.catalog import default_template
from engine.config import RunConfig
from engine.data import FORMATS, DataReport, read_dataset
from engine.datastats import StatsCollector
from engine.paths import uploads_dir
from engine.preview import CUT, TRAINED, preview_row, preview_template
from engine.readers import SUFFIXES, UploadError, store_upload
from engine.templates import TemplateError, template_choices

FORMAT_CHOICES = [("Detect automatically", "auto")] + [(f"{k}: {v}", k) for k, v in FORMATS.items()]
PREVIEW_ROWS = 3
DEFAULT_MAX_SEQ_LEN = RunConfig.max_seq_len  # until the Train tab sets its recipe's
MAX_LISTED = 20
HINT = f"Upload a {', '.join(SUFFIXES)} file, or name a Hugging Face dataset."
# Plots start as None, not an empty frame: after an empty frame Gradio draws no later data.


def check_data(file, hub_id, fmt, columns, template, max_seq_len, skip_bad_rows, model_choice,
               custom_model, progress=gr.Progress()):
    """Returns (data path for training or '', summary, preview, statistics, histogram, and the
    rows and tokens per epoch for the Train tab's time estimate)."""
    hub_id = (hub_id or "").strip()
    if not file and not hub_id:
        return "", HINT, [], "", None, {}
    try:
        return _check(file, hub_id, fmt, columns, template, max_seq_len, skip_bad_rows,
                      selected_model(model_choice, custom_model), progress)
    except UploadError as exc:
        return "", f"❌ {exc}", [], "", None, {}
    except EXPECTED as exc:  # a full disk while storing the upload, an unreadable file, ...
        return "", in_words(exc), [], "", None, {}


def _check(file, hub_id, fmt, columns, template, max_seq_len, skip_bad_rows, model, progress):
    if file:
        shown = Path(file).name  # only ever shown, never joined into a path
        source = str(store_upload(file, uploads_dir()))
    else:
        shown = source = hub_id
    max_seq_len = max(int(max_seq_len or DEFAULT_MAX_SEQ_LEN), 1)
    try:
        chosen, tokenizer, note = preview_template(model, template)
    except TemplateError as exc:
        chosen, tokenizer, note = None, None, f"⚠️ Preview unavailable: {exc}"
    collector = StatsCollector(tokenizer, chosen, max_seq_len) if tokenizer is not None else None

    def report_progress(fraction: float, text: str) -> None:
        progress(fraction, desc=text)

    try:
        report = read_dataset(source, fmt, columns or "", report_progress, keep=PREVIEW_ROWS,
                              on_row=collector.add if collector else None)
        stats = collector.finish() if collector else None
    except TemplateError as exc:  # the model's chat template cannot render these rows
        report = read_dataset(source, fmt, columns or "", report_progress, keep=PREVIEW_ROWS)
        stats, note, chosen = None, f"⚠️ Preview unavailable: {exc}", None
    usable = report.usable(bool(skip_bad_rows))
    summary = describe(report, shown, bool(skip_bad_rows))
    if note:
        summary += f"\n\n{note}"
    preview = render_preview(report, chosen, tokenizer, max_seq_len) if chosen else []
    stats_text = stats_markdown(stats) if stats else ""
    size = {"rows": stats.rows, "tokens_per_epoch": stats.tokens_per_epoch} if stats and usable else {}
    return (source if usable else ""), summary, preview, stats_text, histogram_frame(stats), size


def template_for(model_choice, custom_model) -> str:
    """The prompt format the chosen model trains with unless changed: its catalog entry's, or for
    another model "model" when it ships a chat template, else guanaco. The format stays as it is
    when the catalog cannot be read (the preview then says what is wrong)."""
    try:
        return default_template(selected_model(model_choice, custom_model))
    except EXPECTED:
        return gr.skip()


def describe(report: DataReport, shown: str, skip_bad_rows: bool) -> str:
    if report.ok:
        return f"✅ **{shown}**: {report.row_count:,} rows in **{report.format}** format."
    if report.usable(skip_bad_rows):
        head = (f"✅ **{shown}**: {report.row_count:,} rows in **{report.format}** format will be used; "
                f"**{report.bad_rows:,} bad rows are skipped**, as asked:")
    elif report.row_count and not report.fatal:
        head = (f"❌ **{shown}**: {report.bad_rows:,} bad rows ({len(report.errors):,} problems). Fix "
                f"the file and upload it again, or tick *Skip bad rows* to train on the "
                f"{report.row_count:,} good rows:")
    else:
        head = f"❌ **{shown}** cannot be used: {len(report.errors):,} problem(s):"
    lines = [head] + [f"- {problem}" for problem in report.errors[:MAX_LISTED]]
    if len(report.errors) > MAX_LISTED:
        lines.append(f"- ... and {len(report.errors) - MAX_LISTED:,} more")
    if not report.row_count:
        lines.append("\nRecognised row shapes: " + "; ".join(f"{k}: `{v}`" for k, v in FORMATS.items()))
    return "\n".join(lines)


def render_preview(report: DataReport, template, tokenizer, max_seq_len: int) -> list:
    highlighted = []
    for number, row in enumerate(report.rows[:PREVIEW_ROWS], start=1):
        highlighted.append((f"{chr(10) * 2 if number > 1 else ''}── row at line {row.line} ──\n", None))
        highlighted += preview_row(row, template, tokenizer, max_seq_len)
    return highlighted


def stats_markdown(stats) -> str:
    return "**Token statistics** (the model's tokenizer)\n\n" + "\n".join(
        f"- {line}" for line in stats.summary().splitlines())


def histogram_frame(stats):
    """The histogram's bars, labelled by token range, in length order (not alphabetical)."""
    if stats is None or not stats.rows:
        return None
    bars = stats.histogram()
    labels = [f"{bar['start'] + 1}–{bar['end']}" for bar in bars]
    frame = pd.DataFrame({
        "tokens": labels,
        "rows": [bar["count"] for bar in bars],
        "length": [f"over max_seq_len {stats.max_seq_len}: cut" if bar["cut"] else
                   f"within max_seq_len {stats.max_seq_len}" for bar in bars],
    })
    # Ranges are text, so the plot is told their order; numeric bars would be drawn zero-wide.
    return gr.BarPlot(value=frame, sort=labels)


def check_eval(file, fmt, columns):
    """Returns (eval data path or '', message) for an optional second file used for eval loss."""
    if not file:
        return "", ""
    try:
        source = store_upload(file, uploads_dir())
        report = read_dataset(source, fmt, columns or "", keep=0)
    except UploadError as exc:
        return "", f"❌ {exc}"
    except EXPECTED as exc:
        return "", in_words(exc)
    shown = Path(file).name
    if not report.ok:
        return "", describe(report, shown, False) + "\n\nThe eval file must be clean."
    return str(source), f"✅ Eval file **{shown}**: {report.row_count:,} rows; the eval share is unused."


def build(hardware: dict) -> dict:
    with gr.Row():
        upload = gr.File(label="Training data", file_types=list(SUFFIXES), type="filepath",
                         elem_id="data-upload")
        with gr.Column():
            hub_id = gr.Textbox(label="…or a Hugging Face dataset id (needs a network connection)",
                                placeholder="timdettmers/openassistant-guanaco", elem_id="data-hub")
            fmt = gr.Dropdown(FORMAT_CHOICES, value="auto", label="Row format", elem_id="format-choice")
            columns = gr.Textbox(label="Column mapping (csv/parquet, optional)",
                                 placeholder="prompt=question,completion=answer", elem_id="data-columns")
    with gr.Row():
        template = gr.Dropdown(choices=template_choices(), label="Prompt format",
                               elem_id="template-choice",
                               value=template_for(hardware["model"].value, hardware["custom_model"].value))
        # The Train tab keeps this and its own max_seq_len field the same (train_tab.build).
        max_seq_len = gr.Number(value=DEFAULT_MAX_SEQ_LEN, precision=0, elem_id="data-max-seq-len",
                                label="Max sequence length (tokens)")
        skip = gr.Checkbox(value=False, label="Skip bad rows (train on the good ones)",
                           elem_id="skip-bad-rows")
    summary = gr.Markdown(HINT, elem_id="data-summary")
    preview = gr.HighlightedText(label="Rows as the model sees them (green: trained on; "
                                       "unmarked: context only; red: cut at max length)",
                                 color_map={TRAINED: "green", CUT: "red"}, combine_adjacent=True,
                                 show_legend=True, elem_id="data-preview")
    with gr.Row():
        stats = gr.Markdown(elem_id="data-stats")
        histogram = gr.BarPlot(None, x="tokens", y="rows", color="length", x_label_angle=-45,
                               title="Rows by token length (bar = up to that many tokens)",
                               x_title="tokens per row", y_title="rows", height=280,
                               elem_id="token-histogram")
    with gr.Accordion("Evaluation data", open=False):
        eval_share = gr.Slider(0, 0.2, value=0.0, step=0.01, elem_id="data-eval-share",
                               label="Share of rows held out for eval loss (seeded; 0 = none)")
        eval_upload = gr.File(label="…or a separate eval file", file_types=list(SUFFIXES),
                              type="filepath", elem_id="data-eval-upload")
        eval_message = gr.Markdown(elem_id="data-eval-summary")
    data_path, eval_path, data_size = gr.State(""), gr.State(""), gr.State({})

    inputs = [upload, hub_id, fmt, columns, template, max_seq_len, skip, hardware["model"],
              hardware["custom_model"]]
    outputs = [data_path, summary, preview, stats, histogram, data_size]
    upload.upload(check_data, inputs, outputs, api_name="check_data")
    upload.clear(check_data, inputs, outputs, api_name=False)
    hub_id.submit(check_data, inputs, outputs, api_name=False)
    for control in (fmt, template, skip):
        control.change(check_data, inputs, outputs, api_name=False)
    # The format follows the chosen model (and the preview follows the format); it can still be changed.
    models = [hardware["model"], hardware["custom_model"]]
    hardware["model"].change(template_for, models, template, api_name=False)
    for event in (hardware["custom_model"].submit, hardware["custom_model"].blur):
        event(template_for, models, template, api_name=False)
    columns.submit(check_data, inputs, outputs, api_name=False)
    # Typed here or set from the Train tab (its field, its recipe): the statistics follow.
    max_seq_len.change(check_data, inputs, outputs, api_name=False, show_progress="minimal")
    eval_upload.upload(check_eval, [eval_upload, fmt, columns], [eval_path, eval_message],
                       api_name="check_eval")
    eval_upload.clear(check_eval, [eval_upload, fmt, columns], [eval_path, eval_message],
                      api_name=False)
    # RunConfig field -> component, for the Train tab to pass into the run configuration.
    config_inputs = {"eval_data_path": eval_path, "eval_share": eval_share, "data_format": fmt,
                     "data_columns": columns, "skip_bad_rows": skip}
    return {"data_path": data_path, "data_size": data_size, "template": template,
            "max_seq_len": max_seq_len,
            "config_inputs": config_inputs}
