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
