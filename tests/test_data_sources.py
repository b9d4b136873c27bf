"""Where data comes from: Hub datasets through `datasets` (offline here: a local folder of the same
shape, and the clear message when the Hub cannot be reached), and uploads stored safely."""

import json
import os

import pytest

from engine.data import load_conversations, read_dataset
from engine.readers import UploadError, is_hub_id, store_upload

OASST_ROWS = [  # the shape of timdettmers/openassistant-guanaco, the paper's OASST1 data
    {"text": "### Human: What is QLoRA?### Assistant: A way to fine-tune a 4-bit model."},
    {"text": "### Human: Hi### Assistant: Hello!### Human: Bye### Assistant: See you."},
]


def test_hub_ids_are_told_from_paths(tmp_path):
    assert is_hub_id("timdettmers/openassistant-guanaco")
    assert not is_hub_id("data.jsonl")
    assert not is_hub_id("../etc/passwd")
    assert not is_hub_id("/abs/path")


def test_a_local_dataset_folder_loads_through_datasets(tmp_path):
    folder = tmp_path / "openassistant-guanaco"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OASST_ROWS))
    report = load_conversations(str(folder))
    assert report.format == "guanaco" and report.row_count == 2
    assert report.rows[1].line == 2
    assert [m["role"] for m in report.rows[1].messages] == ["user", "assistant", "user", "assistant"]


def test_offline_hub_dataset_is_a_clear_message():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: no network in tests
    report = read_dataset("timdettmers/openassistant-guanaco-not-cached")
    assert report.fatal and report.row_count == 0
    message = report.errors[0].message
    assert "cannot load dataset 'timdettmers/openassistant-guanaco-not-cached'" in message
    assert "no network connection" in message and "upload the file" in message


def test_upload_is_stored_unchanged_under_a_content_name(tmp_path):
    source = tmp_path / "My Data (1).JSONL"
    content = b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\r\n'
    source.write_bytes(content)
    target_dir = tmp_path / "uploads"
    stored = store_upload(source, target_dir)
    assert stored.parent == target_dir and stored.suffix == ".jsonl"
    assert stored.read_bytes() == content  # byte for byte: BOM and CRLF kept
    assert "My Data" not in stored.name
    assert store_upload(source, target_dir) == stored  # the same content is stored once
    assert [p.name for p in target_dir.iterdir()] == [stored.name]  # no temporary file left


@pytest.mark.parametrize(("name", "content", "limit", "words"), [
    ("d.exe", b"MZ", None, "is not a"),
    ("d.jsonl", b"x" * 2000, 1000, "above the upload limit"),
    ("d.parquet", b"not parquet", None, "PAR1"),
    ("d.csv", b"PK\x03\x04\x00\x00binary", None, "binary"),
])
def test_bad_uploads_are_refused_before_storing(tmp_path, name, content, limit, words):
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(UploadError, match=words):
        store_upload(source, tmp_path / "uploads", max_bytes=limit)
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_upload_cap_is_configurable(tmp_path, monkeypatch):
    source = tmp_path / "d.jsonl"
    source.write_bytes(b"x" * 3 * 1024 * 1024)
    monkeypatch.setenv("QLS_MAX_UPLOAD_MB", "2")
    with pytest.raises(UploadError, match="QLS_MAX_UPLOAD_MB"):
        store_upload(source, tmp_path / "uploads")
    monkeypatch.setenv("QLS_MAX_UPLOAD_MB", "4")
    assert store_upload(source, tmp_path / "uploads").is_file()
