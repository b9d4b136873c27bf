"""Read a training file (or a Hub dataset) into rows, naming every problem by line and field.

Formats are in engine/formats.py and file types in engine/readers.py; this module puts them
together: it decides the file's one format (the majority of the first rows, or the user's
choice), normalises every row, and collects problems instead of raising, so the user sees all
of them at once. Nothing is dropped silently: a row is either used or a problem with its line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.formats import FORMATS, KEY_FIELD, Problem, detect_format, kind_of, normalise
from engine.readers import Progress, is_hub_id, iter_records

__all__ = ["FORMATS", "DataError", "DataReport", "Problem", "Row", "is_hub_id", "load_conversations",
           "read_dataset"]
DETECT_WINDOW = 1000  # rows looked at to decide a file's format before rows are streamed on
TEXTUAL = ("guanaco", "text")  # both are a `text` field; which one the file is decides the reading


class DataError(ValueError):
    """The file cannot be used as it is; the message names the file, line and field."""


@dataclass
class Row:
    line: int
    messages: list[dict]
    text: str = ""  # set instead of messages for plain-text (pre-training) rows

    @property
    def is_text(self) -> bool:
        return not self.messages


@dataclass
class DataReport:
    path: str
    format: str = ""
    rows: list[Row] = field(default_factory=list)  # all rows, or the first `keep` of them
    errors: list[Problem] = field(default_factory=list)
    row_count: int = 0  # usable rows, also those not kept in `rows`

    @property
    def ok(self) -> bool:
        return bool(self.row_count) and not self.errors

    @property
    def bad_rows(self) -> int:
        return len({p.line for p in self.errors if p.line})

    @property
    def fatal(self) -> bool:
        """A problem that skipping bad rows cannot remedy: the file or a part of it is unreadable."""
        return any(p.fatal or not p.line for p in self.errors)

    def usable(self, skip_bad_rows: bool) -> bool:
        return bool(self.row_count) and not self.fatal and (skip_bad_rows or not self.errors)

    def summary(self, max_errors: int = 10) -> str:
        name = Path(self.path).name or self.path
        if not self.errors:
            return f"{name}: {self.row_count} rows in {self.format} format"
        head = f"{name}: {len(self.errors)} problem(s) in {self.bad_rows} row(s)"
        if self.format:
            head += f" ({self.row_count} good rows in {self.format} format)"
        lines = [head] + [f"  {p}" for p in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"  ... and {len(self.errors) - max_errors} more")
        return "\n".join(lines)

    def to_dict(self, max_errors: int = 200) -> dict:
        return {
            "file": self.path,
            "path": self.path,
            "format": self.format,
            "rows": self.row_count,
            "ok": self.ok,
            "bad_rows": self.bad_rows,
            "errors": [
                {"file": self.path, "line": p.line, "field": p.field, "message": p.message}
                for p in self.errors[:max_errors]
            ],
            "error_count": len(self.errors),
        }


def read_dataset(source: str | Path, fmt: str = "auto", columns: str = "",
                 progress: Progress | None = None, keep: int | None = None,
                 on_row: Callable[[Row], None] | None = None) -> DataReport:
    """Parse and validate a data file; problems are collected, not raised.

    fmt: "auto" or one of FORMATS (then every row is read in that format). keep: how many rows to
    hold in report.rows (None = all); every usable row is still counted and passed to on_row, so
    statistics can stream over a large file without holding it.
    """
    report = DataReport(path=str(source))
    if fmt not in ("auto", *FORMATS):
        report.errors.append(Problem(0, "format", f"unknown format '{fmt}': use auto or one of "
                                                  f"{', '.join(FORMATS)}", fatal=True))
        return report
    reader = _Reader(report, None if fmt == "auto" else fmt, keep, on_row)
    for record in iter_records(str(source), columns, progress):
        if isinstance(record, Problem):
            report.errors.append(record)
        else:
            reader.add(*record)
    reader.finish()
    if not report.row_count and not report.errors:
        report.errors.append(Problem(0, "", "the file has no rows (it is empty or only blank lines)"))
    report.errors.sort(key=lambda p: p.line)
    return report


class _Reader:
    """Decides the file's format from its first rows, then normalises each row as it comes."""

    def __init__(self, report: DataReport, fmt: str | None, keep: int | None, on_row):
        self.report, self.keep, self.on_row = report, keep, on_row
        self.auto = fmt is None
        report.format = fmt or ""
        self.pending: list[tuple[int, dict, str]] = []

    def add(self, line: int, obj) -> None:
        errors = self.report.errors
        if not isinstance(obj, dict):
            errors.append(Problem(line, "", f"a row must be a JSON object, got {kind_of(obj)}"))
            return
        detected = detect_format(obj)
        if self.auto and detected is None:
            keys = ", ".join(sorted(map(str, obj))) or "none"
            errors.append(Problem(line, "", f"unrecognised row (keys: {keys}): name its fields as "
                                            f"in one of the formats ({', '.join(FORMATS)}), or map "
                                            "csv/parquet columns, e.g. prompt=question,completion=answer"))
            return
        if not self.report.format:
            self.pending.append((line, obj, detected))
            if len(self.pending) >= DETECT_WINDOW:
                self._decide()
            return
        self._accept(line, obj, detected)

    def finish(self) -> None:
        if self.pending:
            self._decide()

    def _decide(self) -> None:
        self.report.format = Counter(d for _, _, d in self.pending).most_common(1)[0][0]
        pending, self.pending = self.pending, []
        for line, obj, detected in pending:
            self._accept(line, obj, detected)

    def _accept(self, line: int, obj: dict, detected: str | None) -> None:
        report, fmt = self.report, self.report.format
        mixed = self.auto and detected != fmt and not (detected in TEXTUAL and fmt in TEXTUAL)
        before = len(report.errors)
        # A row in another format is still checked in its own: its own mistakes are the useful news.
        payload = normalise(detected if mixed else fmt, obj, line, report.errors)
        if len(report.errors) != before:
            return
        if mixed:
            report.errors.append(Problem(line, KEY_FIELD[detected], (
                f"this row is in {detected} format, but the file is in {fmt} format: use one format "
                "per file (or choose the format yourself)")))
            return
        row = Row(line, [], payload) if isinstance(payload, str) else Row(line, payload)
        report.row_count += 1
        if self.keep is None or len(report.rows) < self.keep:
            report.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)


def load_conversations(source: str | Path, fmt: str = "auto", columns: str = "",
                       skip_bad_rows: bool = False) -> DataReport:
    """Like read_dataset, but raise DataError unless the rows can be trained on.

    With skip_bad_rows, rows with problems are left out (report.bad_rows says how many); a file
    that cannot be read, or has no usable row, still raises.
    """
    report = read_dataset(source, fmt, columns)
    if not report.usable(skip_bad_rows):
        if report.errors and not report.row_count and not report.fatal:
            raise DataError(f"no usable rows: every row has a problem. {report.summary()}")
        raise DataError(report.summary())
    return report
