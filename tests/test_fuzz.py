"""Fuzzing the data reader: whatever bytes a user uploads, read_dataset reports problems and never
raises. Inputs are built from the pieces that break parsers: JSON that is almost right, wrong types
where strings belong, odd encodings, huge numbers, deep nesting, control characters."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.data import read_dataset

SUFFIXES = [".jsonl", ".json", ".csv"]
FORMATS = ["auto", "chat", "alpaca", "sharegpt", "completion", "guanaco", "text"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
known_keys = st.sampled_from(["messages", "conversations", "role", "content", "from", "value",
                              "instruction", "input", "output", "prompt", "completion", "text"])
# Rows shaped like the real formats, with any value where a string belongs.
row = st.one_of(
    json_value,
    st.dictionaries(known_keys, json_value, max_size=4),
    st.builds(lambda msgs: {"messages": msgs},
              st.lists(st.dictionaries(known_keys, json_value, max_size=3), max_size=4)),
)


def as_line(value) -> bytes:
    return json.dumps(value).encode()


line = st.one_of(
    row.map(as_line),
    row.map(as_line).map(lambda b: b[: len(b) // 2]),  # a line cut short
    st.binary(max_size=60),  # anything at all, including invalid UTF-8 and NUL bytes
    st.sampled_from([b"", b"\xef\xbb\xbf{}", b"[" * 5000, b'{"a": 1e999999}', b"\r", b"\x00",
                     b'"just a string"', b"NaN", b'{"messages": null}', b"\xff\xfe{\x00}\x00"]),
)
file_bytes = st.lists(line, max_size=8).map(lambda lines: b"\n".join(lines))


def read(data: bytes, suffix: str, fmt: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        return read_dataset(path, fmt)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=file_bytes, suffix=st.sampled_from(SUFFIXES), fmt=st.sampled_from(FORMATS))
def test_read_dataset_never_raises_and_always_reports(data, suffix, fmt):
    report = read(data, suffix, fmt)
    summary = report.summary()  # the text the UI shows must be producible too
    assert isinstance(summary, str) and summary
    if not report.usable(False):
        assert report.errors or report.fatal or not report.row_count, summary
