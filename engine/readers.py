"""File readers: each yields (line, record) pairs, or a Problem where a line cannot be read.

Files are read streaming (one line or one batch at a time), so a 100 MB upload is never held
twice; `progress(fraction, text)` is called now and then so a UI can show a bar. A record is a
dict with the row's fields; csv/parquet columns are renamed by a mapping such as
"prompt=question,completion=answer".
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.formats import Problem
from engine.rundir import replace_file

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PROGRESS_EVERY = 5000  # rows between progress calls: often enough for a bar, rare enough to cost nothing
# Columns that hold lists; a csv cell can carry them as JSON text.
LIST_COLUMNS = ("messages", "conversations", "history")
Progress = Callable[[float, str], None]
TOO_DEEP = "JSON nested too deeply to read (thousands of levels): no training row looks like this"
Record = tuple[int, dict] | Problem


class UploadError(ValueError):
    """An uploaded file is refused before it is stored; the message says why and what to do."""


def is_hub_id(source: str) -> bool:
    """'org/name' that is not a local path: a dataset on the Hugging Face Hub."""
    return bool(HUB_ID.match(source)) and not Path(source).exists()


def iter_records(source: str, columns: str = "", progress: Progress | None = None) -> Iterator[Record]:
    path = Path(source)
    progress = progress or _silent
    if path.is_dir() or is_hub_id(source):
        yield from _hub(source, progress)
        return
    if not path.is_file():
        yield Problem(0, "", f"file not found: {source}", fatal=True)
        return
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        yield Problem(0, "", f"{path.name}: unsupported file type '{suffix}': use "
                             f"{', '.join(SUFFIXES)}", fatal=True)
        return
    try:
        mapping = parse_columns(columns)
    except ValueError as exc:
        yield Problem(0, "columns", str(exc), fatal=True)
        return
    reader = {".jsonl": _jsonl, ".json": _json_array, ".csv": _csv, ".parquet": _parquet}[suffix]
    try:
        for record in reader(path, progress):
            yield record if isinstance(record, Problem) else (record[0], _rename(record[1], mapping))
    except OSError as exc:
        yield Problem(0, "", f"cannot read {path.name}: {exc.strerror or exc}", fatal=True)


def parse_columns(text: str) -> dict[str, str]:
    """'prompt=question,completion=answer' -> {"question": "prompt", "answer": "completion"}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not field or not column:
            raise ValueError(f"column mapping '{part}' must look like field=column, "
                             "e.g. prompt=question,completion=answer")
        mapping[column] = field
    return mapping


def _rename(record: dict, mapping: dict[str, str]) -> dict:
    if not mapping:
        return record
    return {mapping[key]: value for key, value in record.items() if key in mapping}


def _silent(fraction: float, text: str) -> None:
    pass


