"""GPU health during training (engine/gpuhealth.py): NVML faked by a stand-in pynvml module (no GPU
here), plus one test on a real GPU where there is one."""

import json
import sys
import threading
import time
import types

import pytest

from engine.gpuhealth import (GpuSampler, gpu_indices, health_path, health_summary,
                              read_health, throttle_words)
from engine.hardware import GIB
from engine.rundir import RunDir

NOT_SUPPORTED = 3


def fake_nvml(util=97, used_gb=10.2, total_gb=12.0, temp=71, power_mw=280_000, limit_mw=350_000,
              reasons=0, fail_at=None, unsupported=()):
    """A stand-in pynvml whose GPUs (any index) all read alike. `samples` is set once two GPU
    readings were taken; with fail_at=n the n-th utilisation read raises; readings named in
    `unsupported` raise NVML's "Not Supported", as power does on many laptop GPUs."""
    module = types.ModuleType("pynvml")
    module.calls, module.samples, module.count = [], threading.Event(), 0
    module.handles_read = []  # the GPU of each utilisation read

    class NVMLError(Exception):
        def __init__(self, value):
            self.value = value

    def reading(name, value):
        def read(*args):
            if name in unsupported:
                raise NVMLError(NOT_SUPPORTED)
            return value
        return read

    def utilisation(handle):
        assert handle[0] == "handle"
        module.handles_read.append(handle[1])
        module.count += 1
        if module.count == fail_at:
            raise NVMLError(15)  # NVML_ERROR_GPU_IS_LOST
        if module.count >= 2:
            module.samples.set()
        return types.SimpleNamespace(gpu=util, memory=40)

    module.NVMLError = NVMLError
    module.NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    module.NVML_TEMPERATURE_GPU = 0
    module.nvmlInit = lambda: module.calls.append("init")
    module.nvmlShutdown = lambda: module.calls.append("shutdown")
    module.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    module.nvmlDeviceGetUtilizationRates = utilisation
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        total=total_gb * GIB, used=used_gb * GIB, free=(total_gb - used_gb) * GIB)
    module.nvmlDeviceGetTemperature = reading("temp", temp)
    module.nvmlDeviceGetPowerUsage = reading("power", power_mw)
    module.nvmlDeviceGetEnforcedPowerLimit = reading("limit", limit_mw)
    module.nvmlDeviceGetCurrentClocksEventReasons = reading("reasons", reasons)
    return module


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path)


def no_thread_left():
    return not any(t.name == "gpu-health" for t in threading.enumerate())


def test_sampler_writes_records_in_watts_and_gb(run, monkeypatch):
    nvml = fake_nvml(reasons=0x01)  # GpuIdle: not a slowdown worth naming
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    before = time.time()
    with GpuSampler(run, [0], interval_s=0.01, step=lambda: 7):
        assert nvml.samples.wait(timeout=60)
    after = time.time()
    assert no_thread_left() and nvml.calls == ["init", "shutdown"]
    records = read_health(run)
    assert len(records) >= 1  # the second may not be on disk yet when the block ends
    record = records[0]
    assert before - 0.01 <= record.pop("time") <= after + 0.01  # seconds since 1970, rounded
    assert record == {"step": 7, "gpu": 0, "util_pct": 97, "mem_used_gb": 10.2,
                      "mem_total_gb": 12.0, "temp_c": 71, "power_w": 280.0,
                      "power_limit_w": 350.0, "throttle": []}
    assert health_path(run).name == "gpu.jsonl"
    # one whole JSON object per line, appended
    lines = health_path(run).read_text().splitlines()
    assert len(lines) == len(records) and all(json.loads(line) for line in lines)


