"""Hardware detection through NVML (real: no GPU here; faked: one card) and the model catalog's
recommendations for a given amount of free GPU memory."""

import sys
import types

import pytest

from engine import catalog, planner
from engine.config import ConfigError
from engine.hardware import (GIB, Gpu, cuda_index, detect, detect_gpus, gpu_bf16_native, pick_gpu,
                             pin_env, visible_gpus)


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


@pytest.mark.parametrize("capability, native", [((6, 1), False), ((7, 5), False), ((8, 0), True),
                                                ((8, 9), True), ((12, 0), True)])
def test_nvml_bf16_follows_the_one_capability_rule(monkeypatch, capability, native):
    # Pascal and Turing emulate bf16; Ampere, Ada, Hopper and Blackwell compute it natively.
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(capability=capability))
    assert gpu_bf16_native(capability[0]) is native
    assert detect_gpus()[0][0].bf16 is native


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


# --- several GPUs: which one a run uses ----------------------------------------------------------

def card(index, free_gb, name=""):
    return Gpu(index=index, name=name or f"RTX {index}", total_gb=24.0, free_gb=free_gb,
               compute_capability="8.6", bf16=True)


def test_pick_gpu_without_a_gpu_is_the_cpu():
    assert pick_gpu([], -1) is None
    assert pick_gpu([], 1) is None  # a config from a GPU machine still trains here, on the CPU


def test_pick_gpu_auto_takes_the_most_free_memory():
    one, two, three = [card(0, 5.0)], [card(0, 5.0), card(1, 20.0)], [card(0, 5.0), card(1, 9.0),
                                                                     card(2, 21.0)]
    assert pick_gpu(one, -1).index == 0
    assert pick_gpu(two, -1).index == 1
    assert pick_gpu(three, -1).index == 2
    assert pick_gpu([card(0, 8.0), card(1, 8.0)], -1).index == 0  # a tie: the first


def test_pick_gpu_by_index_and_a_missing_index_is_named():
    three = [card(0, 5.0), card(1, 9.0, "RTX 3060"), card(2, 21.0)]
    assert pick_gpu(three, 0).index == 0 and pick_gpu(three, 1).name == "RTX 3060"
    with pytest.raises(ConfigError) as error:
        pick_gpu(three, 3)
    assert "GPU 3 does not exist" in str(error.value) and "1 (RTX 3060)" in str(error.value)
    assert "-1" in str(error.value)


def test_cuda_visible_devices_narrows_the_gpus_and_renumbers_them_for_torch(monkeypatch):
    three = [card(0, 5.0), card(1, 9.0), card(2, 21.0)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus(three) == three and cuda_index(three[2]) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [g.index for g in visible_gpus(three)] == [2, 0]
    assert cuda_index(three[0]) == 1  # torch's second device
    with pytest.raises(ConfigError):
        pick_gpu(visible_gpus(three), 1)  # hidden by the person's CUDA_VISIBLE_DEVICES
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus(three) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8d1c2a")
    assert visible_gpus(three) == three  # a UUID: not ours to map, nothing narrowed


def test_pin_env_shows_one_gpu_in_nvidia_smi_order():
    assert pin_env(card(3, 1.0)) == {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_two_gpus_from_nvml_keep_their_indices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(count=2))
    gpus, _ = detect_gpus()
    assert [g.index for g in gpus] == [0, 1]
    assert "GPU 1: NVIDIA GeForce RTX 3060" in detect().summary()


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
