"""What this machine has: NVIDIA GPUs through NVML (no torch, no CUDA context), RAM and disk via psutil.

NVML is asked rather than torch.cuda so that the UI process can show the hardware without
importing torch or taking GPU memory for a CUDA context.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

GIB = 1024**3


@dataclass
class Gpu:
    index: int
    name: str
    total_gb: float
    free_gb: float
    compute_capability: str  # e.g. "8.6"
    bf16: bool  # native bf16 (gpu_bf16_native)


@dataclass
class Hardware:
    gpus: list[Gpu] = field(default_factory=list)
    cpu_name: str = ""
    cpu_cores: int = 0
    ram_total_gb: float = 0.0
    ram_free_gb: float = 0.0
    disk_free_gb: float = 0.0
    gpu_note: str = ""  # why no GPU was found, in words
    cpu_bf16: bool | None = None  # native bf16 in the CPU's flags (None: flags not readable here)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def summary(self) -> str:
        lines = []
        if self.gpus:
            for gpu in self.gpus:
                lines.append(
                    f"GPU {gpu.index}: {gpu.name}, {gpu.free_gb:.1f} GB free of {gpu.total_gb:.1f} GB, "
                    f"bf16 {'yes' if gpu.bf16 else 'no (fp16 compute)'}"
                )
        else:
            lines.append(f"No GPU: CPU mode, tiny models only ({self.gpu_note})")
        lines.append(
            f"CPU: {self.cpu_cores} cores, RAM {self.ram_free_gb:.1f} GB free of {self.ram_total_gb:.1f} GB"
        )
        if not self.gpus:
            lines.append(f"CPU compute: {cpu_dtype_note(self.cpu_bf16)}")
        lines.append(f"Disk: {self.disk_free_gb:.1f} GB free")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["has_gpu"] = self.has_gpu
        return values


def detect(data_dir: str | Path = ".") -> Hardware:
    memory = psutil.virtual_memory()
    disk_path = Path(data_dir)
    while not disk_path.exists() and disk_path != disk_path.parent:
        disk_path = disk_path.parent
    gpus, note = detect_gpus()
    return Hardware(
        gpus=gpus,
        cpu_name=_cpu_name(),
        cpu_cores=psutil.cpu_count(logical=True) or 0,
        ram_total_gb=round(memory.total / GIB, 1),
        ram_free_gb=round(memory.available / GIB, 1),
        disk_free_gb=round(psutil.disk_usage(str(disk_path)).free / GIB, 1),
        gpu_note=note,
        cpu_bf16=cpu_bf16_native(),
    )


def detect_gpus() -> tuple[list[Gpu], str]:
    """GPUs from NVML, or an empty list and the reason in words."""
    try:
        import pynvml
    except ImportError:
        return [], "the NVIDIA management library bindings (nvidia-ml-py) are not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"no NVIDIA driver found ({exc})"
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                Gpu(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_gb=round(memory.total / GIB, 2),
                    free_gb=round(memory.free / GIB, 2),
                    compute_capability=f"{major}.{minor}",
                    bf16=gpu_bf16_native(major),
                )
            )
        return gpus, "" if gpus else "the NVIDIA driver reports no GPU"
    except pynvml.NVMLError as exc:
        return [], f"the NVIDIA driver did not answer ({exc})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


# Tensor cores compute bf16 from compute capability 8.0 (Ampere: RTX 30xx, A100) on. Older cards
# (RTX 20xx, GTX 16xx) run it emulated, many times slower, so they compute in fp16.
BF16_MIN_CAPABILITY = 8


def gpu_bf16_native(major: int) -> bool:
    """Whether a GPU of this compute capability (its major number) computes bf16 natively: the
    one rule for what the hardware summary says (from NVML) and what a run computes in (from
    torch, engine.models.compute_dtype)."""
    return major >= BF16_MIN_CAPABILITY


# Flags of CPUs that compute bf16 in hardware: AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids;
# AMD Zen 4 and newer) and AMX (Sapphire Rapids). Without them PyTorch emulates bf16 on the CPU.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_native(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has native bf16, from /proc/cpuinfo's flags; None where they cannot be read
    (Windows, macOS), and then training measures bf16 against fp32 instead (engine.models)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), None)
    if flags is None:
        return None
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cpu_dtype_note(native: bool | None) -> str:
    """What a CPU run computes in, as the UI says it before a run (engine.models decides in it)."""
    if native is False:
        return "fp32 (this CPU has no native bf16; emulated bf16 would be many times slower)"
    if native:
        return "bf16 where measured faster than fp32 (this CPU has native bf16)"
    return "bf16 or fp32, whichever a quick measurement at the start of a run finds faster"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# --- which GPU a run (or chat) uses on a machine with several -------------------------------------
# Indices are NVML's, which are nvidia-smi's (PCI bus order). CUDA numbers "fastest first" unless
# CUDA_DEVICE_ORDER=PCI_BUS_ID, so every process we pin gets that too.

def visible_indices() -> list[int] | None:
    """CUDA_VISIBLE_DEVICES as nvidia-smi indices ([] when set empty: no GPU); None when it is
    unset, or names GPU UUIDs or MIG instances, which we cannot map to indices."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        return None


def visible_gpus(gpus: list[Gpu]) -> list[Gpu]:
    """The GPUs this process may use: a CUDA_VISIBLE_DEVICES the person set narrows the list
    (read as nvidia-smi indices); without it, or with names we cannot map, all of them."""
    wanted = visible_indices()
    if wanted is None:
        return gpus
    by_index = {gpu.index: gpu for gpu in gpus}
    return [by_index[index] for index in wanted if index in by_index]


def pick_gpu(gpus: list[Gpu], requested: int = -1) -> Gpu | None:
    """The GPU with index `requested`, or with -1 the one with the most free memory; None when
    there is no GPU (the run trains on the CPU, as device auto does)."""
    if not gpus:
        return None
    if requested < 0:
        return max(gpus, key=lambda gpu: gpu.free_gb)  # ties: the lowest index
    for gpu in gpus:
        if gpu.index == requested:
            return gpu
    from engine.config import ConfigError

    listed = ", ".join(f"{gpu.index} ({gpu.name})" for gpu in gpus)
    raise ConfigError(f"GPU {requested} does not exist on this machine (usable GPUs: {listed}); "
                      "set gpu to one of those, or to -1 for the one with the most free memory")


def run_gpu(requested: int = -1) -> Gpu | None:
    """The GPU a run with config `gpu = requested` trains on, as things stand now."""
    return pick_gpu(visible_gpus(detect_gpus()[0]), requested)


def pin_env(gpu: Gpu) -> dict[str, str]:
    """Environment that shows a new process exactly this one GPU. With several visible,
    transformers' Trainer would split every micro-batch over all of them (DataParallel)."""
    return {"CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def cuda_index(gpu: Gpu) -> int:
    """The number torch gives `gpu` in this process (CUDA_DEVICE_ORDER=PCI_BUS_ID must be set
    before CUDA starts): its place in CUDA_VISIBLE_DEVICES, or its own index without that."""
    wanted = visible_indices() or []
    return wanted.index(gpu.index) if gpu.index in wanted else gpu.index
