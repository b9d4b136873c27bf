"""The formats and file types beyond JSONL chat: ShareGPT, Alpaca history, plain text, .json arrays,
csv/parquet with a column mapping, the format override, skipping bad rows, and a 100k-row file."""

import json
import time

import pytest

from engine.data import DataError, load_conversations, read_dataset
from roles import assistant, system, user


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- ShareGPT, Alpaca with history, plain text ----------------------------------------------------

@pytest.mark.parametrize(("human", "gpt"), [("human", "gpt"), ("user", "assistant"), ("Human", "bing"),
                                            ("human", "chatgpt"), ("user", "model")])
def test_sharegpt_speaker_names_map_to_roles(tmp_path, human, gpt):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": human, "value": "Hi"},
                             {"from": gpt, "value": "Hello"}, {"from": human, "value": "Bye"},
                             {"from": gpt, "value": "See you"}]}
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert report.ok, report.errors
    assert report.format == "sharegpt"
    assert report.rows[0].messages == [system("Be brief."), user("Hi"), assistant("Hello"), user("Bye"),
                                       assistant("See you")]


SHAREGPT_BAD = [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]},
     "conversations[1].from", "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
     "conversations[1].value", "is empty"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "conversations", "must end with an assistant"),
    ({"conversations": {"from": "human"}}, "conversations", "non-empty list"),
    ({"conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": "x"}]},
     "conversations[0].value", "must be text, got a list"),
]


@pytest.mark.parametrize(("bad", "field", "message"), SHAREGPT_BAD)
def test_sharegpt_problems_name_line_and_field(tmp_path, bad, field, message):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", [good, bad, good]))
    assert [(p.line, p.field) for p in report.errors] == [(2, field)]
    assert message in report.errors[0].message
    assert [r.line for r in report.rows] == [1, 3]


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    row = {"system": "Be brief.", "instruction": "And 3+3?", "input": "", "output": "6",
           "history": [["What is 1+1?", "2"], ["And 2+2?", "4"]]}
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert report.ok, report.errors
    assert report.rows[0].messages == [system("Be brief."), user("What is 1+1?"), assistant("2"),
                                       user("And 2+2?"), assistant("4"), user("And 3+3?"), assistant("6")]


def test_alpaca_bad_history_names_the_pair(tmp_path):
    row = {"instruction": "q", "output": "a", "history": [["q0", "a0"], ["only one"]]}
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert [(p.line, p.field) for p in report.errors] == [(1, "history[1]")]


def test_plain_text_rows_are_text_not_conversations(tmp_path):
    rows = [{"text": "Once upon a time."}, {"text": "The river ran north."}]
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.ok and report.format == "text"
    assert [(r.is_text, r.text, r.messages) for r in report.rows] == [
        (True, "Once upon a time.", []), (True, "The river ran north.", [])]


def test_in_a_guanaco_file_a_row_without_markers_is_a_guanaco_problem(tmp_path):
    guanaco = {"text": "### Human: Hi### Assistant: Hello"}
    rows = [guanaco, guanaco, {"text": "Hello, how are you? I am fine."}, guanaco]
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.format == "guanaco"
    assert [(p.line, p.field) for p in report.errors] == [(3, "text")]
    assert "'### Human: ...'" in report.errors[0].message


def test_format_override_reads_every_row_in_that_format(tmp_path):
    rows = [{"text": "### Human: Hi### Assistant: Hello"}, {"text": "plain"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    as_text = read_dataset(path, fmt="text")
    assert as_text.ok and [r.text for r in as_text.rows] == ["### Human: Hi### Assistant: Hello", "plain"]
    as_alpaca = read_dataset(path, fmt="alpaca")
    assert {(p.line, p.field) for p in as_alpaca.errors} == {(1, "instruction"), (1, "output"),
                                                             (2, "instruction"), (2, "output")}
    assert read_dataset(path, fmt="vicuna").errors[0].field == "format"


def test_format_is_decided_by_the_first_rows_and_later_rows_follow_it(tmp_path):
    alpaca = {"instruction": "q", "output": "a"}
    chat = {"messages": [user("Hi"), assistant("Hello")]}
    rows = [alpaca] * 1000 + [chat] * 1500
    report = read_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.format == "alpaca" and report.row_count == 1000
    assert [p.line for p in report.errors] == list(range(1001, 2501))
    assert report.errors[0].field == "messages" and "chat format" in report.errors[0].message


# --- .json arrays, csv, parquet -------------------------------------------------------------------

def test_json_array_rows_carry_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'\xef\xbb\xbf[\r\n  {"prompt": "a", "completion": "b"},\r\n\r\n  {"prompt": "c",\r\n'
                     b'   "completion": ""},\r\n  {"prompt": "e", "completion": "f"}\r\n]\r\n')
    report = read_dataset(path)
    assert report.format == "completion"
    assert [r.line for r in report.rows] == [2, 6]
    assert [(p.line, p.field, p.message) for p in report.errors] == [(4, "completion", "is empty")]


@pytest.mark.parametrize(("content", "line", "words"), [
    (b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "c" "completion": "d"}\n]', 3, "invalid JSON"),
    (b'[\n{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n]', 3, "expected ','"),
    (b'{"prompt": "a", "completion": "b"}\n', 1, "one array of rows"),
    (b'[\n{"prompt": "a", "completion": "caf\xe9"}\n]', 2, "not valid UTF-8"),
    (b'[\n{"prompt": "a", "completion": "b"},\n', 3, "not closed"),
], ids=["invalid-json", "missing-comma", "not-an-array", "non-utf8", "unclosed"])
def test_broken_json_array_is_one_fatal_problem_at_its_line(tmp_path, content, line, words):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    report = read_dataset(path)
    assert [p.line for p in report.errors] == [line]
    assert words in report.errors[0].message
    assert report.fatal and not report.usable(skip_bad_rows=True)


