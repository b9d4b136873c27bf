"""The compute dtype a run gets on the machine it runs on: bf16 only where it is fast.

A CPU without native bf16 (AMD Zen 2/3, older Intel) emulates it: a 2-core Zen 3 trained about 20x
slower in bf16 than in fp32. A Turing GPU (RTX 20xx) answers yes to torch's plain bf16 question
through emulation, and must get fp16."""

import pytest
import torch

from engine import models
from engine.hardware import (Gpu, Hardware, cpu_bf16_native, cpu_dtype_note, detect,
                             gpu_bf16_native)

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_bf16_native(ZEN3) is False
    assert cpu_bf16_native(ZEN4) is True
    assert cpu_bf16_native(SAPPHIRE_RAPIDS) is True
    assert cpu_bf16_native("processor\t: 0\n") is None  # no flags line (an ARM kernel, say)


def test_the_hardware_summary_says_what_a_cpu_run_computes_in(monkeypatch):
    monkeypatch.setattr("engine.hardware.detect_gpus", lambda: ([], "no NVIDIA driver found"))
    monkeypatch.setattr("engine.hardware.cpu_bf16_native", lambda: False)
    summary = detect().summary()
    assert "CPU compute: fp32" in summary and "no native bf16" in summary
    assert "measurement" in cpu_dtype_note(None) and "bf16" in cpu_dtype_note(True)


@pytest.fixture
def cpu(monkeypatch):
    """compute_dtype on a CPU whose flags and matmul timings the test sets."""
    models.cpu_compute_dtype.cache_clear()
    yield monkeypatch
    models.cpu_compute_dtype.cache_clear()


def test_a_cpu_without_native_bf16_computes_in_fp32_without_measuring(cpu):
    cpu.setattr(models, "cpu_bf16_native", lambda: False)
    cpu.setattr(models, "_matmul_seconds", lambda dtype: pytest.fail("no measurement needed"))
    dtype, why = models.compute_dtype("auto", "cpu")
    assert dtype == torch.float32
    assert "no native bf16" in why


@pytest.mark.parametrize("native", [True, None])
def test_bf16_is_chosen_only_where_it_measures_faster(cpu, native):
    cpu.setattr(models, "cpu_bf16_native", lambda: native)
    timings = {torch.bfloat16: 1.0, torch.float32: 4.0}
    cpu.setattr(models, "_matmul_seconds", timings.get)
    dtype, why = models.compute_dtype("auto", "cpu")
    assert dtype == torch.bfloat16 and "4.0x" in why
    models.cpu_compute_dtype.cache_clear()
    timings.update({torch.bfloat16: 3.0, torch.float32: 1.0})  # flags say yes, the clock says no
    dtype, why = models.compute_dtype("auto", "cpu")
    assert dtype == torch.float32 and "0.3x" in why


def test_the_measurement_times_real_matmuls():
    assert 0 < models._matmul_seconds(torch.float32) < 5


def test_an_explicit_choice_is_kept_and_said(cpu):
    cpu.setattr(models, "cpu_bf16_native", lambda: pytest.fail("no detection for an explicit dtype"))
    assert models.compute_dtype("bf16", "cpu") == (torch.bfloat16, "bf16, as the run's settings ask")
    assert models.compute_dtype("fp32", "cuda")[0] == torch.float32


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_a_gpu_computes_in_bf16_exactly_where_the_hardware_summary_says_so(monkeypatch, capability,
                                                                          dtype):
    # Turing (7.5) answers yes to torch.cuda.is_bf16_supported() through emulation: the one rule
    # (hardware.gpu_bf16_native, from the compute capability) gives it fp16, here and for NVML.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen, why = models.compute_dtype("auto", "cuda")
    assert chosen == dtype and f"{capability[0]}.{capability[1]}" in why
    assert (chosen == torch.bfloat16) == gpu_bf16_native(capability[0])
    nvml_view = Gpu(0, "card", 12.0, 10.0, "", gpu_bf16_native(capability[0]))
    assert Hardware(gpus=[nvml_view]).summary().count("bf16 yes") == (chosen == torch.bfloat16)


def test_the_train_tab_says_what_a_run_computes_in():
    from app.train_tab import status_markdown

    text = status_markdown({"state": "running", "device": "cpu", "message": "step 3",
                            "compute_why": "fp32: this CPU has no native bf16"}, [])
    assert "On cpu, computing in fp32: this CPU has no native bf16" in text


@pytest.mark.parametrize("busy_percent, threads", [(3.0, 2), (55.0, 1), (100.0, 1)])
def test_a_cpu_run_computes_with_the_cores_that_are_idle(monkeypatch, busy_percent, threads):
    # A core shared with a busy program makes every op wait for it: 2.23 s a step with 2 threads
    # against 1.18 s with 1, measured on 2 cores beside one busy process.
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: busy_percent)
    got, why = models.cpu_threads(sample_s=0)
    assert got == threads and f"{threads} of 2 cores" in why
    assert ("busy" in why) == (threads < 2)
