"""Shared fixtures. The embedded model is converted once into .cache/models and shared by every
test (and every process a test spawns) through QLS_MODEL_CACHE; each test gets its own data dir."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("QLS_MODEL_CACHE", str(ROOT / ".cache" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI has no Hub: fail fast instead of retrying
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A fresh data directory (runs, uploads) for one test; training processes the test started
    (queued runs start themselves) are killed afterwards, even when the test failed."""
    from appserver import kill_training_processes

    path = tmp_path / "data"
    path.mkdir()
    monkeypatch.setenv("QLS_DATA_DIR", str(path))
    yield path
    kill_training_processes(path)


@pytest.fixture(scope="session")
def embedded_model():
    from engine.models import ensure_embedded

    return ensure_embedded()


@pytest.fixture(scope="session")
def tokenizer(embedded_model):
    from engine.models import load_tokenizer

    return load_tokenizer(str(embedded_model))


@pytest.fixture
def facts_file(tmp_path):
    from facts import write_facts

    return write_facts(tmp_path / "facts.jsonl")


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory, embedded_model):
    """One quick-test run on the embedded model that learned the five facts, trained once per
    session in its own data dir and shared read-only (chat, export and learning tests ask it).
    Tests that write into it (exports) copy it first: see `copy_run`."""
    from facts import write_facts

    from engine.config import load_recipe
    from engine.runner import create_run
    from engine.train import run_training

    root = tmp_path_factory.mktemp("learned")
    reuse = os.environ.get("QLS_TEST_LEARNED_RUN")  # developers: a finished run from an earlier session
    if reuse:
        import shutil

        from engine.rundir import RunDir

        target = root / "data" / "runs" / Path(reuse).resolve().name  # dated, as create_run names it
        shutil.copytree(reuse, target, ignore=shutil.ignore_patterns("checkpoint-*"))
        return RunDir(target)
    before = os.environ.get("QLS_DATA_DIR")
    os.environ["QLS_DATA_DIR"] = str(root / "data")
    try:
        cfg = load_recipe("quick-test", data_path=str(write_facts(root / "facts.jsonl")))
        run = create_run(cfg, name="facts")
        assert run_training(str(run.path)) == "finished", run.path.joinpath("train.log").read_text()
    finally:
        if before is None:
            os.environ.pop("QLS_DATA_DIR", None)
        else:
            os.environ["QLS_DATA_DIR"] = before
    return run


@pytest.fixture
def copy_run(learned_run, data_dir):
    """A private copy of the learned run inside this test's data dir (same name, 'facts')."""
    import shutil

    from engine.rundir import RunDir

    target = data_dir / "runs" / learned_run.path.name
    shutil.copytree(learned_run.path, target, ignore=shutil.ignore_patterns("checkpoint-*"))
    return RunDir(target)