def test_csv_with_column_mapping_names_physical_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes('\ufeffquestion,answer,source\r\n"What is 2+2?",4,x\r\n"multi\r\nline",five,y\r\n'
                     '\r\nempty,,z\r\ntoo,many,values,here\r\n'.encode())
    report = read_dataset(path, columns="prompt=question, completion=answer")
    assert report.format == "completion"
    assert [(r.line, r.messages) for r in report.rows] == [
        (2, [user("What is 2+2?"), assistant("4")]), (3, [user("multi\r\nline"), assistant("five")])]
    assert [(p.line, p.field) for p in report.errors] == [(6, "completion"), (7, "")]
    assert "4 values but the header names 3" in report.errors[1].message


def test_csv_without_mapping_uses_column_names_and_reads_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps([user("Hi"), assistant("Hello")]).replace('"', '""')
    path.write_text(f'messages\n"{messages}"\n')
    report = read_dataset(path)
    assert report.ok and report.format == "chat"
    assert report.rows[0].messages == [user("Hi"), assistant("Hello")]


def test_csv_non_utf8_row_and_bad_mapping(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\na,b\ncaf\xe9,c\nd,e\n")
    report = read_dataset(path)
    assert [(p.line, "UTF-8" in p.message) for p in report.errors] == [(3, True)]
    assert [r.line for r in report.rows] == [2, 4]
    bad = read_dataset(path, columns="prompt")
    assert bad.fatal and bad.errors[0].field == "columns"


def test_parquet_with_column_mapping(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pyarrow.table({"q": ["Hi", "", "Bye"], "a": ["Hello", "x", "See you"]})
    pq.write_table(table, path)
    report = read_dataset(path, columns="prompt=q,completion=a")
    assert [r.line for r in report.rows] == [1, 3]
    assert [(p.line, p.field) for p in report.errors] == [(2, "prompt")]
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert read_dataset(tmp_path / "fake.parquet").fatal


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    report = read_dataset(tmp_path / "d.txt")
    assert report.fatal and "unsupported file type '.txt'" in report.errors[0].message


# --- skipping bad rows, streaming ---------------------------------------------------------------

GOOD = {"messages": [user("Hi"), assistant("Hello")]}


def test_skip_bad_rows_trains_on_the_good_ones_with_a_count(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "oops", GOOD, {"messages": [user("Hi")]}])
    with pytest.raises(DataError, match="line 2"):
        load_conversations(path)
    report = load_conversations(path, skip_bad_rows=True)
    assert [r.line for r in report.rows] == [1, 3]
    assert report.bad_rows == 2


def test_skip_bad_rows_never_yields_an_empty_result(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["oops", {"messages": [user("Hi")]}])
    with pytest.raises(DataError, match="no usable rows: every row has a problem"):
        load_conversations(path, skip_bad_rows=True)
    broken = tmp_path / "d.json"
    broken.write_text('[{"prompt": "a", "completion": "b"}, {"prompt": ')
    with pytest.raises(DataError, match="invalid JSON"):  # a half-read file is not "bad rows"
        load_conversations(broken, skip_bad_rows=True)


def test_keep_and_on_row_stream_without_holding_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 50)
    seen, fractions = [], []
    report = read_dataset(path, keep=2, on_row=lambda row: seen.append(row.line),
                          progress=lambda fraction, text: fractions.append(fraction))
    assert report.row_count == 50 and len(report.rows) == 2 and report.ok
    assert seen == list(range(1, 51))
    assert fractions[-1] == 1.0


def test_a_100k_row_file_is_read_within_a_generous_bound(tmp_path):
    """Measured on the 2-core dev machine: 100k alpaca rows (87 MB) read in about 1 s."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for i in range(100_000):
            handle.write(json.dumps({"instruction": f"Question {i}: " + "word " * 60,
                                     "input": "", "output": "answer " * 100}) + "\n")
    assert path.stat().st_size > 80_000_000
    calls = []
    start = time.perf_counter()
    report = read_dataset(path, keep=3, progress=lambda f, t: calls.append(f))
    elapsed = time.perf_counter() - start
    assert report.ok and report.row_count == 100_000 and len(report.rows) == 3
    assert len(calls) >= 20  # the UI's bar moves while it reads
    assert elapsed < 20, f"reading 100k rows took {elapsed:.1f}s"


def test_deeply_nested_json_is_a_problem_not_a_crash(tmp_path):
    deep = "[" * 100_000
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, deep, GOOD])
    report = read_dataset(path)
    assert [(p.line, "nested too deeply" in p.message) for p in report.errors] == [(2, True)]
    array = tmp_path / "d.json"
    array.write_text("[\n" + json.dumps({"prompt": "a", "completion": "b"}) + ",\n" + deep)
    report = read_dataset(array)
    assert [p.line for p in report.errors] == [3] and report.fatal
