"""How training reads its data (engine.train._split/_tokenise): the configured format and column
mapping, bad rows skipped only when asked, a seeded eval split or a second file, and plain text
trained on every token in packed blocks."""

import json
import logging

import pytest

from engine.config import RunConfig
from engine.data import DataError
from engine.templates import IGNORE_INDEX, get_template
from engine.train import _split, _tokenise


def chat(i):
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"Answer {i}."}]}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bad_rows_stop_training_unless_skipping_is_asked(tmp_path, caplog):
    path = write(tmp_path / "d.jsonl", [chat(1), "oops", chat(2)])
    with pytest.raises(DataError, match="line 2"):
        _split(RunConfig(data_path=path))
    with caplog.at_level(logging.WARNING, logger="engine.train"):
        train, held = _split(RunConfig(data_path=path, skip_bad_rows=True))
    assert [r.line for r in train] == [1, 3] and held == []
    assert "skipped 1 bad rows" in caplog.text


def test_eval_share_is_seeded_and_an_eval_file_wins(tmp_path):
    path = write(tmp_path / "d.jsonl", [chat(i) for i in range(40)])
    first = _split(RunConfig(data_path=path, eval_share=0.1, seed=3))
    again = _split(RunConfig(data_path=path, eval_share=0.1, seed=3))
    other = _split(RunConfig(data_path=path, eval_share=0.1, seed=4))
    lines = lambda split: ([r.line for r in split[0]], [r.line for r in split[1]])  # noqa: E731
    assert lines(first) == lines(again) != lines(other)
    assert len(first[1]) == 4 and sorted(lines(first)[0] + lines(first)[1]) == list(range(1, 41))
    eval_path = write(tmp_path / "e.jsonl", [chat(100)])
    train, held = _split(RunConfig(data_path=path, eval_share=0.1, eval_data_path=eval_path))
    assert len(train) == 40 and [r.messages[1]["content"] for r in held] == ["Answer 100."]


def test_format_and_column_mapping_from_the_config(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,a\nWhat?,That.\nWhy?,Because.\n")
    train, _ = _split(RunConfig(data_path=str(path), data_columns="prompt=q,completion=a",
                                data_format="completion"))
    assert [(r.line, r.messages[1]["content"]) for r in train] == [(2, "That."), (3, "Because.")]
    with pytest.raises(DataError, match="unrecognised row"):
        _split(RunConfig(data_path=str(path)))


def test_plain_text_is_packed_and_trained_on_every_token(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [{"text": "Once upon a time " * 30}, {"text": "The end."}])
    cfg = RunConfig(data_path=path, max_seq_len=32)
    rows, _ = _split(cfg)
    blocks = _tokenise(rows, tokenizer, get_template("guanaco", tokenizer), cfg, "training")
    assert all(len(b["input_ids"]) == 32 for b in blocks[:-1]) and len(blocks[-1]["input_ids"]) <= 32
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    flat = [t for b in blocks for t in b["input_ids"]]
    assert flat.count(tokenizer.eos_token_id) == 2  # each document ends with EOS, none is cut


def test_conversations_are_masked_as_before(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [chat(1)])
    cfg = RunConfig(data_path=path)
    rows, _ = _split(cfg)
    [example] = _tokenise(rows, tokenizer, get_template("guanaco", tokenizer), cfg, "training")
    assert IGNORE_INDEX in example["labels"] and example["labels"][-1] == tokenizer.eos_token_id