def test_stop_wakes_the_sampler_at_once(run, monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = GpuSampler(run, [0], interval_s=30)  # a stop that waited out the interval fails below
    assert sampler.start()
    sampler.stop()  # the first sample is taken before the thread first waits
    assert no_thread_left()
    assert len(read_health(run)) == 1 and nvml.calls == ["init", "shutdown"]
    sampler.stop()  # twice is harmless


def test_an_nvml_error_is_logged_once_and_ends_sampling_not_training(run, monkeypatch, caplog):
    nvml = fake_nvml(fail_at=2)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    sampler = GpuSampler(run, [0], interval_s=0.01)
    assert sampler.start()
    sampler._thread.join(timeout=60)  # it ends by itself after the error
    assert not sampler._thread.is_alive()
    sampler.stop()  # what training does at its end: no exception
    assert escaped == []
    assert len(read_health(run)) == 1 and nvml.count == 2  # no sample after the error
    warnings = [r.getMessage() for r in caplog.records if "GPU health" in r.getMessage()]
    assert len(warnings) == 1 and "sampling stopped" in warnings[0]


def test_readings_a_card_lacks_are_empty_and_sampling_goes_on(run, monkeypatch):
    nvml = fake_nvml(unsupported=("power", "limit", "reasons"))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuSampler(run, [0], interval_s=0.01):
        assert nvml.samples.wait(timeout=60)
    record = read_health(run)[0]
    assert (record["power_w"], record["power_limit_w"], record["throttle"]) == (None, None, None)
    assert record["temp_c"] == 71
    assert health_summary([record]) == "GPU 0: 97% busy, 10.2 of 12.0 GB, 71 C"


def test_without_a_gpu_nothing_is_sampled_or_written(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    assert gpu_indices(run, "cpu") == []
    assert not GpuSampler(run, []).start()  # a CPU run
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert not GpuSampler(run, [0]).start()
    broken = fake_nvml()
    broken.nvmlInit = lambda: (_ for _ in ()).throw(broken.NVMLError(9))  # no driver
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    with GpuSampler(run, [0]):
        pass
    assert not health_path(run).exists() and read_health(run) == [] and no_thread_left()
    assert health_summary(read_health(run)) == ""


def test_the_gpus_are_the_ones_the_run_is_pinned_to(run, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what the runner sets: the NVML index
    run.write_status(gpu=3, gpus=[3])
    assert gpu_indices(run, "cuda") == [3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")  # a run on two GPUs
    assert gpu_indices(run, "cuda") == [1, 3]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    run.write_status(gpu=2, gpus=[2, 0])
    assert gpu_indices(run, "cuda") == [2, 0]
    run.write_status(gpu=2, gpus=None)  # a status from before runs held several GPUs
    assert gpu_indices(run, "cuda") == [2]
    run.write_status(gpu=None)  # the runner found no GPU; torch did (started by hand)
    assert gpu_indices(run, "cuda") == [0]


def test_a_run_on_several_gpus_samples_each_of_them(run, monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = GpuSampler(run, [1, 3], interval_s=30, step=lambda: 4)
    assert sampler.start()
    sampler.stop()  # one sample of both, taken before the thread first waits
    records = read_health(run)
    assert [r["gpu"] for r in records] == [1, 3] and nvml.handles_read == [1, 3]
    assert records[0]["time"] == records[1]["time"] and records[1]["step"] == 4  # one sample
    assert health_summary(records).split("\n\n") == [
        "GPU 1: 97% busy, 10.2 of 12.0 GB, 71 C, 280 of 350 W",
        "GPU 3: 97% busy, 10.2 of 12.0 GB, 71 C, 280 of 350 W"]
    from engine.metrics import health_rows

    series = {row["series"] for row in health_rows(records)}
    assert series == {"GPU 1 utilisation %", "GPU 3 utilisation %", "GPU 1 temperature C",
                      "GPU 3 temperature C"}  # a chart line per GPU, not one zigzag


def test_throttle_bits_are_nvmls(monkeypatch):
    nvml = pytest.importorskip("pynvml")  # the real bindings: the bit values must be theirs
    assert throttle_words(nvml.nvmlClocksEventReasonHwThermalSlowdown) == ["thermal"]
    assert throttle_words(nvml.nvmlClocksThrottleReasonSwThermalSlowdown) == ["thermal"]
    assert throttle_words(nvml.nvmlClocksEventReasonHwSlowdown) == ["thermal"]
    assert throttle_words(nvml.nvmlClocksEventReasonSwPowerCap) == ["power cap"]
    assert throttle_words(nvml.nvmlClocksEventReasonHwPowerBrakeSlowdown) == ["power cap"]
    assert throttle_words(nvml.nvmlClocksEventReasonGpuIdle
                          | nvml.nvmlClocksEventReasonApplicationsClocksSetting) == []
    assert throttle_words(nvml.nvmlClocksEventReasonSwPowerCap
                          | nvml.nvmlClocksEventReasonSwThermalSlowdown) == ["thermal", "power cap"]


def test_read_health_skips_a_half_written_last_line(run):
    whole = {"time": 1.0, "step": 3, "gpu": 0, "util_pct": 50, "mem_used_gb": 1.0,
             "mem_total_gb": 8.0, "temp_c": 60, "power_w": 90.0, "power_limit_w": 170.0,
             "throttle": []}
    health_path(run).write_text(json.dumps(whole) + "\n" + '{"time": 6.0, "step": 3, "gp')
    assert read_health(run) == [whole]
    assert read_health(run.path) == [whole]  # a path does as well as a RunDir


def sample(**changes):
    record = {"time": 1.0, "step": 10, "gpu": 0, "util_pct": 97, "mem_used_gb": 10.2,
              "mem_total_gb": 12.0, "temp_c": 71, "power_w": 280.4, "power_limit_w": 350.0,
              "throttle": []}
    return {**record, **changes}


def test_health_summary_in_words():
    assert health_summary([]) == ""
    older = sample(util_pct=5, temp_c=40)
    normal = "GPU 0: 97% busy, 10.2 of 12.0 GB, 71 C, 280 of 350 W"
    assert health_summary([older, sample()]) == normal  # the newest sample
    assert health_summary([sample(gpu=1, temp_c=83, throttle=["thermal"])]) == (
        "GPU 1: 97% busy, 10.2 of 12.0 GB, 83 C, 280 of 350 W. GPU is throttling: 83 C (thermal)")
    assert health_summary([sample(power_w=280.0, power_limit_w=280.0, throttle=["power cap"])]) == (
        "GPU 0: 97% busy, 10.2 of 12.0 GB, 71 C, 280 of 280 W. "
        "GPU is throttling: at its power limit (280 of 280 W)")
    below = health_summary([sample(power_w=272.2, power_limit_w=700.0, throttle=["power cap"])])
    assert below.endswith("GPU is throttling: the driver caps its power (272 of 700 W)")  # an H200
    both = health_summary([sample(temp_c=88, power_w=340.0, throttle=["thermal", "power cap"])])
    assert both.endswith("GPU is throttling: 88 C (thermal), at its power limit (340 of 350 W)")


@pytest.mark.gpu
def test_a_real_gpu_sample_is_plausible(run):
    pytest.importorskip("pynvml")
    sampler = GpuSampler(run, gpu_indices(run, "cuda"))
    assert sampler.start()
    sampler.stop()  # the thread samples once before it first waits
    records = read_health(run)
    assert len(records) == len(gpu_indices(run, "cuda")), records
    record = records[0]
    print(record, health_summary(records))
    assert 0 <= record["util_pct"] <= 100
    assert 10 <= record["temp_c"] <= 110
    assert record["mem_total_gb"] > 1 and 0 <= record["mem_used_gb"] <= record["mem_total_gb"]
    if record["power_w"] is not None:
        assert 0 < record["power_w"] <= 2 * (record["power_limit_w"] or 1000)
    assert isinstance(record["throttle"], list)
    assert health_summary(records).startswith(f"GPU {record['gpu']}: ")
