"""GPU health while a run trains: how busy, full, hot and power-hungry the card is, and whether it
slows itself down (throttles). Sampled through NVML, not torch, so it costs training nothing.

The training process (the main one of a run on several) runs a GpuSampler around trainer.train;
it appends one JSON object per GPU the run holds and sample to the run directory's gpu.jsonl
(append-only, like metrics.jsonl), which the UI reads with read_health and puts into words with
health_summary. A CPU run samples nothing and writes no file.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from engine.hardware import GIB, visible_indices
from engine.rundir import RunDir, append_line, read_lines

log = logging.getLogger("engine.train")

FILE_NAME = "gpu.jsonl"
# Every 5 s is about 17,000 lines (some 3 MB) a day: small enough to keep whole and to read whole.
INTERVAL_S = 5.0

# Bits of nvmlDeviceGetCurrentClocksEventReasons (the same values as the older
# nvmlClocksThrottleReason* names). Idle, sync boost and application clocks are not problems.
THROTTLE_REASONS = {
    # HwSlowdown (the card's own emergency brake, mostly for heat), Sw- and HwThermalSlowdown
    "thermal": 0x08 | 0x20 | 0x40,
    # SwPowerCap (at the board's power limit), HwPowerBrakeSlowdown (the power supply asked)
    "power cap": 0x04 | 0x80,
}


def health_path(run: RunDir | str | Path) -> Path:
    return _run(run).path / FILE_NAME


def gpu_indices(run: RunDir, device: str) -> list[int]:
    """The NVML indices of the GPUs the run trains on here ([] on the CPU). The runner pins the
    training process, and with it all of a run's processes, with CUDA_VISIBLE_DEVICES=<NVML
    indices> and CUDA_DEVICE_ORDER=PCI_BUS_ID, and records the indices in status.json's gpus
    field (gpu: the first)."""
    if device != "cuda":
        return []
    pinned = visible_indices()
    if pinned:
        return pinned
    status = run.read_status()
    if status.get("gpus"):
        return list(status["gpus"])
    if isinstance(status.get("gpu"), int):
        return [status["gpu"]]
    return [0]  # started by hand, unpinned: almost always a one-GPU machine


class GpuSampler:
    """Samples the GPUs `indices` (NVML's numbers) every `interval_s` seconds on a daemon thread
    until stop() (or the end of a `with` block). Any NVML error is logged once and ends the
    sampling, never the training."""

    def __init__(self, run: RunDir, indices: list[int], interval_s: float = INTERVAL_S,
                 step: Callable[[], int | None] | None = None):
        self.run = _run(run)
        self.indices = list(indices)
        self.interval_s = interval_s
        self.step = step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handles: dict[int, object] = {}

    def start(self) -> bool:
        """Begin sampling; False (and nothing written) without a GPU or without NVML."""
        if not self.indices:
            return False
        try:
            import pynvml
        except ImportError:
            return False
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no driver: training goes on without health
            log.warning("GPU health is not sampled: NVML did not start (%s)", exc)
            return False
        try:
            self._handles = {index: pynvml.nvmlDeviceGetHandleByIndex(index)
                             for index in self.indices}
        except Exception as exc:  # noqa: BLE001
            log.warning("GPU health is not sampled: NVML has no GPU %s (%s)",
                        ", ".join(map(str, self.indices)), exc)
            _shutdown(pynvml)
            return False
        self._nvml = pynvml
        self._thread = threading.Thread(target=self._loop, name="gpu-health", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        # Bounded: a hung driver call must not hold up the end of training (the thread is a daemon).
        self._thread.join(timeout=self.interval_s + 10)
        if not self._thread.is_alive():
            _shutdown(self._nvml)
        self._thread = None

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def sample(self) -> list[dict]:
        """One record per GPU, read now (all with the same time and step)."""
        now, step = round(time.time(), 2), self.step() if self.step else None
        return [self._record(index, handle, now, step) for index, handle in self._handles.items()]

    def _record(self, index: int, handle, now: float, step: int | None) -> dict:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        power_mw = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = _optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons  # the name before driver 535
        bits = _optional(nvml, reasons, handle)
        return {
            "time": now,
            "step": step,
            "gpu": index,
            "util_pct": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "mem_used_gb": round(memory.used / GIB, 2),
            "mem_total_gb": round(memory.total / GIB, 2),
            "temp_c": _optional(nvml, nvml.nvmlDeviceGetTemperature, handle,
                                nvml.NVML_TEMPERATURE_GPU),
            "power_w": None if power_mw is None else round(power_mw / 1000, 1),
            "power_limit_w": None if limit_mw is None else round(limit_mw / 1000, 1),
            "throttle": None if bits is None else throttle_words(bits),
        }

    def _loop(self) -> None:
        while True:
            try:
                for record in self.sample():
                    append_line(health_path(self.run), record)
            except Exception as exc:  # noqa: BLE001 - health is a nicety; training must go on
                log.warning("GPU health sampling stopped: %s: %s", type(exc).__name__, exc)
                return
            if self._stop.wait(self.interval_s):
                return


def throttle_words(bits: int) -> list[str]:
    """NVML's clock event bits as words, each once: [], ["thermal"], ["power cap"] or both."""
    return [word for word, mask in THROTTLE_REASONS.items() if bits & mask]


def read_health(run: RunDir | str | Path) -> list[dict]:
    """Every sample of a run, oldest first; [] when there is none (a CPU run, not started yet)."""
    return read_lines(health_path(run))


def health_summary(records: list[dict]) -> str:
    """The newest sample of each GPU in words, a paragraph each (the summary is shown as
    Markdown, where a single line break is none), e.g. "GPU 0: 97% busy, 10.2 of 12.0 GB, 71 C,
    280 of 350 W", followed by what slows the GPU down when it throttles; "" without samples."""
    newest = {record.get("gpu", 0): record for record in records}
    return "\n\n".join(_gpu_words(newest[gpu]) for gpu in sorted(newest))


def _gpu_words(r: dict) -> str:
    parts = [f"{r['util_pct']:.0f}% busy", f"{r['mem_used_gb']:.1f} of {r['mem_total_gb']:.1f} GB"]
    if r.get("temp_c") is not None:
        parts.append(f"{r['temp_c']:.0f} C")
    power = _watts(r)
    if power:
        parts.append(power)
    text = f"GPU {r.get('gpu', 0)}: " + ", ".join(parts)
    why = []
    throttle = r.get("throttle") or []
    if "thermal" in throttle:
        why.append(f"{r['temp_c']:.0f} C (thermal)" if r.get("temp_c") is not None else "thermal")
    if "power cap" in throttle:
        # Datacenter cards (seen on an H200 at 272 of 700 W) set the power-cap bit well below the
        # limit, while their power manager balances clocks; only near the limit is it the limit.
        limit = r.get("power_limit_w")
        if r.get("power_w") is not None and limit and r["power_w"] >= 0.9 * limit:
            why.append(f"at its power limit ({power})")
        else:
            why.append(f"the driver caps its power ({power})" if power else "power cap")
    if why:
        text += ". GPU is throttling: " + ", ".join(why)
    return text


def _watts(record: dict) -> str:
    power, limit = record.get("power_w"), record.get("power_limit_w")
    if power is None:
        return ""
    return f"{power:.0f} of {limit:.0f} W" if limit is not None else f"{power:.0f} W"


def _optional(nvml, call, *args):
    """A reading some cards do not have (power on many laptop GPUs): None instead of an error."""
    try:
        return call(*args)
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
            return None
        raise


def _shutdown(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - nothing left to do about it
        pass


def _run(run: RunDir | str | Path) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)
