"""The preview shows each row exactly as training tokenises it: the trained spans are the tokens
with labels, tokens beyond max_seq_len are marked cut, and the Data tab puts it all on screen."""

import json

import pytest

from engine.data import Row
from engine.preview import CUT, TRAINED, preview_row
from engine.templates import IGNORE_INDEX, Template, encode, get_template

MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of Veloria?"},
            {"role": "assistant", "content": "Mirrowgate."},
            {"role": "user", "content": "And who founded it?"},
            {"role": "assistant", "content": "Mabel Thornquist, in 1802."}]


def trained_text(tokenizer, encoded) -> str:
    ids = [i for i, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", ["guanaco", "alpaca", "model"])
def test_preview_is_the_rendered_row_with_the_trained_tokens_marked(tokenizer, name):
    template = get_template(name, tokenizer)
    segments = preview_row(Row(1, MESSAGES), template, tokenizer, max_seq_len=4096)
    assert "".join(text for text, _ in segments) == template.render(MESSAGES)
    encoded = encode(tokenizer, template, MESSAGES, 4096)
    marked = "".join(text for text, label in segments if label == TRAINED)
    assert marked == trained_text(tokenizer, encoded)
    assert sum(label == TRAINED for _, label in segments) == 2  # both answers, apart
    assert not any(label == CUT for _, label in segments)


def test_preview_marks_the_tokens_beyond_max_seq_len(tokenizer):
    template = get_template("guanaco", tokenizer)
    full = encode(tokenizer, template, MESSAGES, 4096)
    limit = len(full["input_ids"]) - 5
    segments = preview_row(Row(1, MESSAGES), template, tokenizer, max_seq_len=limit)
    assert segments[-1][1] == CUT
    cut_ids = tokenizer(segments[-1][0], add_special_tokens=False)["input_ids"]
    assert cut_ids == full["input_ids"][limit:]


def test_preview_of_plain_text_is_all_trained(tokenizer):
    template = get_template("guanaco", tokenizer)
    assert preview_row(Row(1, [], "Once upon a time."), template, tokenizer, 16) == [
        ("Once upon a time." + tokenizer.eos_token, TRAINED)]


def test_preview_without_a_tokenizer_uses_character_spans():
    segments = preview_row(Row(1, MESSAGES[1:3]), Template("guanaco", eos="</s>"), None, 16)
    assert segments == [("### Human: What is the capital of Veloria?### Assistant:", None),
                        (" Mirrowgate.</s>", TRAINED)]


def test_data_tab_check_shows_summary_preview_and_statistics(tmp_path, data_dir, embedded_model):
    from app import data_tab

    path = tmp_path / "my data.jsonl"
    good = {"messages": MESSAGES[1:3]}
    path.write_text("\n".join([json.dumps(good), "not json", json.dumps(good)]) + "\n")
    args = (str(path), "", "auto", "", "guanaco", 512)
    model = ("embedded", "")
    calls = []
    progress = lambda fraction, desc="": calls.append(fraction)  # noqa: E731

    data_path, summary, preview, stats, histogram, size = data_tab.check_data(*args, False, *model, progress)
    assert size == {}  # not usable as it is: no time estimate from it
    assert data_path == ""
    assert "line 2" in summary and "Skip bad rows" in summary and "invalid JSON" in summary
    stored = list((data_dir / "uploads").iterdir())
    assert len(stored) == 1 and stored[0].read_bytes() == path.read_bytes()  # kept unchanged

    data_path, summary, preview, stats, histogram, size = data_tab.check_data(*args, True, *model, progress)
    assert size["rows"] == 2 and size["tokens_per_epoch"] > 0
    assert data_path == str(stored[0])
    assert "1 bad rows are skipped" in summary
    assert ("── row at line 1 ──\n", None) in preview and any(label == TRAINED for _, label in preview)
    assert "2 rows" in stats and "1 duplicate rows" in stats
    frame = histogram.value  # a BarPlot update: the bars in length order
    assert frame["columns"] == ["tokens", "rows", "length"]
    assert sum(row[1] for row in frame["data"]) == 2
    assert histogram.sort == [row[0] for row in frame["data"]]
    assert calls and calls[-1] == 1.0


def test_data_tab_refuses_a_bad_upload_and_checks_an_eval_file(tmp_path, data_dir):
    from app import data_tab

    bad = tmp_path / "data.txt"
    bad.write_text("hello")
    result = data_tab.check_data(str(bad), "", "auto", "", "guanaco", 512, False, "embedded", "",
                                 lambda *a, **k: None)
    assert result[0] == "" and "is not a" in result[1]
    good = tmp_path / "eval.jsonl"
    good.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    path, message = data_tab.check_eval(str(good), "auto", "")
    assert path.startswith(str(data_dir)) and "1 rows" in message
    assert data_tab.check_eval(str(bad), "auto", "")[0] == ""
