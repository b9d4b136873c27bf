"""Rows as the model will see them: the rendered prompt text, split into trained and masked parts."""

from __future__ import annotations

from engine.data import DataReport
from engine.models import ModelError, load_tokenizer, resolve_model
from engine.templates import Template, TemplateError, assistant_spans, get_template


def preview_template(model: str, template: str) -> tuple[Template, str]:
    """The template with the model's own tokenizer, or a note saying why a stand-in is used."""
    try:
        tokenizer = load_tokenizer(resolve_model(model))
    except ModelError as exc:
        if template == "model":
            raise TemplateError(f"cannot show the model's chat template: {exc}") from exc
        return Template(template, eos="</s>"), f"Tokenizer not available ({exc}); '</s>' stands for EOS."
    return get_template(template, tokenizer), ""


def preview_rows(report: DataReport, template: Template, count: int = 3) -> list[list[tuple[str, bool]]]:
    """For the first `count` rows, (text, trained) segments that together are the rendered row."""
    previews = []
    for row in report.rows[:count]:
        text, spans = assistant_spans(template, row.messages)
        segments, position = [], 0
        for start, end in spans:
            if start > position:
                segments.append((text[position:start], False))
            segments.append((text[start:end], True))
            position = end
        if position < len(text):
            segments.append((text[position:], False))
        previews.append(segments)
    return previews
