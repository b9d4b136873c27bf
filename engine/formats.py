"""Row shapes: recognise which format a row is in, and turn it into messages, naming each problem.

Every conversational shape becomes the same thing, a list of {"role", "content"} messages with
roles system/user/assistant, so templates and tokenisation have one input to handle. Plain `text`
rows (continued pre-training) stay text: they are trained on every token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = {
    "alpaca": '{"instruction", "input" (optional), "output", "system"/"history" (optional)}',
    "chat": '{"messages": [{"role", "content"}, ...]}',
    "sharegpt": '{"conversations": [{"from": "human"/"gpt"/"system", "value"}, ...]}',
    "completion": '{"prompt", "completion"}',
    "guanaco": '{"text": "### Human: ...### Assistant: ..."}',
    "text": '{"text": "..."} (plain text for continued pre-training: every token trained)',
}
ROLES = ("system", "user", "assistant")
# ShareGPT exports name the speakers after the product they came from; these are the common ones.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "claude": "assistant",
}
GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:")
# The key that gives each format away, named as the field of a row in the wrong format.
KEY_FIELD = {"chat": "messages", "sharegpt": "conversations", "alpaca": "instruction",
             "completion": "prompt", "guanaco": "text", "text": "text"}


@dataclass
class Problem:
    line: int  # 1-based line in the file (a row number for parquet and Hub data; 0 = the whole file)
    field: str
    message: str
    fatal: bool = False  # the rest of the file could not be read: skipping bad rows is no remedy

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        field = f", field '{self.field}'" if self.field else ""
        return f"{where}{field}: {self.message}"


def detect_format(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or ("output" in obj and "input" in obj):
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "completion"
    if "text" in obj:
        text = obj["text"]
        return "guanaco" if isinstance(text, str) and GUANACO_TURN.search(text) else "text"
    return None


def normalise(fmt: str, obj: dict, line: int, errors: list[Problem]) -> list[dict] | str:
    """Messages (or the text of a `text` row); problems are appended to `errors`."""
    return NORMALISERS[fmt](obj, line, errors)


def _alpaca(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    instruction = _text_field(obj, "instruction", line, errors)
    extra = _text_field(obj, "input", line, errors, required=False)
    output = _text_field(obj, "output", line, errors)
    system = _text_field(obj, "system", line, errors, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    messages += _alpaca_history(obj.get("history"), line, errors)
    user = instruction + ("\n\n" + extra if extra else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _alpaca_history(history, line: int, errors: list[Problem]) -> list[dict]:
    """Earlier turns as [[instruction, response], ...], the shape LLaMA-Factory and others use."""
    if history is None:
        return []
    if not isinstance(history, list):
        errors.append(Problem(line, "history", f"must be a list of [question, answer] pairs, got {kind_of(history)}"))
        return []
    messages = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)
        if not ok:
            errors.append(Problem(line, f"history[{i}]", "must be a pair of non-empty texts [question, answer]"))
            continue
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _completion(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    prompt = _text_field(obj, "prompt", line, errors)
    completion = _text_field(obj, "completion", line, errors)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _chat(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    return _turns(obj, "messages", "role", "content", {r: r for r in ROLES}, line, errors)


def _sharegpt(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    return _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES, line, errors)


def _turns(obj, key, role_key, content_key, roles, line, errors) -> list[dict]:
    raw = obj.get(key)
    if not isinstance(raw, list) or not raw:
        errors.append(Problem(line, key, f"must be a non-empty list of messages, got {kind_of(raw)}"))
        return []
    messages = []
    problems_before = len(errors)
    known = ", ".join(sorted(set(roles)))
    for i, message in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            errors.append(Problem(line, where, f"must be an object with {role_key} and {content_key}, "
                                               f"got {kind_of(message)}"))
            continue
        name, content = message.get(role_key), message.get(content_key)
        role = roles.get(name.lower()) if isinstance(name, str) else None
        if role is None:
            errors.append(Problem(line, f"{where}.{role_key}", f"unknown role {name!r}: use {known}"))
            continue
        if not isinstance(content, str):
            errors.append(Problem(line, f"{where}.{content_key}", f"must be text, got {kind_of(content)}"))
            continue
        if not content.strip():
            errors.append(Problem(line, f"{where}.{content_key}", "is empty"))
            continue
        if role == "system" and i != 0:
            errors.append(Problem(line, f"{where}.{role_key}", "a system message may only come first"))
            continue
        messages.append({"role": role, "content": content})
    if len(errors) == problems_before:  # turn order of a partly skipped list would mislead
        _check_turns(messages, line, key, errors)
    return messages


def _guanaco(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    text = _text_field(obj, "text", line, errors)
    if not text:
        return []
    parts = GUANACO_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        errors.append(Problem(line, "text", "must consist of '### Human: ...' and '### Assistant: ...' "
                              "turns (text before the first '### Human:' is not allowed)"))
        return []
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if not content.strip():
            errors.append(Problem(line, "text", f"a '### {speaker}:' turn is empty"))
            return []
        messages.append({"role": role, "content": content.strip()})
    _check_turns(messages, line, "text", errors)
    return messages


def _text(obj: dict, line: int, errors: list[Problem]) -> str:
    return _text_field(obj, "text", line, errors)


def _check_turns(messages: list[dict], line: int, where: str, errors: list[Problem]) -> None:
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns:
        errors.append(Problem(line, where, "has no user or assistant turn"))
    elif turns[-1] != "assistant":
        errors.append(Problem(line, where, "the conversation must end with an assistant turn "
                              "(that is what the model learns to write)"))
    elif turns[0] != "user":
        errors.append(Problem(line, where, "the conversation must start with a user turn"))
    elif any(a == b for a, b in zip(turns, turns[1:])):
        errors.append(Problem(line, where, "user and assistant turns must alternate"))


NORMALISERS = {"alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "completion": _completion,
               "guanaco": _guanaco, "text": _text}


def _text_field(obj: dict, name: str, line: int, errors: list[Problem], required: bool = True) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            errors.append(Problem(line, name, "is missing"))
        return ""
    if not isinstance(value, str):
        errors.append(Problem(line, name, f"must be text, got {kind_of(value)}"))
        return ""
    if required and not value.strip():
        errors.append(Problem(line, name, "is empty"))
    return value


def kind_of(value) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)
