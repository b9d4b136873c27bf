"""Read a JSONL training file into conversations, naming every problem by line and field.

Every supported row shape becomes the same thing, a list of {"role", "content"} messages with
roles system/user/assistant, so templates and tokenisation have one input to handle.
Nothing is dropped silently: a row is either a conversation or a problem with its line number.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = {
    "alpaca": '{"instruction", "input" (optional), "output"}',
    "chat": '{"messages": [{"role", "content"}, ...]}',
    "guanaco": '{"text": "### Human: ...### Assistant: ..."}',
    "completion": '{"prompt", "completion"}',
}
ROLES = ("system", "user", "assistant")
GUANACO_TURN = re.compile(r"###\s*(Human|Assistant)\s*:")


class DataError(ValueError):
    """The file cannot be used as it is; the message names the file, line and field."""


@dataclass
class Problem:
    line: int  # 1-based line in the file (0 = the file as a whole)
    field: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        field = f", field '{self.field}'" if self.field else ""
        return f"{where}{field}: {self.message}"


@dataclass
class Row:
    line: int
    messages: list[dict]


@dataclass
class DataReport:
    path: str
    format: str = ""
    rows: list[Row] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and not self.errors

    def summary(self, max_errors: int = 10) -> str:
        name = Path(self.path).name
        if not self.errors:
            return f"{name}: {len(self.rows)} rows in {self.format} format"
        head = f"{name}: {len(self.errors)} problem(s)"
        if self.format:
            head += f" ({len(self.rows)} good rows in {self.format} format)"
        lines = [head] + [f"  {p}" for p in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"  ... and {len(self.errors) - max_errors} more")
        return "\n".join(lines)

    def to_dict(self, max_errors: int = 200) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "rows": len(self.rows),
            "ok": self.ok,
            "errors": [
                {"line": p.line, "field": p.field, "message": p.message}
                for p in self.errors[:max_errors]
            ],
            "error_count": len(self.errors),
        }


def read_dataset(path: str | Path) -> DataReport:
    """Parse and validate a .jsonl file; problems are collected, not raised."""
    path = Path(path)
    report = DataReport(path=str(path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        report.errors.append(Problem(0, "", f"file not found: {path}"))
        return report
    except OSError as exc:
        report.errors.append(Problem(0, "", f"cannot read {path}: {exc.strerror}"))
        return report
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as some editors on Windows write
    parsed: list[tuple[int, str, list[dict]]] = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        text = _decode(line_bytes, number, report)
        if text is None or not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            report.errors.append(Problem(number, "", f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(obj, dict):
            report.errors.append(Problem(number, "", f"a row must be a JSON object, got {_kind(obj)}"))
            continue
        fmt = detect_format(obj)
        if fmt is None:
            keys = ", ".join(sorted(obj)) or "none"
            report.errors.append(Problem(number, "", f"unrecognised row (keys: {keys}); expected one "
                                         f"of: {'; '.join(FORMATS.values())}"))
            continue
        problems_before = len(report.errors)
        messages = NORMALISERS[fmt](obj, number, report.errors)
        if len(report.errors) == problems_before:
            parsed.append((number, fmt, messages))
    if not parsed and not report.errors:
        report.errors.append(Problem(0, "", "the file has no rows (it is empty or only blank lines)"))
        return report
    if parsed:
        report.format = Counter(fmt for _, fmt, _ in parsed).most_common(1)[0][0]
    for number, fmt, messages in parsed:
        if fmt != report.format:
            report.errors.append(Problem(number, "", f"this row is in {fmt} format, but the file is in "
                                         f"{report.format} format: use one format per file"))
        else:
            report.rows.append(Row(number, messages))
    report.errors.sort(key=lambda p: p.line)
    return report


def load_conversations(path: str | Path) -> DataReport:
    """Like read_dataset, but raise DataError when anything is wrong: training uses only clean files."""
    report = read_dataset(path)
    if not report.ok:
        raise DataError(report.summary())
    return report


def detect_format(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or ("output" in obj and "input" in obj):
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "completion"
    if "text" in obj:
        return "guanaco"
    return None


def _alpaca(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    instruction = _text_field(obj, "instruction", line, errors)
    extra = _text_field(obj, "input", line, errors, required=False)
    output = _text_field(obj, "output", line, errors)
    system = _text_field(obj, "system", line, errors, required=False)
    user = instruction + ("\n\n" + extra if extra else "")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _completion(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    prompt = _text_field(obj, "prompt", line, errors)
    completion = _text_field(obj, "completion", line, errors)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _chat(obj: dict, line: int, errors: list[Problem]) -> list[dict]:
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        errors.append(Problem(line, "messages", f"must be a non-empty list of messages, got {_kind(raw)}"))
        return []
    messages = []
    problems_before = len(errors)
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            errors.append(Problem(line, where, f"must be an object with role and content, got {_kind(message)}"))
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            errors.append(Problem(line, f"{where}.role", f"unknown role {role!r}: use system, user or assistant"))
            continue
        if not isinstance(content, str):
            errors.append(Problem(line, f"{where}.content", f"must be text, got {_kind(content)}"))
            continue
        if not content.strip():
            errors.append(Problem(line, f"{where}.content", "is empty"))
            continue
        if role == "system" and i != 0:
            errors.append(Problem(line, f"{where}.role", "a system message may only come first"))
            continue
        messages.append({"role": role, "content": content})
    if len(errors) == problems_before:  # turn order of a partly skipped list would mislead
        _check_turns(messages, line, "messages", errors)
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


NORMALISERS = {"alpaca": _alpaca, "chat": _chat, "guanaco": _guanaco, "completion": _completion}


def _text_field(obj: dict, name: str, line: int, errors: list[Problem], required: bool = True) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            errors.append(Problem(line, name, "is missing"))
        return ""
    if not isinstance(value, str):
        errors.append(Problem(line, name, f"must be text, got {_kind(value)}"))
        return ""
    if required and not value.strip():
        errors.append(Problem(line, name, "is empty"))
    return value


def _decode(line_bytes: bytes, number: int, report: DataReport) -> str | None:
    try:
        return line_bytes.decode("utf-8").rstrip("\r")  # CRLF files from Windows editors
    except UnicodeDecodeError as exc:
        report.errors.append(Problem(number, "", f"not valid UTF-8 (byte {exc.start + 1} of the line); "
                                     "save the file as UTF-8"))
        return None


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)
