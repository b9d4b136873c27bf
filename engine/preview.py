"""Rows as the model will see them: the rendered text, split token by token into trained, masked
and cut (beyond max_seq_len) parts, using the same encode() as training."""

from __future__ import annotations

from engine.data import Row
from engine.models import ModelError, load_tokenizer, resolve_model
from engine.templates import (
    IGNORE_INDEX,
    Template,
    TemplateError,
    assistant_spans,
    get_template,
    tokens_with_labels,
)

TRAINED, CUT = "trained", "cut"  # labels of preview segments; None = context the model only reads


def preview_template(model: str, template: str) -> tuple[Template, object, str]:
    """(template, tokenizer or None, note): the model's own tokenizer, or a note saying why not."""
    try:
        tokenizer = load_tokenizer(resolve_model(model))
    except ModelError as exc:
        if template == "model":
            raise TemplateError(f"cannot show the model's chat template: {exc}") from exc
        note = f"Tokenizer not available ({exc}); '</s>' stands for EOS and token statistics are skipped."
        return Template(template, eos="</s>"), None, note
    return get_template(template, tokenizer), tokenizer, ""


def preview_row(row: Row, template: Template, tokenizer, max_seq_len: int) -> list[tuple[str, str | None]]:
    """(text, label) segments that together are the rendered row; label TRAINED, CUT or None."""
    if tokenizer is None:
        return _by_characters(row, template)
    if row.is_text:  # every token is trained, and packing cuts nothing
        return [(row.text + (tokenizer.eos_token or ""), TRAINED)]
    full = tokens_with_labels(tokenizer, template, row.messages)
    text, segments, position = full["text"], [], 0
    for index, ((_, end), label) in enumerate(zip(full["offsets"], full["labels"])):
        if end <= position:
            continue  # a token without text of its own (e.g. an added BOS)
        kind = CUT if index >= max_seq_len else (TRAINED if label != IGNORE_INDEX else None)
        segments.append((text[position:end], kind))
        position = end
    if position < len(text):
        segments.append((text[position:], CUT if len(full["input_ids"]) > max_seq_len else None))
    return _merge(segments)


def _by_characters(row: Row, template: Template) -> list[tuple[str, str | None]]:
    if row.is_text:
        return [(row.text + template.eos, TRAINED)]
    text, spans = assistant_spans(template, row.messages)
    segments, position = [], 0
    for start, end in spans:
        segments += [(text[position:start], None), (text[start:end], TRAINED)]
        position = end
    segments.append((text[position:], None))
    return _merge(segments)


def _merge(segments: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    merged: list[tuple[str, str | None]] = []
    for text, label in segments:
        if not text:
            continue
        if merged and merged[-1][1] == label:
            merged[-1] = (merged[-1][0] + text, label)
        else:
            merged.append((text, label))
    return merged