def _jsonl(path: Path, progress: Progress) -> Iterator[Record]:
    size = max(path.stat().st_size, 1)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors on Windows write
            if number % PROGRESS_EVERY == 0:
                progress(handle.tell() / size, f"read {number:,} lines")
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # CRLF files from Windows editors
            except UnicodeDecodeError as exc:
                yield Problem(number, "", f"not valid UTF-8 (byte {exc.start + 1} of the line); "
                                          "save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Problem(number, "", f"invalid JSON ({exc.msg} at column {exc.colno})")
            except RecursionError:
                yield Problem(number, "", TOO_DEEP)
            else:
                yield number, obj
    progress(1.0, f"read {path.name}")


def _json_array(path: Path, progress: Progress) -> Iterator[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        yield Problem(line, "", "not valid UTF-8: save the file as UTF-8", fatal=True)
        return
    del raw  # from here on only the decoded text is held
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    position, count = _skip_space(text, 0), 0
    if not text.startswith("[", position):
        yield Problem(lines.at(position), "", "a .json file must hold one array of rows: [ {...}, {...} ] "
                                              "(for one object per line, name the file .jsonl)", fatal=True)
        return
    position = _skip_space(text, position + 1)
    while position < len(text) and text[position] != "]":
        try:
            obj, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            yield Problem(exc.lineno, "", f"invalid JSON ({exc.msg} at column {exc.colno}); "
                                          "the rows after it cannot be read", fatal=True)
            return
        except RecursionError:
            yield Problem(lines.at(position), "", TOO_DEEP, fatal=True)
            return
        yield lines.at(position), obj
        count += 1
        if count % PROGRESS_EVERY == 0:
            progress(end / len(text), f"read {count:,} rows")
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif not text.startswith("]", position):
            yield Problem(lines.at(position), "", "expected ',' or ']' after a row", fatal=True)
            return
    if position >= len(text):
        yield Problem(lines.at(position), "", "the array is not closed with ']'", fatal=True)
    progress(1.0, f"read {path.name}")


class _LineCounter:
    """1-based line of a position, counting newlines incrementally (positions only move forward)."""

    def __init__(self, text: str):
        self.text, self.position, self.line = text, 0, 1

    def at(self, position: int) -> int:
        self.line += self.text.count("\n", self.position, position)
        self.position = position
        return self.line


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _csv(path: Path, progress: Progress) -> Iterator[Record]:
    size = max(path.stat().st_size, 1)
    # surrogateescape keeps reading past bytes that are not UTF-8, so their row can be named.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return
            if _has_bad_bytes(header):
                yield Problem(1, "", "the header is not valid UTF-8: save the file as UTF-8", fatal=True)
                return
            header = [name.strip() for name in header]
            last_line, count = reader.line_num, 0
            for values in reader:
                line, last_line = last_line + 1, reader.line_num
                if not values or not any(v.strip() for v in values):
                    continue  # a blank line
                count += 1
                if count % PROGRESS_EVERY == 0:
                    progress(min(handle.tell() / size, 1.0), f"read {count:,} rows")
                if _has_bad_bytes(values):
                    yield Problem(line, "", "not valid UTF-8: save the file as UTF-8")
                elif len(values) != len(header):
                    yield Problem(line, "", f"has {len(values)} values but the header names "
                                            f"{len(header)} columns")
                else:
                    yield line, _list_cells(dict(zip(header, values)))
        except csv.Error as exc:
            yield Problem(reader.line_num, "", f"not readable as CSV ({exc})", fatal=True)
    progress(1.0, f"read {path.name}")


def _has_bad_bytes(values: list[str]) -> bool:
    return any(any("\udc80" <= ch <= "\udcff" for ch in value) for value in values)


def _list_cells(record: dict) -> dict:
    """A csv cell can only hold text: list-valued columns are read from JSON text in the cell."""
    for key, value in record.items():
        if value.lstrip().startswith("["):
            try:
                record[key] = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                pass  # left as text; the row's check then says the field must be a list
    return record


def _parquet(path: Path, progress: Progress) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pyarrow.ArrowException as exc:
        yield Problem(0, "", f"{path.name} is not a readable parquet file ({exc})", fatal=True)
        return
    total, number = max(parquet.metadata.num_rows, 1), 0
    for batch in parquet.iter_batches(batch_size=1000):
        for record in batch.to_pylist():
            number += 1
            yield number, record
        progress(number / total, f"read {number:,} rows")


def _hub(source: str, progress: Progress) -> Iterator[Record]:
    """A dataset on the Hub (or a local dataset folder), through `datasets`; its train split."""
    from datasets import load_dataset

    progress(0.0, f"loading {source} with datasets")
    try:
        dataset = load_dataset(source, split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each becomes one message
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ConnectionError) or "offline" in text.lower():
            reason = ("the Hugging Face Hub cannot be reached (no network connection, or "
                      "HF_HUB_OFFLINE=1 is set): connect to the internet, or download the data "
                      "and upload the file instead")
        else:
            reason = f"{text}. Check the dataset id (like 'timdettmers/openassistant-guanaco')"
        yield Problem(0, "", f"cannot load dataset '{source}': {reason}", fatal=True)
        return
    total = max(len(dataset), 1)
    for number, record in enumerate(dataset, start=1):
        if number % PROGRESS_EVERY == 0:
            progress(number / total, f"read {number:,} rows")
        yield number, record
    progress(1.0, f"read {source}")


def max_upload_bytes() -> int:
    # A cap keeps a mistaken multi-GB drop from filling the disk; QLS_MAX_UPLOAD_MB raises it.
    return int(float(os.environ.get("QLS_MAX_UPLOAD_MB", "1024")) * 1024 * 1024)


def store_upload(temp_path: str | Path, target_dir: Path, max_bytes: int | None = None) -> Path:
    """Copy an upload, unchanged, into target_dir under a name made from its content.

    The user's file name only lends its extension (checked against SUFFIXES); it is never joined
    into a path, so no name can escape the directory.
    """
    source = Path(temp_path)
    suffix = source.suffix.lower()
    if suffix not in SUFFIXES:
        raise UploadError(f"'{source.name}' is not a {', '.join(SUFFIXES)} file: save your data in "
                          "one of these formats")
    limit = max_upload_bytes() if max_bytes is None else max_bytes
    size = source.stat().st_size
    if size > limit:
        raise UploadError(f"'{source.name}' is {size / 2**20:.0f} MB, above the upload limit of "
                          f"{limit / 2**20:.0f} MB (set QLS_MAX_UPLOAD_MB to raise it)")
    with source.open("rb") as handle:
        head = handle.read(65536)
    if suffix == ".parquet" and not head.startswith(b"PAR1"):
        raise UploadError(f"'{source.name}' is not a parquet file (it lacks the PAR1 signature)")
    if suffix != ".parquet" and b"\x00" in head:
        raise UploadError(f"'{source.name}' looks like a binary file, not {suffix} text")
    target_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # Unique per thread too: the UI serves two uploads at once from one process.
    partial = target_dir / f".upload-{os.getpid()}-{threading.get_ident()}.part"
    with source.open("rb") as reader, partial.open("wb") as writer:
        for chunk in iter(lambda: reader.read(1 << 20), b""):
            digest.update(chunk)
            writer.write(chunk)
    # Named by content: the same file uploaded twice is stored once.
    target = target_dir / f"{digest.hexdigest()[:16]}{suffix}"
    replace_file(partial, target)  # retried while a reader holds the same file open (Windows)
    return target
