"""Prompt templates, and the one place where a conversation becomes token ids and loss labels.

A template renders messages to text. Which tokens are trained is found from the rendered text
itself: the characters of each assistant turn are the span between the prompt that asks for it
(the conversation so far plus the generation prompt) and the conversation including it. Offsets
from the fast tokenizer then map those character spans to tokens, so training and chat tokenise
exactly the same string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)


class TemplateError(ValueError):
    """A template cannot render this model's conversations; the message says what to choose instead."""


@dataclass(frozen=True)
class TemplateSpec:
    """One prompt format. Turns are format strings with {content}, and {eos} for the assistant's:
    EOS after each answer is what teaches the model to stop."""

    label: str  # what people see in the UI's dropdown
    system: str = ""
    user: str = ""
    assistant: str = ""
    generation_prompt: str = ""  # what asks the model to answer; a prefix of the assistant turn
    preamble: str = ""  # written first, unless the conversation opens with its own system message
    stop_strings: tuple[str, ...] = ()  # the next user turn: where chat stops generating
    # Chat templates write their own BOS/special tokens; text templates rely on the tokenizer's.
    add_special_tokens: bool = True
    chat_template: bool = False  # render with the tokenizer's own chat template (only "model")


# The one registry of prompt templates: config validation, the CLI, the catalog and the UI read
# their names from here, so adding a text template is one entry.
TEMPLATES: dict[str, TemplateSpec] = {
    # The Guanaco/OASST format of the QLoRA paper.
    "guanaco": TemplateSpec(
        label="Guanaco (### Human: / ### Assistant:, the QLoRA paper's)",
        system="{content}\n",
        user="### Human: {content}",
        assistant="### Assistant: {content}{eos}",
        generation_prompt="### Assistant:",
        stop_strings=("### Human:",),
    ),
    "alpaca": TemplateSpec(
        label="Alpaca (### Instruction: / ### Response:)",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant="### Response:\n{content}{eos}\n\n",
        generation_prompt="### Response:\n",
        preamble=ALPACA_PREAMBLE,
        stop_strings=("### Instruction:",),
    ),
    "model": TemplateSpec(
        label="The model's own chat template", add_special_tokens=False, chat_template=True
    ),
}


def template_names() -> list[str]:
    """Every template's name, "model" included, in the registry's order."""
    return list(TEMPLATES)


def template_choices() -> list[tuple[str, str]]:
    """(label, name) pairs for a dropdown."""
    return [(spec.label, name) for name, spec in TEMPLATES.items()]


def _in_words(names: list[str]) -> str:
    """["guanaco", "alpaca", "model"] -> "guanaco, alpaca or model", for messages."""
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def _text_templates() -> str:
    return _in_words([name for name, spec in TEMPLATES.items() if not spec.chat_template])


@dataclass
class Template:
    name: str
    eos: str = ""
    chat_template_tokenizer: object = None  # only for name == "model"

    @property
    def spec(self) -> TemplateSpec:
        return TEMPLATES[self.name]

    @property
    def add_special_tokens(self) -> bool:
        return self.spec.add_special_tokens

    @property
    def stop_strings(self) -> list[str]:
        return list(self.spec.stop_strings)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        spec = self.spec
        if spec.chat_template:
            from jinja2 import TemplateError as JinjaError

            try:
                return self.chat_template_tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except JinjaError as exc:  # the template's own refusal, e.g. Gemma's "System role not supported"
                raise TemplateError(
                    f"this model's chat template refuses the conversation: {exc}. Change the rows "
                    f"(Gemma, for one, takes no system messages) or choose {_text_templates()}"
                ) from exc
        text = ""
        for message in messages:
            text += self._turn(message["role"], message["content"], first=not text)
        if add_generation_prompt:
            if not text:
                text = spec.preamble
            text += spec.generation_prompt
        return text

    def _turn(self, role: str, content: str, first: bool) -> str:
        spec = self.spec
        preamble = spec.preamble if first and role != "system" else ""
        turn = {"system": spec.system, "user": spec.user, "assistant": spec.assistant}[role]
        return preamble + turn.format(content=content, eos=self.eos)


def get_template(name: str, tokenizer) -> Template:
    spec = TEMPLATES.get(name)
    if spec is None:
        raise TemplateError(f"unknown prompt template '{name}': use {_in_words(template_names())}")
    if spec.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"this model has no chat template of its own: choose {_text_templates()}"
            )
        return Template(name, tokenizer.eos_token or "", tokenizer)
    return Template(name, tokenizer.eos_token or "")


