"""Reading training files: every supported row shape becomes the same messages, and every problem
is reported with its 1-based line number and the field it is about."""

import json

import pytest

from engine.data import DataError, load_conversations, read_dataset
from roles import assistant, system, user


def write_rows(path, rows):
    """One JSON row per line; a str is written as the line itself."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- every supported format normalises to messages --------------------------------------------

NORMALISED = [
    pytest.param(
        {"instruction": "Add 2 and 3.", "output": "5"},
        "alpaca", [user("Add 2 and 3."), assistant("5")], id="alpaca",
    ),
    pytest.param(
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        "alpaca", [user("Translate to French.\n\ncat"), assistant("chat")], id="alpaca-input",
    ),
    pytest.param(
        {"instruction": "Translate to French.", "input": "", "output": "chat"},
        "alpaca", [user("Translate to French."), assistant("chat")], id="alpaca-empty-input",
    ),
    pytest.param(
        {"system": "Be terse.", "instruction": "Greet.", "input": "Bob", "output": "Hi Bob."},
        "alpaca", [system("Be terse."), user("Greet.\n\nBob"), assistant("Hi Bob.")],
        id="alpaca-system",
    ),
    pytest.param(
        {"messages": [system("You are kind."), user("Hi"), assistant("Hello!"),
                      user("How are you?"), assistant("Fine.")]},
        "chat", [system("You are kind."), user("Hi"), assistant("Hello!"),
                 user("How are you?"), assistant("Fine.")], id="chat-multi-turn-system",
    ),
    pytest.param(
        {"text": "### Human: Hi there### Assistant: Hello!\n### Human: Bye ### Assistant: See you."},
        "guanaco", [user("Hi there"), assistant("Hello!"), user("Bye"), assistant("See you.")],
        id="guanaco-multi-turn",
    ),
    pytest.param(
        {"prompt": "The sky is", "completion": " blue."},
        "completion", [user("The sky is"), assistant(" blue.")], id="prompt-completion",
    ),
]


@pytest.mark.parametrize(("row", "fmt", "messages"), NORMALISED)
def test_row_formats_normalise_to_messages(tmp_path, row, fmt, messages):
    report = read_dataset(write_rows(tmp_path / "d.jsonl", [row, row]))
    assert report.errors == []
    assert report.ok
    assert report.format == fmt
    assert [r.line for r in report.rows] == [1, 2]
    assert report.rows[0].messages == messages


# --- malformed rows: a Problem with line and field --------------------------------------------

GOOD = {"messages": [user("Hi"), assistant("Hello")]}
BAD_ROWS = [
    pytest.param('{"messages": [', "", "invalid JSON", id="invalid-json"),
    pytest.param("[1, 2]", "", "got a list", id="row-is-list"),
    pytest.param('"just text"', "", "got text", id="row-is-string"),
    pytest.param("42", "", "got a number", id="row-is-number"),
    pytest.param({"question": "q", "answer": "a"}, "", "unrecognised row (keys: answer, question)",
                 id="unrecognised-keys"),
    pytest.param({"instruction": "Do it."}, "output", "is missing", id="alpaca-missing-output"),
    pytest.param({"prompt": "p"}, "completion", "is missing", id="completion-missing"),
    pytest.param({"instruction": "  ", "output": "x"}, "instruction", "is empty", id="empty-field"),
    pytest.param({"prompt": 3, "completion": "x"}, "prompt", "must be text, got a number",
                 id="number-where-text"),
    pytest.param({"text": 7}, "text", "must be text, got a number", id="guanaco-text-number"),
    pytest.param({"messages": "hi"}, "messages", "non-empty list", id="messages-not-list"),
    pytest.param({"messages": []}, "messages", "non-empty list", id="messages-empty"),
    pytest.param({"messages": [user("Hi"), "Hello"]}, "messages[1]", "role and content",
                 id="message-not-object"),
    pytest.param({"messages": [user("Hi"), {"role": "bot", "content": "Hello"}]}, "messages[1].role",
                 "unknown role 'bot'", id="unknown-role"),
    pytest.param({"messages": [user("Hi"), {"role": "assistant", "content": 5}]},
                 "messages[1].content", "must be text", id="content-number"),
    pytest.param({"messages": [user("Hi"), assistant(" ")]}, "messages[1].content", "is empty",
                 id="content-empty"),
    pytest.param({"messages": [user("Hi"), system("Be kind."), assistant("Hello")]},
                 "messages[1].role", "system message may only come first", id="system-not-first"),
    pytest.param({"messages": [user("Hi"), assistant("Hello"), user("Bye")]}, "messages",
                 "must end with an assistant turn", id="not-ending-with-assistant"),
    pytest.param({"messages": [assistant("Hello"), user("Hi"), assistant("Bye")]}, "messages",
                 "must start with a user turn", id="not-starting-with-user"),
    pytest.param({"messages": [user("Hi"), user("Hi again"), assistant("Hello")]}, "messages",
                 "must alternate", id="not-alternating"),
    pytest.param({"messages": [system("Be kind.")]}, "messages", "no user or assistant turn",
                 id="only-system"),
    # plain text is a format of its own now (continued pre-training), so in a chat file it is a
    # row in another format; the guanaco check of such a row is in test_guanaco_file_*
    pytest.param({"text": "Hello, how are you? I am fine."}, "text", "in text format, but the file is in chat",
                 id="plain-text-in-chat-file"),
    pytest.param({"text": "Intro. ### Human: Hi ### Assistant: Hello"}, "text",
                 "text before the first", id="guanaco-text-before-marker"),
    pytest.param({"text": "### Human:   ### Assistant: Hello"}, "text", "'### Human:' turn is empty",
                 id="guanaco-empty-turn"),
    pytest.param({"text": "### Human: Hi ### Human: Again ### Assistant: Hello"}, "text",
                 "must alternate", id="guanaco-not-alternating"),
    pytest.param({"text": "### Assistant: Hello ### Human: Hi ### Assistant: Bye"}, "text",
                 "must start with a user turn", id="guanaco-starts-with-assistant"),
]


@pytest.mark.parametrize(("bad", "field", "message"), BAD_ROWS)
def test_malformed_row_is_named_by_line_and_field(tmp_path, bad, field, message):
    report = read_dataset(write_rows(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD]))
    assert len(report.errors) == 1, report.errors
    problem = report.errors[0]
    assert (problem.line, problem.field) == (3, field)
    assert message in problem.message
    assert [r.line for r in report.rows] == [1, 2, 4]  # the good rows are still read
    assert not report.ok
    assert "line 3" in str(problem)


def test_every_bad_row_is_reported_not_just_the_first(tmp_path):
    rows = [GOOD, "oops", GOOD, {"instruction": "x"}, {"foo": 1}]
    report = read_dataset(write_rows(tmp_path / "d.jsonl", rows))
    assert [p.line for p in report.errors] == [2, 4, 5]


def test_mixed_formats_report_the_minority_rows(tmp_path):
    alpaca = {"instruction": "Say hi.", "output": "Hi."}
    completion = {"prompt": "p", "completion": "c"}
    rows = [alpaca, GOOD, alpaca, alpaca, completion, alpaca]
    report = read_dataset(write_rows(tmp_path / "d.jsonl", rows))
    assert report.format == "alpaca"
    assert [r.line for r in report.rows] == [1, 3, 4, 6]
    assert [p.line for p in report.errors] == [2, 5]
    assert "chat format" in report.errors[0].message
    assert "completion format" in report.errors[1].message
    assert all("one format per file" in p.message for p in report.errors)


def test_non_utf8_bytes_are_reported_on_their_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n' + good + b"\n")
    report = read_dataset(path)
    assert [p.line for p in report.errors] == [2]
    assert "UTF-8" in report.errors[0].message
    assert [r.line for r in report.rows] == [1, 3]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n", b"\r\n\r\n"], ids=["empty", "blank", "crlf"])
def test_a_file_without_rows_is_one_file_level_problem(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    report = read_dataset(path)
    assert report.rows == []
    assert len(report.errors) == 1
    assert report.errors[0].line == 0
    assert "no rows" in report.errors[0].message
    assert str(report.errors[0]).startswith("file:")
    assert not report.ok


def test_missing_file_is_a_problem_not_an_exception(tmp_path):
    report = read_dataset(tmp_path / "nope.jsonl")
    assert [p.line for p in report.errors] == [0]
    assert "not found" in report.errors[0].message
    assert not report.ok


def test_bom_crlf_and_blank_lines_are_accepted_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"}).encode()
    # line 1 row, line 2 blank, line 3 row, line 4 blank (spaces), line 5 broken, line 6 row
    content = b"\xef\xbb\xbf" + b"\r\n".join([good, b"", good, b"   ", b"{broken", good]) + b"\r\n"
    path.write_bytes(content)
    report = read_dataset(path)
    assert report.format == "completion"
    assert [r.line for r in report.rows] == [1, 3, 6]
    assert [p.line for p in report.errors] == [5]
    assert report.rows[0].messages == [user("p"), assistant("c")]  # no stray \r in the content


def test_crlf_inside_guanaco_text_keeps_content(tmp_path):
    path = tmp_path / "d.jsonl"
    row = json.dumps({"text": "### Human: Hi### Assistant: Hello"}).encode()
    path.write_bytes(row + b"\r\n" + row + b"\r\n")
    report = read_dataset(path)
    assert report.ok
    assert report.rows[1].messages == [user("Hi"), assistant("Hello")]


def test_report_to_dict(tmp_path):
    report = read_dataset(write_rows(tmp_path / "d.jsonl", [GOOD, "[1]", GOOD, {"messages": []}]))
    data = report.to_dict()
    json.dumps(data)  # serialisable, for the CLI's --json
    assert data["format"] == "chat"
    assert data["rows"] == 2
    assert data["ok"] is False
    assert data["error_count"] == 2
    assert [(e["line"], e["field"]) for e in data["errors"]] == [(2, ""), (4, "messages")]
    assert all(e["message"] for e in data["errors"])


def test_report_to_dict_of_a_good_file(tmp_path):
    data = read_dataset(write_rows(tmp_path / "d.jsonl", [GOOD] * 3)).to_dict()
    assert (data["format"], data["rows"], data["errors"], data["ok"]) == ("chat", 3, [], True)


def test_summary_names_lines_and_caps_the_list(tmp_path):
    report = read_dataset(write_rows(tmp_path / "d.jsonl", [GOOD] + ["[]"] * 12))
    summary = report.summary(max_errors=10)
    assert "12 problem(s)" in summary
    assert "line 2" in summary and "line 11" in summary and "line 12" not in summary
    assert "and 2 more" in summary


def test_load_conversations_raises_naming_the_line(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [GOOD, GOOD, {"messages": [user("Hi")]}])
    with pytest.raises(DataError, match=r"line 3, field 'messages'"):
        load_conversations(path)


def test_load_conversations_raises_on_an_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_conversations(path)


def test_load_conversations_returns_the_rows_of_a_clean_file(tmp_path):
    report = load_conversations(write_rows(tmp_path / "d.jsonl", [GOOD, GOOD]))
    assert [r.messages for r in report.rows] == [GOOD["messages"]] * 2
