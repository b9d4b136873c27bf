"""Downloads that are honest: a Hub model is fetched at the catalog's revision, safetensors only,
with its size and progress in the run's status.json; a local folder downloads nothing."""

from types import SimpleNamespace

import pytest

from engine import models
from engine.models import ModelError, download, download_status
from engine.rundir import RunDir

GPTJ = "EleutherAI/gpt-j-6b"
SIZES = {"config.json": 1_000, "tokenizer.json": 2_000, "model.safetensors.index.json": 1_000,
         "model-00001-of-00002.safetensors": 6_000_000_000,
         "model-00002-of-00002.safetensors": 4_000_000_000}


class FakeHub:
    """huggingface_hub.snapshot_download as download() uses it: a dry run lists the files, the real
    call reports bytes through the tqdm class it is given (one bar for bytes on disk, one for
    network bytes, one counting files), as huggingface_hub 2.4 does."""

    def __init__(self, cached=()):
        self.calls, self.cached = [], set(cached)

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, ignore_patterns=None,
                 dry_run=False, tqdm_class=None):
        self.calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns,
                               ignore_patterns=ignore_patterns, dry_run=dry_run))
        if dry_run:
            return [SimpleNamespace(filename=name, file_size=size,
                                    will_download=name not in self.cached)
                    for name, size in SIZES.items()]
        on_disk = tqdm_class(desc="Reconstructing (incomplete total...)", unit="B", total=0)
        network = tqdm_class(desc="Downloading bytes", unit="B", total=0)
        files = tqdm_class(desc=f"Fetching {len(SIZES)} files", total=len(SIZES))
        for name, size in SIZES.items():
            if name not in self.cached:
                for _ in range(4):
                    on_disk.update(size // 4)
                    network.update(size // 8)  # compressed on the wire: must not be counted
            files.update(1)
        return "/cache/snapshot"


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    return fake


def test_gpt_j_is_fetched_at_its_safetensors_revision_and_nothing_else(hub):
    seen = []
    download(GPTJ, lambda done, total: seen.append((done, total)))
    assert [call["dry_run"] for call in hub.calls] == [True, False]
    for call in hub.calls:
        assert call["repo_id"] == GPTJ and call["revision"] == "refs/pr/40"
        assert "*.safetensors" in call["allow_patterns"] and "*.json" in call["allow_patterns"]
        unsafe = (".bin", ".pth", ".gguf", ".onnx", "*")
        assert not any(pattern.endswith(unsafe) for pattern in call["allow_patterns"])
        assert call["ignore_patterns"] == ["*/*"]  # no onnx/ or original/ subfolders
    total = sum(SIZES.values())
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(done <= total for done, _ in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_cached_files_count_as_done(monkeypatch):
    hub = FakeHub(cached={"model-00001-of-00002.safetensors"})
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    seen = []
    download(GPTJ, lambda done, total: seen.append(done))
    assert seen[0] == 6_000_000_000 and seen[-1] == sum(SIZES.values())


def test_a_hub_id_outside_the_catalog_uses_the_default_branch(hub):
    download("someone/their-model")
    assert {call["revision"] for call in hub.calls} == {None}


def test_status_json_shows_the_download(hub, tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    writes = []

    def write_status(**fields):
        writes.append(fields)
        return run.write_status(**fields)

    monkeypatch.setattr(models.time, "monotonic", lambda: 100.0)  # every update within one second
    download(GPTJ, download_status(write_status, GPTJ))
    assert len(writes) == 2  # throttled: the first report and the finished one
    status = run.read_status()
    assert status["message"] == "downloading EleutherAI/gpt-j-6b (refs/pr/40): 10.0 of 10.0 GB"
    assert status["download_done_gb"] == status["download_total_gb"] == 10.0
    assert writes[0]["message"].endswith(": 0.0 of 10.0 GB")


def test_status_updates_once_a_second_while_downloading(tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 2))  # two seconds pass between reports
    monkeypatch.setattr(models.time, "monotonic", lambda: next(clock))
    run = RunDir(tmp_path)
    report = download_status(run.write_status, "someone/model")
    report(3_200_000_000, 12_100_000_000)
    report(6_400_000_000, 12_100_000_000)
    status = run.read_status()
    assert status["message"] == "downloading someone/model: 6.4 of 12.1 GB"
    assert (status["download_done_gb"], status["download_total_gb"]) == (6.4, 12.1)


def test_the_train_tab_draws_the_download_as_a_bar():
    from app.train_tab import status_markdown

    text = status_markdown({"state": "running", "message": "downloading x: 3.0 of 12.0 GB",
                            "download_done_gb": 3.0, "download_total_gb": 12.0}, [])
    assert "██████░░░░" in text and "25%" in text
    done = status_markdown({"state": "running", "download_done_gb": 12.0,
                            "download_total_gb": 12.0}, [])
    assert "░" not in done and "█" not in done


def test_offline_gives_the_clear_model_error(monkeypatch):
    # The real snapshot_download with the Hub switched off and nothing cached
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="could not download someone/not-cached: no connection"):
        download("someone/not-cached", lambda done, total: pytest.fail("no progress offline"))


def test_a_local_folder_or_the_embedded_model_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda *a, **k: pytest.fail("a local folder must not be downloaded"))
    (tmp_path / "config.json").write_text("{}")
    download(str(tmp_path), lambda done, total: pytest.fail("no progress for a local folder"))
    assert models.hub_revision(str(tmp_path)) is None


def test_every_load_of_gpt_j_uses_the_revision(monkeypatch):
    import torch
    import transformers

    seen = []
    fake = SimpleNamespace(pad_token="x")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda source, **kw: seen.append(kw["revision"]) or fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kw: seen.append(kw["revision"]) or fake)
    models.load_tokenizer(models.resolve_model("gpt-j-6b"))
    models.load_quantized_model(GPTJ, "nf4", True, torch.bfloat16, "cpu")
    models.load_tokenizer("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert seen == ["refs/pr/40", "refs/pr/40", None]


def test_progress_comes_through_the_real_snapshot_download(monkeypatch, tmp_path):
    # huggingface_hub's own snapshot_download, with only the network faked: proves download() reads
    # the right one of its progress bars in the pinned version.
    import huggingface_hub._snapshot_download as snapshot
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import DryRunFileInfo
    from huggingface_hub.hf_api import RepoFile

    files = {**SIZES, "pytorch_model.bin": 9_000, "onnx/model.onnx": 9_000}
    commit = "a" * 40
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(HfApi, "repo_info", lambda self, **kw: SimpleNamespace(sha=commit))
    monkeypatch.setattr(HfApi, "list_repo_tree", lambda self, **kw: [
        RepoFile(path=name, size=size, oid="0") for name, size in files.items()])
    fetched = []

    def hf_hub_download(repo_id, filename, *, tqdm_class, dry_run=False, **kwargs):
        if dry_run:
            return DryRunFileInfo(commit_hash=commit, file_size=files[filename], filename=filename,
                                  local_path="", is_cached=False, will_download=True)
        fetched.append(filename)
        bar = tqdm_class(total=files[filename])
        bar.update(files[filename] // 2)
        bar.update(files[filename] // 2)
        return str(tmp_path / filename)

    monkeypatch.setattr(snapshot, "hf_hub_download", hf_hub_download)
    seen = []
    download(GPTJ, lambda done, total: seen.append((done, total)))
    assert sorted(fetched) == sorted(SIZES)  # no pickle, no subfolder
    total = sum(SIZES.values())
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert any(0 < done < total for done, _ in seen)  # bytes reported as they arrive