def assistant_spans(template: Template, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = template.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1])
        if not text.startswith(upto) and template.eos and upto.endswith(template.eos):
            # Some chat templates (Phi-3's) close a finished conversation with EOS: mid-conversation
            # that EOS is not there, and the answer's span ends before it.
            upto = upto[: -len(template.eos)]
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise TemplateError(
                f"the '{template.name}' template does not render conversations incrementally, "
                f"so the assistant's tokens cannot be found: choose {_text_templates()}"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokens_with_labels(tokenizer, template: Template, messages: list[dict]) -> dict:
    """The whole rendered row: text, token ids, each token's character offsets and its label."""
    text, spans = assistant_spans(template, messages)
    encoded = tokenizer(
        text, add_special_tokens=template.add_special_tokens, return_offsets_mapping=True
    )
    input_ids = encoded["input_ids"]
    labels = []
    for token_id, (start, end) in zip(input_ids, encoded["offset_mapping"]):
        trained = end > start and any(s <= start < e for s, e in spans)
        labels.append(token_id if trained else IGNORE_INDEX)
    return {"text": text, "input_ids": input_ids, "offsets": encoded["offset_mapping"], "labels": labels}


def encode(tokenizer, template: Template, messages: list[dict], max_seq_len: int) -> dict:
    """Token ids with labels only on assistant tokens (the prompt's are IGNORE_INDEX)."""
    full = tokens_with_labels(tokenizer, template, messages)
    input_ids = full["input_ids"]
    return {
        "input_ids": input_ids[:max_seq_len],
        "attention_mask": [1] * min(len(input_ids), max_seq_len),
        "labels": full["labels"][:max_seq_len],
        "length": len(input_ids),  # before truncation, so callers can count what was cut
    }


def text_tokens(tokenizer, text: str) -> list[int]:
    """A plain-text (pre-training) row: its tokens and EOS, so documents stay apart once packed."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def pack(token_lists, block_size: int) -> list[dict]:
    """Concatenate plain-text rows and cut them into blocks of block_size; every token is trained.

    Packing wastes no compute on padding and cuts nothing away: a long document simply continues
    in the next block (the standard recipe for continued pre-training).
    """
    blocks, current = [], []
    for ids in token_lists:
        current.extend(ids)
        while len(current) >= block_size:
            blocks.append(current[:block_size])
            current = current[block_size:]
    if current:
        blocks.append(current)
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]


def jinja_chat_template(name: str, bos_token: bool = False) -> str:
    """A Jinja chat template (as transformers, llama.cpp and Ollama's importers read them) that
    renders exactly what Template(name).render() renders, so a merged or exported model prompted
    with `apply_chat_template` sees the text it was trained on. bos_token: begin with BOS, for
    tokenizers that add it to every text (apply_chat_template adds no special tokens itself).

    Every literal is a quoted Jinja string and every tag trims the whitespace around it, so the
    environment's trim_blocks/lstrip_blocks settings cannot change the output."""
    spec = TEMPLATES.get(name)
    if spec is None or spec.chat_template:
        raise TemplateError(f"'{name}' is not a text template: use {_text_templates()}")

    def text(value: str) -> str:
        return "{{ " + json.dumps(value) + " }}" if value else ""

    def turn(fmt: str) -> str:
        """A turn's format string as one Jinja expression: its literals, the message, EOS."""
        fields = {"{content}": "message['content']", "{eos}": "eos_token"}
        parts = [fields.get(part) or json.dumps(part)
                 for part in re.split(r"(\{content\}|\{eos\})", fmt) if part]
        return " ~ ".join(parts) or '""'

    # `first` in Template.render is "nothing written yet"; a namespace carries it through the loop.
    return (
        "{%- set state = namespace(empty=true) -%}" + ("{{- bos_token -}}" if bos_token else "")
        + "{%- for message in messages -%}"
        + "{%- if message['role'] == 'system' -%}{%- set turn = " + turn(spec.system) + " -%}"
        + "{%- elif message['role'] == 'user' -%}{%- set turn = " + turn(spec.user) + " -%}"
        + "{%- elif message['role'] == 'assistant' -%}"
        + "{%- set turn = " + turn(spec.assistant) + " -%}"
        + "{%- else -%}{{- raise_exception('unknown role ' ~ message['role'] ~ ': use system, user "
          "or assistant') -}}{%- endif -%}"
        + "{%- if state.empty and message['role'] != 'system' -%}" + text(spec.preamble)
        + "{%- endif -%}{{- turn -}}{%- if turn -%}{%- set state.empty = false -%}{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{%- if state.empty -%}" + text(spec.preamble)
        + "{%- endif -%}" + text(spec.generation_prompt) + "{%- endif -%}"
    )
