"""The memory plan of one run on several GPUs: which way to split it, and what each GPU holds.

Pure Python like engine/planner.py, whose single-GPU parts (memory_bytes) it starts from; only
what several processes change is written here.

- DDP (data parallel): every GPU holds the whole run as planner.plan counts it and trains its own
  micro-batches; the LoRA gradients are averaged after each backward, through DDP's gradient
  buckets (a second copy of the gradients). Up to N x one GPU's tokens/s.
- FSDP-QLoRA: bitsandbytes stores the 4-bit weights in a float dtype (`bnb_4bit_quant_storage`),
  so FSDP can shard them like any parameter. Each GPU keeps 1/N of the 4-bit weights, LoRA
  weights, gradients and optimizer state. It also holds:
  - whole copies of what FSDP does not shard: bitsandbytes' quantization constants (the absmax
    per 64 weights of each layer live beside the module, outside the flat parameter), and the
    root unit (embeddings, head, norms), which the root keeps gathered from forward to backward;
  - the all-gather working set: one block gathered whole for its matmuls, and the next one being
    prefetched (backward_prefetch), each with its LoRA weights and unreduced gradients;
  - its own activations and logits, as on one GPU.
  With CPU offload (FSDP's offload_params, what Answer.AI trained 70B on 2 x 24 GB with) the
  shards live in CPU RAM instead, and only the gathered units, activations and logits stay.
Calibration against Answer.AI's published FSDP-QLoRA runs: tests/test_planner_multi.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.catalog import CatalogModel, load_catalog
from engine.planner import (LORA, NF4_BITS, NF4_DOUBLE_QUANT_BITS, OPTIMIZER, OUR_STACK, WEIGHTS,
                            Plan, Stack, lora_params, memory_bytes, plan_from_parts,
                            unquantized_part)

STRATEGIES = ("auto", "ddp", "fsdp")
# Answer.AI's fsdp_qlora train.py at its README's settings (--precision bf16, LoRA r=64 on all
# linear layers): LoRA weights, gradients and AdamW moments all in bf16. Only the calibration
# uses it.
ANSWERAI_STACK = Stack(upcast_fp32=False, lora_bytes=4, optimizer_bytes=4)
PACKED_BITS = 4  # the NF4 codes, which FSDP shards; a weight's other bits are its constants
DDP_BUCKETS = "DDP gradient buckets"
UNSHARDED_CONSTANTS = "4-bit constants (whole on every GPU)"
GATHERED = "FSDP all-gather: 2 blocks"


class StrategyError(ValueError):
    """A strategy name the planner does not know."""


@dataclass
class Layout:
    """How a run is split over num_gpus GPUs and what each GPU holds."""
    num_gpus: int
    strategy: str  # "single", "ddp" or "fsdp"
    cpu_offload: bool  # FSDP keeps its shards in CPU RAM
    per_gpu: Plan  # one GPU's parts; fits is checked against vram_gb per GPU
    cpu_ram_gb: float  # CPU RAM the offloaded shards take (0 without offload)
    speedup: float  # tokens/s at most this many times one GPU's
    how: str  # what the strategy does, in words
    why: str = ""  # why it was chosen (or asked for), with the figures

    @property
    def fits(self) -> bool:
        return self.per_gpu.fits

    @property
    def label(self) -> str:
        name = {"single": "one GPU", "ddp": "DDP (data parallel)", "fsdp": "FSDP-QLoRA"}
        return name[self.strategy] + (" + CPU offload" if self.cpu_offload else "")

    def to_dict(self) -> dict:
        return {"num_gpus": self.num_gpus, "strategy": self.strategy, "label": self.label,
                "cpu_offload": self.cpu_offload, "per_gpu_gb": self.per_gpu.total_gb,
                "fits": self.fits, "cpu_ram_gb": self.cpu_ram_gb, "speedup": self.speedup,
                "how": self.how, "why": self.why, "per_gpu": self.per_gpu.to_dict()}


def ddp_parts(model: CatalogModel, max_seq_len: int, micro_batch: int, lora_r: int, stack: Stack,
              double_quant: bool) -> dict[str, float]:
    parts = memory_bytes(model, max_seq_len, micro_batch, lora_r, stack, double_quant)
    parts[DDP_BUCKETS] = lora_params(model, lora_r, stack.lora_modules) * stack.lora_bytes / 2
    return parts


def fsdp_parts(model: CatalogModel, num_gpus: int, max_seq_len: int, micro_batch: int,
               lora_r: int, stack: Stack, double_quant: bool, cpu_offload: bool
               ) -> tuple[dict[str, float], float]:
    """One GPU's parts under FSDP, and the bytes of CPU RAM that offloaded shards take."""
    parts = memory_bytes(model, max_seq_len, micro_batch, lora_r, stack, double_quant)
    bits = NF4_DOUBLE_QUANT_BITS if double_quant else NF4_BITS
    packed = model.quantized_params * PACKED_BITS / 8
    unquantized = parts[unquantized_part(stack)]
    sharded = {WEIGHTS: packed, unquantized_part(stack): unquantized, LORA: parts[LORA],
               OPTIMIZER: parts[OPTIMIZER]}
    offloaded = sum(sharded.values()) if cpu_offload else 0.0
    for name, whole in sharded.items():
        parts[name] = 0.0 if cpu_offload else whole / num_gpus
    parts[UNSHARDED_CONSTANTS] = model.quantized_params * (bits - PACKED_BITS) / 8
    parts[unquantized_part(stack)] += unquantized  # the root unit, gathered whole
    block_lora = lora_params(model, lora_r, stack.lora_modules) / model.layers * stack.lora_bytes
    parts[GATHERED] = 2 * (model.linear_params_per_layer * PACKED_BITS / 8 + block_lora)
    return parts, offloaded


