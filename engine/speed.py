"""How fast a run trains, as a first guess before its own steps say: the GPU table
(presets/gpus.yaml: each card's memory, bandwidth and 16-bit tensor rate) and the time estimate the
Train tab shows. A running run's ETA comes from its measured pace instead (engine/callback.py)."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from engine.catalog import CatalogModel
from engine.config import PRESETS_DIR

# Measured here, not DESIGN.md's 260 tokens/s: our engine trained the quick-test recipe on
# SmolLM2-135M (2 cores) at about 90 tokens/s (7,184 tokens in 78 s; bench/cpu_train.md: 71 at r=64),
# before our kernels; `kernels: auto` then trained that recipe 1.38x as fast as `off` (median steps,
# 212 against 154 tokens/s, run headless), so about 124 tokens/s in the browser.
CPU_FLOPS = 1.04e11
GPU_UTILISATION = 0.30  # share of the dense tensor rate QLoRA reaches (4-bit dequant each matmul)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    vram_gb: float
    bf16: bool
    bandwidth_gbs: float
    tflops_16bit: float  # dense bf16/fp16 tensor rate with fp32 accumulation


def load_gpus() -> list[GpuSpec]:
    return [GpuSpec(**entry) for entry in yaml.safe_load((PRESETS_DIR / "gpus.yaml").read_text())]


def find_gpu(name: str, vram_gb: float | None = None) -> GpuSpec | None:
    """The table's card for a detected or typed name ("NVIDIA GeForce RTX 3060", "3060", "rtx 4090")."""
    wanted = " ".join(name.lower().replace("geforce", "").replace("nvidia", "").split())
    if wanted and not wanted.startswith("rtx"):
        wanted = "rtx " + wanted
    cards = [g for g in load_gpus() if g.name.lower() == wanted]
    if not cards:  # the longest table name that the detected name ends with ("RTX 4070 Ti SUPER")
        cards = [g for g in load_gpus() if wanted.endswith(g.name.lower())]
        longest = max((len(g.name) for g in cards), default=0)
        cards = [g for g in cards if len(g.name) == longest]
    if not cards:
        return None
    if vram_gb is None:
        return max(cards, key=lambda g: g.vram_gb)
    return min(cards, key=lambda g: abs(g.vram_gb - vram_gb))


def training_flops_per_token(model: CatalogModel, max_seq_len: int) -> float:
    """Forward, recomputed forward and input-gradient backward: about 3 x 2 FLOPs per weight used
    (frozen weights need no weight gradient), plus causal attention's score and value matmuls."""
    matmul_params = model.quantized_params + model.vocab * model.hidden
    attention = 2 * 2 * model.layers * model.heads * model.head_size * max_seq_len / 2
    return 3 * (2 * matmul_params + attention)


def tokens_per_second(model: CatalogModel, max_seq_len: int, gpu: GpuSpec | None) -> float:
    """A first guess of training speed; the live tokens/s in metrics.jsonl replaces it."""
    rate = CPU_FLOPS if gpu is None else gpu.tflops_16bit * 1e12 * GPU_UTILISATION
    return rate / training_flops_per_token(model, max_seq_len)


@dataclass(frozen=True)
class TimeEstimate:
    """A first guess of a run's training time and what it rests on. The ETA of a running run
    comes from its real pace instead (engine.callback)."""
    tokens_per_s: float | None  # None: no speed figure for this hardware
    speed_from: str  # where that speed comes from, in words
    tokens: float | None = None  # tokens the run trains on, all epochs; None before data is read
    what: str = ""  # what those tokens are: "8 epochs of 898 tokens", "20 steps"

    @property
    def seconds(self) -> float | None:
        if self.tokens is None or not self.tokens_per_s:
            return None
        return self.tokens / self.tokens_per_s


def estimate_time(model: CatalogModel, max_seq_len: int, gpu=None, rows: int = 0,
                  tokens_per_epoch: int = 0, epochs: float = 1.0, max_steps: int = -1,
                  rows_per_step: int = 1) -> TimeEstimate:
    """How long a run trains: the data's tokens (max_steps steps of rows_per_step rows, else
    `epochs` passes) at the first-guess speed. gpu: the detected card the run trains on
    (engine.hardware.Gpu), None for a CPU run; no data yet (rows 0): the speed only."""
    spec = find_gpu(gpu.name, gpu.total_gb) if gpu else None
    if gpu is None:
        speed_from = ("scaled to this model from what our engine measured on a 2-core CPU, "
                      f"{CPU_FLOPS / 1e9:.0f} GFLOP/s of training work; CPUs differ several-fold")
    elif spec is None:
        return TimeEstimate(None, f"the {gpu.name} has no speed figure in presets/gpus.yaml")
    else:
        speed_from = (f"{GPU_UTILISATION:.0%} of the {spec.name}'s {spec.tflops_16bit:g} TFLOPS "
                      "16-bit tensor rate, a figure not yet measured on a GPU")
    speed = tokens_per_second(model, max_seq_len, spec)
    if not rows or not tokens_per_epoch:
        return TimeEstimate(speed, speed_from)
    if max_steps > 0:
        tokens = tokens_per_epoch / rows * rows_per_step * max_steps
        what = f"{max_steps} steps"
    else:
        tokens = tokens_per_epoch * max(epochs, 0.0)
        what = f"{epochs:g} epochs of {tokens_per_epoch:,} tokens"
    return TimeEstimate(speed, speed_from, tokens, what)
