"""How much GPU memory a QLoRA run needs, before it starts: a breakdown a person can read.

Pure Python (no torch), so the UI can call it on every slider move. Hand-written because no kept
library models *our* stack (transformers + peft + bitsandbytes with the casts below); accelerate's
`estimate-memory` covers weights only.

What our engine does (engine/train.py), and what each part below charges for it:
- bitsandbytes stores every linear weight of every block in NF4 with double quantization:
  4 bits + 8-bit absmax per 64 + fp32 second-level constant per 256*64 = 4.127 bits per weight.
  Embeddings, the output head and norms stay unquantized.
- peft's prepare_model_for_kbit_training casts every non-4-bit parameter to fp32 (peft 0.21,
  utils/other.py); the paper's qlora.py casts the frozen embeddings and head back to 16 bits, and
  engine/train.py never upcasts them (prepare_for_kbit_training: no transient fp32 copy, which was
  the loading peak on an H200). So they cost 2 bytes per weight, the residual
  stream leaving a 16-bit embedding is 16-bit (gradient checkpoints: 2 bytes per hidden unit),
  and no 16-bit copy of the head is made under autocast. HF_PEFT_STACK is the plain Hugging Face
  recipe without that cast: fp32 embeddings, head and residual, plus a bf16 copy of the head
  (vocab * hidden * 2 bytes) saved for backward.
- LoRA adapters (all linear layers) are fp32: weight 4 + gradient 4 + AdamW 32-bit state 8 bytes.
- transformers 5.23's ForCausalLMLoss upcasts logits to fp32 (`logits.float()`, loss_utils.py)
  and cross_entropy keeps fp32 log-probabilities for backward: with the bf16 logits and the fp32
  gradient that is about 12 bytes per token per vocabulary entry at the peak.
- Gradient checkpointing (use_reentrant False) keeps each block's input; one block at a time is
  recomputed with its LoRA dropout masks and casts (LAYER_HIDDEN_BYTES, LAYER_INTERMEDIATE_BYTES).
- SDPA attention is memory-efficient (no seq^2 term). Architectures without SDPA in transformers
  (GPT-J; Gemma 2, whose softcapping SDPA lacks: presets/attention.yaml) run eager attention, which
  materialises heads * seq^2 scores per sequence in the recomputed block.

Calibration (tests/test_planner.py holds each within the tolerance named there):
- Unsloth's linear fit for Llama-3.1-8B QLoRA r=32 batch 1 with Hugging Face + FlashAttention-2
  (HF_PEFT_STACK: ours without the cast back): about 9.7 GB + 2.5 MB per token of torch-reserved memory. The two
  layer constants were set so our slope lands on 2.5 MB/token; the intercept (no constant fitted)
  comes out at 9.7 GiB. Both within 10%.
- Unsloth's own stack, same model: 7.4 GB intercept. The model with 16-bit embeddings (ours, and
  Unsloth's) gives 6.8 GiB: within 10%. Its 0.21 MB/token slope comes from
  offloading checkpoints to CPU RAM and a fused loss, which we do not do; not modelled.
- The QLoRA paper (reference qlora.py: LoRA in bf16, embeddings bf16, paged AdamW): LLaMA 33B in
  about 21 GB and 65B under 48 GB at batch 1 x 512 tokens, r=64. Paged optimizer state lives in
  CUDA unified memory, outside PyTorch's allocator and evicted to CPU RAM under pressure, so the
  paper's figures do not hold it resident: PAPER_STACK says so.
- torchtune's Llama-3.1-8B QLoRA at batch 2 x 2048 packed, 7.4 GiB: its stack (bf16 everything,
  LoRA rank 8 without dropout, chunked loss) is far enough from ours that we only check the same
  formula with its settings lands within 15%.
Not yet measured on our engine: bench/memory.md says how (bench/gpu_check.py).

`kernels: auto` (stack_for): each piece of our kernels/ package that presets/kernels.yaml turns on
for the device class changes its own term of OUR_STACK, and nothing else:
- chunked_loss: the loss peak covers one chunk of LOSS_CHUNK_TOKENS tokens, not the whole batch.
- lora16: LoRA weights and gradients in 16 bits (2 + 2 bytes), as qlora.py keeps them; the AdamW
  state stays 32-bit, and on CUDA it is paged (bitsandbytes' paged AdamW), so the plan reports it
  as what may spill to CPU RAM instead of counting it in VRAM, as PAPER_STACK does. That is how the
  `paper` recipe fits LLaMA 33B on a 24 GB card at 512 tokens (tests/test_planner_kernels.py).
- lora4bit, on CUDA: the dequantisation buffers it keeps for the whole run, one per weight shape
  of a block, shared by every layer, instead of the largest weight dequantised afresh for each
  matmul (bitsandbytes' MatMul4Bit frees it after; it saves only the packed weight). On the CPU,
  where bitsandbytes has no in-place dequantisation, it dequantises afresh too: no term changes.
  Its saved activations (no LoRA dropout copies) are smaller than peft's, but not counted: the
  layer constants come from a fit, and the GPU benchmark will measure it.
- padding_free changes no term: the plan is for full-length rows, the worst case a batch can
  reach, where there are no pad tokens to drop.
Several GPUs (DDP, FSDP-QLoRA): engine/planner_multi.py, from memory_bytes' parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from engine.catalog import CatalogError, CatalogModel, find, load_catalog, shape_from_config
from engine.kernel_choice import KernelChoiceError, allows_lora16, kernel_pieces, optimizer_for

GIB = 1024**3
NF4_DOUBLE_QUANT_BITS = 4.127  # 4 + 8/64 + 32/(64*256)
NF4_BITS = 4.5  # without double quantization: an fp32 absmax per 64 weights
# One recomputed block's working set per token, in bytes per hidden unit and per intermediate unit:
# norms in fp32, q/k/v/o and MLP outputs in bf16, LoRA dropout copies and masks of each input.
# Set so Llama-3.1-8B's slope matches Unsloth's HF+FA2 fit (2.5 MB/token); see the module doc.
LAYER_HIDDEN_BYTES = 60
LAYER_INTERMEDIATE_BYTES = 14
EAGER_ATTENTION_BYTES = 10  # per head per (query, key) pair: bf16 scores, fp32 softmax, grads
CUDA_CONTEXT_GB = 0.5  # the process's CUDA context + cuBLAS workspace; not in torch's counters
SAFETY = 0.90  # plan for 90% of free VRAM: the estimate's tolerance, fragmentation, a screen
LOSS_CHUNK_TOKENS = 1024  # the tokens kernels/' chunked cross-entropy computes at a time


@dataclass(frozen=True)
class Stack:
    """How a training stack stores what it trains; OUR_STACK is engine/train.py."""
    upcast_fp32: bool = True  # peft casts embeddings/head/norms (and so the residual) to fp32
    lora_bytes: int = 8  # LoRA weight + gradient per parameter (fp32: 4 + 4)
    optimizer_bytes: int = 8  # AdamW 32-bit: two fp32 moments (paged_adamw_8bit: 2)
    optimizer_resident: bool = True  # counted in VRAM (paged state can spill to CPU RAM)
    logits_bytes: float = 12.0  # per token per vocab entry at the loss peak
    layer_scale: float = 1.0  # the recomputed block's working set relative to ours
    lora_modules: str = "all-linear"  # or "attn-qv+o+mlp" (torchtune's default)
    loss_chunk_tokens: int = 0  # the loss over this many tokens at a time (0: the whole batch)
    dequant_per_shape: bool = False  # one kept dequantisation buffer per weight shape (lora4bit)
    pieces: tuple[str, ...] = ()  # the kernels/ pieces this stack assumes (stack_for)


OUR_STACK = Stack(upcast_fp32=False)  # engine/train.py casts embeddings and head back to 16 bits
HF_PEFT_STACK = Stack()  # transformers + peft as their docs show it: fp32 embeddings and head
PAPER_STACK = Stack(upcast_fp32=False, lora_bytes=4, optimizer_resident=False)
UNSLOTH_STACK = Stack(upcast_fp32=False)
TORCHTUNE_STACK = Stack(upcast_fp32=False, lora_bytes=4, optimizer_bytes=4,
                        logits_bytes=2 + 12 / 8,  # bf16 logits kept, fp32 loss over 1 of 8 chunks
                        layer_scale=0.5, lora_modules="attn-qv+o+mlp")


@dataclass
class Plan:
    model: str  # catalog id (or folder name)
    name: str
    max_seq_len: int
    micro_batch: int
    lora_r: int
    parts: dict[str, float]  # GB per part, in display order
    total_gb: float
    torch_gb: float  # what torch.cuda.max_memory_reserved should show (no context, no paged state)
    vram_gb: float | None  # the memory it was checked against (None = not checked)
    fits: bool
    why: str
    pieces: list[str] = field(default_factory=list)  # the kernels/ pieces it assumed
    paged_gb: float = 0.0  # paged optimizer state: may spill to CPU RAM, so not in total_gb
    held_as: dict[str, str] = field(default_factory=dict)  # part -> how the stack stores it

    def to_dict(self) -> dict:
        values = asdict(self)
        values["breakdown"] = values.pop("parts")
        return values


def lora_params(model: CatalogModel, r: int, modules: str = "all-linear") -> int:
    h, i = model.hidden, model.intermediate
    q, kv = model.heads * model.head_size, model.kv_heads * model.head_size
    attention = {"q": h + q, "k": h + kv, "v": h + kv, "o": q + h}
    if modules != "all-linear":
        attention.pop("k")
    mlp = (3 if model.gated_mlp else 2) * (h + i)
    return model.layers * r * (sum(attention.values()) + mlp)


# The parts of a plan, in display order; engine/planner_multi.py shares some of them across GPUs.
WEIGHTS = "4-bit weights"
LORA = "LoRA weights + gradients"
OPTIMIZER = "optimizer state"
ACTIVATIONS = "activations (checkpointed)"
LOGITS = "logits + loss"
CONTEXT = "CUDA context + 4-bit dequant buffers"


def unquantized_part(stack: Stack) -> str:
    return f"{'fp32' if stack.upcast_fp32 else '16-bit'} embeddings, head, norms"


def memory_bytes(model: CatalogModel, max_seq_len: int = 512, micro_batch: int = 1,
                 lora_r: int = 64, stack: Stack = OUR_STACK, double_quant: bool = True
                 ) -> dict[str, float]:
    """What one GPU holds to train the whole model, in bytes per part (plan() rounds them to GB)."""
    tokens = max_seq_len * micro_batch
    wide = 4 if stack.upcast_fp32 else 2  # bytes of every unquantized parameter and the residual
    bits = NF4_DOUBLE_QUANT_BITS if double_quant else NF4_BITS
    head_copy = model.vocab * model.hidden * 2 if stack.upcast_fp32 else 0
    layer = stack.layer_scale * (LAYER_HIDDEN_BYTES * model.hidden
                                 + LAYER_INTERMEDIATE_BYTES * model.intermediate)
    attention = 0.0
    if model.attention == "eager":
        attention = micro_batch * model.heads * max_seq_len**2 * EAGER_ATTENTION_BYTES
    n_lora = lora_params(model, lora_r, stack.lora_modules)
    optimizer = n_lora * stack.optimizer_bytes
    loss_tokens = min(tokens, stack.loss_chunk_tokens or tokens)
    return {
        WEIGHTS: model.quantized_params * bits / 8,
        unquantized_part(stack): (model.embedding_params + model.other_params) * wide,
        LORA: n_lora * stack.lora_bytes,
        OPTIMIZER: optimizer if stack.optimizer_resident else 0.0,
        ACTIVATIONS: tokens * (model.layers * model.hidden * wide + layer) + attention,
        LOGITS: loss_tokens * model.vocab * stack.logits_bytes + head_copy,
        CONTEXT: CUDA_CONTEXT_GB * GIB + dequant_buffer_bytes(model, stack.dequant_per_shape),
    }


def dequant_buffer_bytes(model: CatalogModel, per_shape: bool = False) -> float:
    """The largest weight dequantized to 16 bits for its matmul, and its gradient's twin; per_shape:
    the 16-bit buffers kernels/lora4bit keeps instead, one per distinct weight shape of a block (as
    separate projections: a fused qkv or gate_up holds one buffer of their summed size instead)."""
    h, i = model.hidden, model.intermediate
    q, kv = model.heads * model.head_size, model.kv_heads * model.head_size
    if not per_shape:
        return 2 * 2 * h * max(i, q)
    return 2 * sum(rows * columns for rows, columns in {(q, h), (kv, h), (h, q), (i, h), (h, i)})


def stack_for(kernels: str = "off", device: str = "cuda", optimizer: str = "auto") -> Stack:
    """The stack a run with these settings trains with: OUR_STACK for `kernels: off`; for `auto`,
    OUR_STACK with each piece presets/kernels.yaml turns on for the device class (module doc).
    optimizer: the run's; its state is paged only where bitsandbytes' paged AdamW runs."""
    if kernels == "off":
        return OUR_STACK
    if kernels != "auto":
        raise KernelChoiceError(f"kernels '{kernels}' is unknown: use auto or off.")
    return stack_with(kernel_pieces(device), device, optimizer)


def stack_with(pieces, device: str = "cuda", optimizer: str = "auto") -> Stack:
    """OUR_STACK with these kernels/ pieces on; each changes its own term (module doc). 16-bit
    LoRA only with an optimizer whose state stays 32-bit (kernel_choice.allows_lora16)."""
    pieces = tuple(p for p in pieces if p != "lora16" or allows_lora16(optimizer))
    optimizer = optimizer_for(optimizer, device, lora16="lora16" in pieces)
    stack = replace(OUR_STACK, pieces=pieces)
    if "lora4bit" in pieces and device == "cuda":
        stack = replace(stack, dequant_per_shape=True)
    if "chunked_loss" in pieces:
        stack = replace(stack, loss_chunk_tokens=LOSS_CHUNK_TOKENS)
    if "lora16" in pieces:  # qlora.py's storage, on which the paper's 33B-in-24-GB figure rests
        paged = device == "cuda" and optimizer.startswith("paged_")
        stack = replace(stack, lora_bytes=4, optimizer_resident=not paged)
    return stack


def plan(model: CatalogModel, max_seq_len: int = 512, micro_batch: int = 1, lora_r: int = 64,
         vram_gb: float | None = None, stack: Stack = OUR_STACK, double_quant: bool = True) -> Plan:
    parts = memory_bytes(model, max_seq_len, micro_batch, lora_r, stack, double_quant)
    return plan_from_parts(model, parts, max_seq_len, micro_batch, lora_r, vram_gb, stack=stack)


def storage_words(model: CatalogModel, max_seq_len: int, micro_batch: int, lora_r: int,
                  stack: Stack) -> tuple[dict[str, str], float]:
    """How the stack stores the parts that differ between stacks, in words, and the bytes of
    optimizer state it pages (0 when that state is held in VRAM)."""
    paged = 0.0 if stack.optimizer_resident else (
        lora_params(model, lora_r, stack.lora_modules) * stack.optimizer_bytes)
    state = f"{stack.optimizer_bytes * 4}-bit AdamW state"
    tokens = max_seq_len * micro_batch
    words = {
        LORA: f"{stack.lora_bytes * 4}-bit weights and gradients",
        OPTIMIZER: (f"{state}, paged: {paged / GIB:.2f} GB may spill to CPU RAM, so it is not "
                    "counted here" if paged else f"{state}, counted in GPU memory"),
        LOGITS: (f"the loss in chunks of {stack.loss_chunk_tokens} tokens"
                 if 0 < stack.loss_chunk_tokens < tokens else "the loss over all tokens at once"),
        CONTEXT: ("16-bit weights dequantised into one kept buffer per weight shape"
                  if stack.dequant_per_shape else "the largest weight dequantised for its matmul"),
    }
    return words, paged


def plan_from_parts(model: CatalogModel, parts: dict[str, float], max_seq_len: int,
                    micro_batch: int, lora_r: int, vram_gb: float | None,
                    stack: Stack | None = None) -> Plan:
    """A Plan from one GPU's parts in bytes: totals, what torch counts, whether it fits; with the
    stack they came from, also how it holds them and the pieces it assumed."""
    parts = {name: round(value / GIB, 3) for name, value in parts.items()}
    total = round(sum(parts.values()), 2)
    # paged optimizer state lives in CUDA managed memory, which torch's counters do not see
    torch_gb = round(total - CUDA_CONTEXT_GB - parts[OPTIMIZER], 2)
    fits = vram_gb is None or total <= vram_gb * SAFETY
    where = f" of {vram_gb:.0f} GB" if vram_gb is not None else ""
    why = f"{model.name}: {total:.1f} GB{where} at {max_seq_len} tokens"
    if micro_batch > 1:
        why += f" x micro-batch {micro_batch}"
    result = Plan(model=model.id, name=model.name, max_seq_len=max_seq_len,
                  micro_batch=micro_batch, lora_r=lora_r, parts=parts, total_gb=total,
                  torch_gb=torch_gb, vram_gb=vram_gb, fits=fits, why=why)
    if stack is not None:
        result.held_as, paged = storage_words(model, max_seq_len, micro_batch, lora_r, stack)
        result.paged_gb, result.pieces = round(paged / GIB, 3), list(stack.pieces)
    return result


def model_shape(name: str) -> CatalogModel | None:
    """The shape of a catalog id, a Hub id in the catalog, or a local folder; None if unknown."""
    name = (name or "").strip()
    entry = find(name)
    if entry is not None:
        return entry
    if Path(name).expanduser().is_dir():
        return shape_from_config(name)
    return None


def longest_fit(model: CatalogModel, vram_gb: float, micro_batch: int = 1, lora_r: int = 64,
                step: int = 64, stack: Stack = OUR_STACK) -> int:
    """The longest max_seq_len (a multiple of `step`, up to the model's context) that fits; 0 if none."""
    low, high = 0, model.max_context // step  # memory grows with length: bisect on multiples of step
    while low < high:
        middle = (low + high + 1) // 2
        if plan(model, middle * step, micro_batch, lora_r, vram_gb, stack).fits:
            low = middle
        else:
            high = middle - 1
    return low * step


def preflight(model_name: str, max_seq_len: int, micro_batch: int, lora_r: int,
              free_vram_gb: float | None, total_vram_gb: float | None = None,
              stack: Stack = OUR_STACK) -> str | None:
    """None when the run may start; otherwise why it would run out of memory and what to change.

    free_vram_gb None means no GPU: training runs on the CPU, and nothing here blocks it.
    A model whose shape we cannot know (a Hub id outside the catalog) is not blocked either.
    """
    if free_vram_gb is None:
        return None
    try:
        model = model_shape(model_name)
    except CatalogError:
        return None
    if model is None:
        return None
    result = plan(model, max_seq_len, micro_batch, lora_r, free_vram_gb, stack)
    if result.fits:
        return None
    text = (f"{model.name} at {max_seq_len} tokens x micro-batch {micro_batch} (LoRA r={lora_r}) needs "
            f"about {result.total_gb:.1f} GB, but the GPU has {free_vram_gb:.1f} GB free and runs need "
            f"{100 - int(SAFETY * 100)}% headroom.")
    if total_vram_gb and total_vram_gb - free_vram_gb > 1.0:
        text += (f" Other programs hold {total_vram_gb - free_vram_gb:.1f} GB of the card: closing "
                 "them frees it.")
    fixes = []
    length = longest_fit(model, free_vram_gb, micro_batch, lora_r, stack=stack)
    if length:
        fixes.append(f"set max_seq_len to {length} or less")
    if micro_batch > 1:
        single = longest_fit(model, free_vram_gb, 1, lora_r, stack=stack)
        if single >= max_seq_len:
            fixes.append(f"set micro_batch_size to 1 (and grad_accum_steps {micro_batch}x higher)")
        elif single > length:
            fixes.append(f"set micro_batch_size to 1 and max_seq_len to {single} or less")
    if lora_r > 16:
        low_rank = longest_fit(model, free_vram_gb, micro_batch, 16, stack=stack)
        if low_rank >= max_seq_len:
            fixes.append("lower the LoRA rank to 16")
        elif low_rank > length:
            fixes.append(f"lower the LoRA rank to 16 and max_seq_len to {low_rank} or less")
    fixes.append("pick a smaller model (the recommendations list the ones that fit)")
    return text + " To fit: " + "; or ".join(fixes) + "."


def config_refusal(cfg, vram_gb: float | None = None, our_run_holds_gpu: bool = False) -> str | None:
    """preflight() for a run configuration, the one check that Start and `train` share.

    vram_gb: free GB to plan for; without it the free memory of the GPU the run will use (cfg.gpu),
    and a CPU run is never refused. our_run_holds_gpu: one of our runs trains now, so a new run
    waits in the queue and gets the whole card once that run ends (its total, not today's free
    memory, counts). It plans the stack the run trains with (cfg.kernels, cfg.optimizer). A run
    on several processes is planned per GPU, as its launcher will split it (planner_multi).
    """
    if cfg.several_processes():
        from engine.planner_multi import layout_refusal

        return layout_refusal(cfg, vram_gb, our_run_holds_gpu)
    total = None
    if vram_gb is None:
        if cfg.device == "cpu":
            return None
        gpu = detected_gpu(cfg.gpu)
        if gpu is not None:
            vram_gb, total = min(gpu.free_gb + chat_held_gb(gpu), gpu.total_gb), gpu.total_gb
            if our_run_holds_gpu:
                vram_gb = total
    return preflight(cfg.model, cfg.max_seq_len, cfg.micro_batch_size, cfg.lora_r, vram_gb, total,
                     stack_for(cfg.kernels, "cuda", cfg.optimizer))


@dataclass
class Pick:
    model: CatalogModel
    max_seq_len: int
    micro_batch: int
    total_gb: float
    why: str

    def to_dict(self) -> dict:
        return {"model": self.model.id, "name": self.model.name, "hub_id": self.model.hub_id,
                "max_seq_len": self.max_seq_len, "micro_batch": self.micro_batch,
                "total_gb": self.total_gb, "why": self.why}


def recommend(free_vram_gb: float | None, lora_r: int = 16, min_seq_len: int = 1024) -> list[Pick]:
    """Catalog models that fit at `min_seq_len` tokens or more, largest first.

    Each comes with the longest power-of-two sequence length (up to its context and 8192) that fits
    at micro-batch 1, then the largest micro-batch up to 8 at that length. No GPU: the models marked
    cpu_ok. r=16 is the default recipe's rank.
    """
    models = load_catalog()
    if free_vram_gb is None:
        # The quick-test recipe's shape; the figure is memory the run takes (RAM on a CPU).
        return [Pick(m, 256, 4, plan(m, 256, 4, 16).total_gb,
                     f"{m.name}: CPU mode, small enough to train on a CPU in minutes")
                for m in models if m.cpu_ok]
    picks = []
    for model in models:
        lengths = [n for n in (8192, 4096, 2048, 1024, 512) if min_seq_len <= n <= model.max_context]
        length = next((n for n in lengths if plan(model, n, 1, lora_r, free_vram_gb).fits), 0)
        if not length:
            continue
        batch = next(b for b in (8, 4, 2, 1) if plan(model, length, b, lora_r, free_vram_gb).fits)
        best = plan(model, length, batch, lora_r, free_vram_gb)
        picks.append(Pick(model, length, batch, best.total_gb, best.why))
    picks.sort(key=lambda p: (p.model.total_params, p.max_seq_len), reverse=True)
    return picks


def detected_gpu(requested: int = -1):
    """The GPU a run with `gpu = requested` trains on (engine.hardware.run_gpu), or None."""
    from engine.hardware import run_gpu

    return run_gpu(requested)


def detected_vram(requested: int = -1) -> tuple[float | None, float | None]:
    """(free, total) GB of the GPU a run with `gpu = requested` uses; (None, None) without one."""
    gpu = detected_gpu(requested)
    return (gpu.free_gb, gpu.total_gb) if gpu else (None, None)


def chat_held_gb(gpu) -> float:
    """GB this process's own chat model holds on `gpu`: starting a run there unloads it first,
    so for the run that memory is free."""
    from engine import chat

    return chat.shared_gpu_gb() if chat.shared_gpu_index() == gpu.index else 0.0
