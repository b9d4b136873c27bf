"""Data tab: upload a .jsonl file, see it validated, and see rows as the model will."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import gradio as gr

from app.hardware_tab import selected_model
from engine.data import FORMATS, read_dataset
from engine.paths import uploads_dir
from engine.preview import preview_rows, preview_template
from engine.templates import TemplateError

TEMPLATES = [
    ("Guanaco (### Human: / ### Assistant:, the QLoRA paper's)", "guanaco"),
    ("Alpaca (### Instruction: / ### Response:)", "alpaca"),
    ("The model's own chat template", "model"),
]
ROW_SEPARATOR = "\n\n"


def store_upload(temp_path: str) -> Path:
    """Copy the upload, unchanged, into the data dir under a generated name (never the user's)."""
    # Named by content: the same file uploaded twice is stored once.
    digest = hashlib.sha256(Path(temp_path).read_bytes()).hexdigest()[:16]
    target = uploads_dir() / f"{digest}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(temp_path, target)
    return target


def check_data(file, template: str, model_choice: str, custom_model: str):
    """Returns (stored path or '', summary markdown, highlighted preview)."""
    if not file:
        return "", "Upload a `.jsonl` file: one JSON object per line.", []
    original = Path(file).name
    if Path(file).suffix.lower() != ".jsonl":
        return "", f"**{original}** is not a `.jsonl` file: save one JSON object per line as .jsonl.", []
    stored = store_upload(file)
    summary, preview = describe(stored, original, template, selected_model(model_choice, custom_model))
    ok = summary.startswith("✅")
    return (str(stored) if ok else ""), summary, preview


def describe(path: Path, original: str, template: str, model: str):
    report = read_dataset(path)
    if report.errors:
        lines = [f"❌ **{original}**: {len(report.errors)} problem(s); fix the file and upload it again."]
        lines += [f"- {problem}" for problem in report.errors[:20]]
        if len(report.errors) > 20:
            lines.append(f"- ... and {len(report.errors) - 20} more")
        lines.append("\nRecognised row shapes: " + "; ".join(f"{k}: `{v}`" for k, v in FORMATS.items()))
        return "\n".join(lines), []
    summary = f"✅ **{original}**: {len(report.rows)} rows in **{report.format}** format."
    try:
        chosen, note = preview_template(model, template)
        rows = preview_rows(report, chosen, count=3)
    except TemplateError as exc:
        return summary + f"\n\n⚠️ Preview unavailable: {exc}", []
    if note:
        summary += f"\n\n{note}"
    summary += "\n\nPreview of the first rows as the model sees them; highlighted text is trained on " \
               "(the assistant's answers), the rest is context only."
    highlighted = []
    for number, segments in enumerate(rows, start=1):
        highlighted.append((f"{ROW_SEPARATOR if number > 1 else ''}── row {number} ──\n", None))
        highlighted += [(text, "trained" if trained else None) for text, trained in segments]
    return summary, highlighted


def build(hardware: dict) -> dict:
    upload = gr.File(label="Training data (.jsonl)", file_types=[".jsonl"], type="filepath",
                     elem_id="data-upload")
    template = gr.Dropdown(choices=TEMPLATES, value="guanaco", label="Prompt format",
                           elem_id="template-choice")
    summary = gr.Markdown("Upload a `.jsonl` file: one JSON object per line.", elem_id="data-summary")
    preview = gr.HighlightedText(label="Preview", color_map={"trained": "green"},
                                 combine_adjacent=True, elem_id="data-preview")
    data_path = gr.State("")
    inputs = [upload, template, hardware["model"], hardware["custom_model"]]
    upload.upload(check_data, inputs, [data_path, summary, preview], api_name="check_data")
    template.change(check_data, inputs, [data_path, summary, preview], api_name=False)
    return {"data_path": data_path, "template": template}
