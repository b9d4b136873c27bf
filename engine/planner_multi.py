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
from engine.planner import (LORA, NF4_BITS, NF4_DOUBLE_QUANT_BITS, OPTIMIZER, OUR_STACK,
                            SAFETY, WEIGHTS, Plan, Stack, lora_params, memory_bytes,
                            plan_from_parts, unquantized_part)

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
                stack: Stack = OUR_STACK, double_quant: bool = True,
                ddp_stack: Stack | None = None) -> Layout:
    """The plan of a run on num_gpus GPUs of vram_gb each (free GB per GPU; None: not checked).

    strategy "ddp" or "fsdp" plans that one; "auto" takes DDP when the whole run fits one GPU
    (faster: nothing but LoRA gradients crosses between GPUs), else FSDP, else FSDP with its
    shards in CPU RAM. cpu_offload True or False forces FSDP's offload either way. ddp_stack:
    the stack DDP (and one GPU) trains with where it differs from FSDP's (run_layout).
    """
    if strategy not in STRATEGIES:
        raise StrategyError(f"Unknown multi-GPU strategy '{strategy}': use one of "
                            f"{', '.join(STRATEGIES)}.")
    if num_gpus < 1:
        raise StrategyError(f"A run needs at least 1 GPU, not {num_gpus}.")
    shape = (max_seq_len, micro_batch, lora_r)
    unsharded = ddp_stack or stack
    if num_gpus == 1:
        parts = memory_bytes(model, *shape, unsharded, double_quant)
        single = plan_from_parts(model, parts, *shape, vram_gb, stack=unsharded)
        return Layout(1, "single", False, single, 0.0, 1.0, "one GPU holds the whole run",
                      "one GPU")

    def ddp() -> Layout:
        parts = ddp_parts(model, *shape, unsharded, double_quant)
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


def run_layout(cfg, free_gbs: list[float]) -> Layout | None:
    """The layout a run on several processes trains with, each GPU checked against the least
    free memory among free_gbs (this machine's GPUs for the run): its strategy, or for auto what
    plan_layout picks; on several machines auto means DDP, as each machine would decide from its
    own GPUs, maybe differently. The launcher (engine/fsdp.choose) and the pre-flight check
    (layout_refusal) both plan here, so a run is never refused for a layout it would not take.
    None when the planner does not know the model's size."""
    from engine.planner import model_shape, stack_for

    shape = model_shape(cfg.model)
    if shape is None:
        return None
    strategy = cfg.strategy
    if cfg.num_machines > 1 and strategy == "auto":
        strategy = "ddp"
    # Our kernels/ pieces run only on unsharded weights (engine/kernel_path.py): DDP trains
    # with them, FSDP with the reference stack.
    layout = plan_layout(shape, len(free_gbs) * cfg.num_machines, strategy, cfg.max_seq_len,
                         cfg.micro_batch_size, cfg.lora_r, min(free_gbs),
                         ddp_stack=stack_for(cfg.kernels, "cuda", cfg.optimizer))
    if strategy != cfg.strategy:
        layout.why = "on several machines auto means DDP: set strategy fsdp to shard the model"
    return layout


def layout_refusal(cfg, vram_gb: float | None = None, our_run_holds_gpu: bool = False
                   ) -> str | None:
    """planner.config_refusal for a run on several processes: None when each of its GPUs holds
    its share as run_layout plans it, else why not and what to change. vram_gb: the free GB of
    each GPU (else each of the run's GPUs as detected, our chat model's memory counted free, and
    their totals while one of our runs holds them); CPU processes are never refused."""
    from dataclasses import replace

    from engine.config import ConfigError
    from engine.planner import chat_held_gb
    from engine.runner import run_gpus

    if vram_gb is not None:
        free_gbs = [vram_gb] * cfg.processes_here()
    else:
        try:
            gpus = run_gpus(cfg)
        except ConfigError as exc:  # the GPUs it names are not all here
            return str(exc)
        free_gbs = [gpu.total_gb if our_run_holds_gpu else
                    min(gpu.free_gb + chat_held_gb(gpu), gpu.total_gb) for gpu in gpus]
    if not free_gbs:
        return None
    layout = run_layout(cfg, free_gbs)
    if layout is None or layout.fits:
        return None

    def fits(**changes) -> Layout | None:
        changed = run_layout(replace(cfg, **changes), free_gbs)
        return changed if changed.fits else None

    fixes = []
    sharded = cfg.strategy != "auto" and fits(strategy="auto")
    if sharded:
        offload = f" and {sharded.cpu_ram_gb:.0f} GB of CPU RAM" if sharded.cpu_offload else ""
        fixes.append(f"set strategy to auto, which takes {sharded.label} "
                     f"({sharded.per_gpu.total_gb:.1f} GB per GPU{offload})")
    length = max((n for n in range(64, cfg.max_seq_len, 64) if fits(max_seq_len=n)), default=0)
    if length:
        fixes.append(f"set max_seq_len to {length} or less")
    if cfg.micro_batch_size > 1 and fits(micro_batch_size=1):
        fixes.append(f"set micro_batch_size to 1 (and grad_accum_steps {cfg.micro_batch_size}x "
                     "higher)")
    fixes.append("pick a smaller model, or train on more GPUs")
    return (f"{layout.per_gpu.name} on {layout.num_gpus} GPUs with {layout.label} needs about "
            f"{layout.per_gpu.total_gb:.1f} GB on each GPU, but the least free of them has "
            f"{min(free_gbs):.1f} GB free and runs need {1 - SAFETY:.0%} headroom. To fit: "
            + "; or ".join(fixes) + ".")


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