def plan_layout(model: CatalogModel, num_gpus: int = 1, strategy: str = "auto",
                max_seq_len: int = 512, micro_batch: int = 1, lora_r: int = 64,
                vram_gb: float | None = None, cpu_offload: bool | None = None,
                stack: Stack = OUR_STACK, double_quant: bool = True) -> Layout:
    """The plan of a run on num_gpus GPUs of vram_gb each (free GB per GPU; None: not checked).

    strategy "ddp" or "fsdp" plans that one; "auto" takes DDP when the whole run fits one GPU
    (faster: nothing but LoRA gradients crosses between GPUs), else FSDP, else FSDP with its
    shards in CPU RAM. cpu_offload True or False forces FSDP's offload either way.
    """
    if strategy not in STRATEGIES:
        raise StrategyError(f"Unknown multi-GPU strategy '{strategy}': use one of "
                            f"{', '.join(STRATEGIES)}.")
    if num_gpus < 1:
        raise StrategyError(f"A run needs at least 1 GPU, not {num_gpus}.")
    shape = (max_seq_len, micro_batch, lora_r)
    if num_gpus == 1:
        parts = memory_bytes(model, *shape, stack, double_quant)
        return Layout(1, "single", False, plan_from_parts(model, parts, *shape, vram_gb), 0.0, 1.0,
                      "one GPU holds the whole run", "one GPU")

    def ddp() -> Layout:
        parts = ddp_parts(model, *shape, stack, double_quant)
        return Layout(num_gpus, "ddp", False, plan_from_parts(model, parts, *shape, vram_gb), 0.0,
                      float(num_gpus), f"each of the {num_gpus} GPUs holds the whole 4-bit model "
                      f"and trains its own micro-batches: up to {num_gpus}x the tokens/s of one")

    def fsdp(offload: bool) -> Layout:
        parts, offloaded = fsdp_parts(model, num_gpus, *shape, stack, double_quant, offload)
        where = " and kept in CPU RAM" if offload else ""
        return Layout(num_gpus, "fsdp", offload, plan_from_parts(model, parts, *shape, vram_gb),
                      round(offloaded / 1024**3, 2), float(num_gpus),
                      f"the 4-bit weights, LoRA weights and optimizer state are split {num_gpus} "
                      f"ways{where}; every step passes each block's weights between the GPUs, so "
                      "the link between them (NVLink or PCIe lanes) sets the speed")

    if strategy != "auto":
        layout = ddp() if strategy == "ddp" else fsdp(bool(cpu_offload))
        layout.why = f"{strategy} as asked: {layout.per_gpu.total_gb:.1f} GB per GPU"
        return layout
    layout = ddp()
    if layout.fits and not cpu_offload:
        layout.why = f"the model fits one GPU ({layout.per_gpu.total_gb:.1f} GB), so DDP: faster"
        return layout
    tried = [f"DDP would need {layout.per_gpu.total_gb:.1f} GB per GPU"]
    offloads = [bool(cpu_offload)] if cpu_offload is not None else [False, True]
    for offload in offloads:
        layout = fsdp(offload)
        if layout.fits or offload == offloads[-1]:
            break
        tried.append(f"FSDP without CPU offload {layout.per_gpu.total_gb:.1f} GB")
    free = f" of {vram_gb:.1f} GB free" if vram_gb is not None else ""
    layout.why = ", ".join(tried) + free
    if not layout.fits:
        layout.why = (f"does not fit even sharded ({layout.per_gpu.total_gb:.1f} GB per GPU"
                      f"{free}); {layout.why}")
    return layout


def layouts(model: CatalogModel, free_vram_gbs: list[float], strategy: str = "auto",
            max_seq_len: int = 512, micro_batch: int = 1, lora_r: int = 64) -> list[Layout]:
    """What 1..N of these GPUs give: the GPUs with the most free memory first, each layout
    checked against the least free memory among the GPUs it uses."""
    free = sorted(free_vram_gbs, reverse=True)
    return [plan_layout(model, n, strategy if n > 1 else "auto", max_seq_len, micro_batch, lora_r,
                        free[n - 1]) for n in range(1, len(free) + 1)]


def largest_fits(free_vram_gbs: list[float], lora_r: int = 16, max_seq_len: int = 1024
                 ) -> list[Layout | None]:
    """For 1..N of these GPUs (most free memory first), the largest catalog model that fits at
    max_seq_len x micro-batch 1 the way plan_layout's "auto" trains it; None where none does."""
    models = [m for m in load_catalog() if m.max_context >= max_seq_len]
    models.sort(key=lambda m: m.total_params, reverse=True)
    free = sorted(free_vram_gbs, reverse=True)
    best = []
    for n in range(1, len(free) + 1):
        fitting = (plan_layout(m, n, "auto", max_seq_len, 1, lora_r, free[n - 1]) for m in models)
        best.append(next((layout for layout in fitting if layout.fits), None))
    return best
