"""Downloads that are honest: a Hub model is fetched at the catalog's revision, safetensors only,
with its size and progress in the run's status.json; a local folder downloads nothing. A revision
kept as pickle (GPT-J's float16 branch) is converted once to safetensors, refusing anything but
tensors."""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine import catalog, models
from engine.models import ModelError, download, download_status
from engine.paths import models_dir
from engine.rundir import RunDir

GPTJ = "EleutherAI/gpt-j-6b"
NEOX = "EleutherAI/gpt-neox-20b"  # safetensors on its default branch
PINNED = "someone/pinned-model"  # a catalog entry (added by a fixture) with a safetensors revision
SIZES = {"config.json": 1_000, "tokenizer.json": 2_000, "model.safetensors.index.json": 1_000,
         "model-00001-of-00002.safetensors": 6_000_000_000,
         "model-00002-of-00002.safetensors": 4_000_000_000}


class FakeHub:
    """huggingface_hub.snapshot_download as download() uses it: a dry run lists the files that match
    the patterns, the real call reports bytes through the tqdm class it is given (one bar for bytes
    on disk, one for network bytes, one counting files), as huggingface_hub 2.4 does, and with a
    local_dir copies the files of `folder` there."""

    def __init__(self, cached=(), folder=None):
        self.calls, self.cached, self.folder = [], set(cached), folder
        self.files = ({f.name: f.stat().st_size for f in folder.iterdir()} if folder else SIZES)

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, ignore_patterns=None,
                 dry_run=False, tqdm_class=None, local_dir=None):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns,
                               ignore_patterns=ignore_patterns, dry_run=dry_run,
                               local_dir=local_dir))
        wanted = list(filter_repo_objects(self.files, allow_patterns=allow_patterns,
                                          ignore_patterns=ignore_patterns))
        if dry_run:
            return [SimpleNamespace(filename=name, file_size=self.files[name],
                                    will_download=name not in self.cached) for name in wanted]
        on_disk = tqdm_class(desc="Reconstructing (incomplete total...)", unit="B", total=0)
        network = tqdm_class(desc="Downloading bytes", unit="B", total=0)
        files = tqdm_class(desc=f"Fetching {len(wanted)} files", total=len(wanted))
        for name in wanted:
            if name not in self.cached:
                for _ in range(4):
                    on_disk.update(self.files[name] // 4)
                    network.update(self.files[name] // 8)  # compressed on the wire: not counted
                on_disk.update(self.files[name] % 4)
            if local_dir is not None:
                Path(local_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(self.folder / name, Path(local_dir) / name)
            files.update(1)
        return str(local_dir or "/cache/snapshot")


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    """An empty model cache for each test: a conversion made by one test must not serve another."""
    monkeypatch.setenv("QLS_MODEL_CACHE", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.fixture(autouse=True)
def pinned_entry(monkeypatch):
    """A catalog entry whose safetensors sit at a revision other than the default branch."""
    entries = catalog.load_catalog()
    pinned = dataclasses.replace(catalog.find(NEOX), id="pinned", hub_id=PINNED,
                                 revision="refs/pr/7")
    monkeypatch.setattr(catalog, "load_catalog", lambda: [*entries, pinned])


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    return fake


def test_a_catalog_revision_is_fetched_with_safetensors_and_nothing_else(hub):
    seen = []
    download(PINNED, lambda done, total: seen.append((done, total)))
    assert [call["dry_run"] for call in hub.calls] == [True, False]
    for call in hub.calls:
        assert call["repo_id"] == PINNED and call["revision"] == "refs/pr/7"
        assert call["local_dir"] is None  # the Hugging Face cache, shared with other tools
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
    download(NEOX, lambda done, total: seen.append(done))
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
    download(PINNED, download_status(write_status, PINNED))
    assert len(writes) == 2  # throttled: the first report and the finished one
    status = run.read_status()
    assert status["message"] == "downloading someone/pinned-model (refs/pr/7): 10.0 of 10.0 GB"
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


def test_every_load_of_a_pinned_model_uses_the_revision(monkeypatch):
    import torch
    import transformers

    seen = []
    fake = SimpleNamespace(pad_token="x")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda source, **kw: seen.append(kw["revision"]) or fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kw: seen.append(kw["revision"]) or fake)
    models.load_tokenizer(models.resolve_model("pinned"))
    models.load_quantized_model(PINNED, "nf4", True, torch.bfloat16, "cpu")
    models.load_tokenizer("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert seen == ["refs/pr/7", "refs/pr/7", None]


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
    download(NEOX, lambda done, total: seen.append((done, total)))
    assert sorted(fetched) == sorted(SIZES)  # no pickle, no subfolder
    total = sum(SIZES.values())
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert any(0 < done < total for done, _ in seen)  # bytes reported as they arrive


# --- a revision kept as pickle: GPT-J's float16 branch --------------------------------------------


class RunsCode:
    """An object whose unpickling runs code: plain pickle would make the folder `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def tiny_model():
    """A tiny random Llama with tied embeddings: its config and weights as a pickle checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def pickle_repo(folder, model, shards=2):
    """`model` saved as the Hub keeps old models: pytorch_model*.bin (with an index when sharded),
    config and tokenizer files, and a pickle that is not the weights (training_args.bin)."""
    import torch

    folder.mkdir()
    model.config.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    torch.save({"learning_rate": 1e-4}, folder / "training_args.bin")
    state = model.state_dict()  # tied: embed_tokens and lm_head share their memory
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    tied = {"model.embed_tokens.weight", "lm_head.weight"}  # one shard, so they stay shared in it
    parts = {"pytorch_model-00001-of-00002.bin": {k: v for k, v in state.items() if k in tied},
             "pytorch_model-00002-of-00002.bin": {k: v for k, v in state.items() if k not in tied}}
    for name, part in parts.items():
        torch.save(part, folder / name)
    weight_map = {key: name for name, part in parts.items() for key in part}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / models.PICKLE_INDEX).write_text(json.dumps(index))
    return folder


def test_gpt_j_downloads_its_16_bit_pickle_weights_and_converts_them_once(tmp_path, monkeypatch,
                                                                         tiny_model):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hub = FakeHub(folder=pickle_repo(tmp_path / "hub", tiny_model))
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    seen = []
    download(GPTJ, lambda done, total: seen.append((done, total)))

    fetched = {name for name, size in hub.files.items() if name != "training_args.bin"}
    total = sum(hub.files[name] for name in fetched)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [(c["revision"], c["dry_run"]) for c in hub.calls] == [("float16", True),
                                                                   ("float16", False)]
    assert "pytorch_model*.bin" in hub.calls[0]["allow_patterns"]
    folder = Path(models.resolve_model("gpt-j-6b"))
    assert folder.parent == models_dir() and folder.is_dir()
    assert sorted(f.name for f in folder.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer_config.json"]  # no pickle left, no training_args
    assert sorted(models_dir().iterdir()) == [folder]  # the downloaded .bin files are deleted
    with safe_open(folder / "model-00001-of-00002.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt"}  # transformers refuses others

    converted = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    tokens = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, tiny_model(tokens).logits)

    download(GPTJ, lambda done, total: pytest.fail("converted already: nothing to download"))
    assert models.resolve_model(GPTJ) == str(folder) and len(hub.calls) == 2


def test_gpt_j_status_shows_the_download_then_the_conversion(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        FakeHub(folder=pickle_repo(tmp_path / "hub", tiny_model, shards=1)))
    (tmp_path / "run").mkdir()
    run = RunDir(tmp_path / "run")
    messages = []
    report = download_status(lambda **fields: messages.append(fields["message"]), GPTJ)
    report(3_200_000_000, 12_100_000_000)
    assert messages == ["downloading EleutherAI/gpt-j-6b (float16): 3.2 of 12.1 GB"]
    download(GPTJ, download_status(run.write_status, GPTJ))
    assert run.read_status()["message"] == "converting to safetensors: shard 1 of 1"
    folder = Path(models.resolve_model("gpt-j-6b"))
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))


def test_a_pickle_holding_more_than_weights_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    import pickle

    import torch

    marker = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))  # a real danger: plain pickle runs its code
    assert marker.is_dir()
    marker.rmdir()
    repo = tmp_path / "hub"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    torch.save({"weight": torch.ones(2), "surprise": RunsCode(marker)}, repo / "pytorch_model.bin")
    monkeypatch.setattr("huggingface_hub.snapshot_download", FakeHub(folder=repo))
    with pytest.raises(ModelError, match="pytorch_model.bin holds more than model weights.*refus"):
        download(GPTJ)
    assert not marker.exists()  # nothing in the file ran
    assert not models_dir().exists() or not any(models_dir().iterdir())
    assert models.resolve_model("gpt-j-6b") == GPTJ


def test_gpt_j_loads_from_its_converted_copy(tmp_path, monkeypatch, tiny_model):
    import torch
    import transformers

    hub = FakeHub(folder=pickle_repo(tmp_path / "hub", tiny_model, shards=1))
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    seen = []
    fake = SimpleNamespace(pad_token="x")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda source, **kw: seen.append((source, kw["revision"])) or fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kw: seen.append((source, kw["use_safetensors"])) or fake)
    # before the conversion the tokenizer comes from the Hub revision: no 12 GB download for it
    models.load_tokenizer(models.resolve_model("gpt-j-6b"))
    assert seen == [(GPTJ, "float16")] and hub.calls == []
    # loading the model converts first where no download() did (chat with the bare base model)
    models.load_quantized_model(GPTJ, "nf4", True, torch.bfloat16, "cpu")
    folder = str(models_dir() / "EleutherAI--gpt-j-6b--float16")
    models.load_tokenizer(models.resolve_model("gpt-j-6b"))
    assert seen[1:] == [(folder, True), (folder, None)]
