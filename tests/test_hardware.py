"""Hardware detection through NVML (real: no GPU here; faked: one card) and the model catalog's
recommendations for a given amount of free GPU memory."""

import sys
import types

import pytest

from engine import catalog, planner
from engine.hardware import GIB, Gpu, detect, detect_gpus


def test_no_gpu_here_means_cpu_mode(tmp_path):
    found = detect(tmp_path / "not" / "yet" / "created")  # disk is measured on the nearest parent
    assert found.gpus == [] and not found.has_gpu
    assert found.gpu_note  # says why, in words
    assert "CPU mode" in found.summary()
    assert found.gpu_note in found.summary()
    assert found.cpu_cores >= 1 and found.ram_total_gb > 0 and found.disk_free_gb > 0
    values = found.to_dict()
    assert values["has_gpu"] is False and values["gpus"] == []


def test_missing_nvml_bindings_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    gpus, note = detect_gpus()
    assert gpus == []
    assert "nvidia-ml-py" in note and "not installed" in note


def fake_nvml(capability=(8, 6), count=1, init_error=None, total_gb=12, free_gb=10):
    """A stand-in for the pynvml module: `count` GPUs with the given memory and capability."""
    module = types.ModuleType("pynvml")
    calls = []

    class NVMLError(Exception):
        pass

    def init():
        calls.append("init")
        if init_error:
            raise NVMLError(init_error)

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlShutdown = lambda: calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: count
    module.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    module.nvmlDeviceGetName = lambda handle: b"NVIDIA GeForce RTX 3060"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        total=total_gb * GIB, free=free_gb * GIB, used=(total_gb - free_gb) * GIB)
    module.nvmlDeviceGetCudaComputeCapability = lambda handle: capability
    module.calls = calls
    return module


def test_one_ampere_gpu(monkeypatch):
    nvml = fake_nvml(capability=(8, 6))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpus, note = detect_gpus()
    assert gpus == [Gpu(index=0, name="NVIDIA GeForce RTX 3060", total_gb=12.0, free_gb=10.0,
                        compute_capability="8.6", bf16=True)]
    assert note == ""
    assert nvml.calls == ["init", "shutdown"]
    found = detect()
    assert found.has_gpu
    summary = found.summary()
    assert "RTX 3060" in summary and "10.0 GB free of 12.0 GB" in summary and "bf16 yes" in summary
    assert "CPU mode" not in summary


def test_turing_gpu_has_no_bf16(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(capability=(7, 5)))
    gpus, _ = detect_gpus()
    assert (gpus[0].compute_capability, gpus[0].bf16) == ("7.5", False)
    assert "fp16 compute" in detect().summary()


def test_driver_missing_is_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error="Driver Not Loaded"))
    gpus, note = detect_gpus()
    assert gpus == []
    assert "no NVIDIA driver" in note and "Driver Not Loaded" in note


def test_driver_with_no_gpu_is_a_note(monkeypatch):
    nvml = fake_nvml(count=0)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert detect_gpus() == ([], "the NVIDIA driver reports no GPU")
    assert nvml.calls == ["init", "shutdown"]


# --- catalog recommendations ------------------------------------------------------------------

def ids(free_vram_gb):
    return [pick.model.id for pick in planner.recommend(free_vram_gb)]


def test_cpu_mode_recommends_only_cpu_models():
    assert ids(None) == ["embedded"]
    assert all(pick.model.cpu_ok for pick in planner.recommend(None))


def test_12_gb_fits_gpt_j_but_not_neox():
    # the QLoRA paper: GPT-J 6B fine-tunes in 12 GB
    fitting = ids(12)
    assert "gpt-j-6b" in fitting
    assert "gpt-neox-20b" not in fitting
    assert "qwen2.5-14b" not in fitting


def test_24_gb_fits_neox_20b():
    # the QLoRA paper: a 20B GPT-NeoX fine-tunes in 24 GB
    assert "gpt-neox-20b" in ids(24)
    assert ids(24).index("gpt-neox-20b") <= 1  # largest first: only a 33B may come before it


def test_too_little_memory_recommends_nothing():
    assert ids(0.5) == []


@pytest.mark.parametrize("entry", catalog.load_catalog(), ids=lambda m: m.id)
def test_catalog_entries_are_sane(entry):
    assert entry.hub_id.count("/") == 1
    vram_gb = planner.plan(entry).total_gb  # 512 tokens, micro-batch 1, r=64
    assert 0 < entry.params_b and 0 < vram_gb
    # NF4 with double quant is about 0.52 bytes per parameter: the estimate covers the weights
    assert vram_gb > entry.params_b * 0.52
    assert catalog.find(entry.id) == entry
