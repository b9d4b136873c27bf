"""Token statistics with the embedded model's tokenizer: lengths match what training encodes,
truncation is counted per row, tokens per epoch, duplicates, and the histogram's bins."""

import json

import pytest

from engine.data import Row, read_dataset
from engine.datastats import DataStats, StatsCollector
from engine.templates import encode, get_template, text_tokens


def conversation(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


ROWS = [conversation("Hi", "Hello"), conversation("Tell me a story.", "Once upon a time " * 40),
        conversation("Hi", "Hello"), conversation("What is 2+2?", "4")]


@pytest.mark.parametrize("name", ["guanaco", "alpaca", "model"])
def test_lengths_truncation_and_tokens_match_training(tokenizer, name):
    template = get_template(name, tokenizer)
    encoded = [encode(tokenizer, template, messages, 4096) for messages in ROWS]
    lengths = [e["length"] for e in encoded]
    limit = sorted(lengths)[-2] + 1  # only the story is longer
    collector = StatsCollector(tokenizer, template, limit)
    for line, messages in enumerate(ROWS, start=1):
        collector.add(Row(line, messages))
    stats = collector.finish()
    assert stats.lengths == lengths
    assert stats.lines == [1, 2, 3, 4]
    assert stats.truncated_count == 1 and stats.truncated == [(2, lengths[1], lengths[1] - limit)]
    assert stats.truncated_share == 0.25
    assert stats.tokens_per_epoch == sum(min(n, limit) for n in lengths)
    assert stats.duplicate_count == 1 and stats.duplicates == [(3, 1)]
    summary = stats.summary()
    assert "1 rows (25.0%) are longer than" in summary and f"line 2 loses {lengths[1] - limit}" in summary
    assert "line 3 repeats line 1" in summary


def test_plain_text_is_packed_so_nothing_is_cut(tokenizer):
    template = get_template("guanaco", tokenizer)
    texts = ["Once upon a time " * 100, "The end."]
    collector = StatsCollector(tokenizer, template, 64)
    for line, text in enumerate(texts, start=1):
        collector.add(Row(line, [], text))
    stats = collector.finish()
    assert stats.packed and stats.truncated_count == 0
    assert stats.lengths == [len(text_tokens(tokenizer, t)) for t in texts]
    assert stats.tokens_per_epoch == sum(stats.lengths)
    assert "packed" in stats.summary()
    assert not any(bar["cut"] for bar in stats.histogram())


def test_histogram_has_max_seq_len_as_an_edge_and_counts_every_row():
    stats = DataStats(max_seq_len=100, lengths=[1, 10, 50, 100, 101, 150, 400])
    bars = stats.histogram(bins=20)
    edges = [bar["start"] for bar in bars] + [bars[-1]["end"]]
    assert edges[0] == 0 and 100 in edges and edges[-1] >= 400
    assert sum(bar["count"] for bar in bars) == 7
    assert [bar["cut"] for bar in bars] == [bar["start"] >= 100 for bar in bars]
    within = sum(bar["count"] for bar in bars if not bar["cut"])
    assert within == 4  # 100 tokens fit exactly; 101 is cut
    assert len(bars) <= 30
    assert DataStats(max_seq_len=100).histogram() == []


def test_stats_stream_alongside_reading(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS * 300))
    template = get_template("guanaco", tokenizer)
    collector = StatsCollector(tokenizer, template, 512)
    report = read_dataset(path, keep=3, on_row=collector.add)
    stats = collector.finish()
    assert report.row_count == stats.rows == 1200
    assert stats.duplicate_count == 1200 - 3  # three distinct rows
    data = stats.to_dict()
    json.dumps(data)
    assert data["rows"] == 1200 and data["histogram"]
    assert sum(bar["count"] for bar in data["histogram"]) == 1200
