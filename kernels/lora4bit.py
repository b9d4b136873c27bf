"""A frozen 4-bit linear layer and its LoRA pair in one autograd function, for training.

    y = x @ dequant(W4)^T + bias + dropout(x) @ A^T @ B^T * scaling

peft's Linear4bit runs this as separate modules: bitsandbytes' matmul (whose backward dequantises
W again), then dropout, A and B as nn.Linear, each saving its own input, in the LoRA weights'
dtype (fp32 by default, so x is copied to fp32 once more). Here one function saves only what the
backward needs: the input as it came, the dropout mask (1 byte an element) and x @ A^T (r
columns); never the dequantised weight, which the backward dequantises again. Dequantisation
writes into one buffer per (shape, dtype, device) shared by every layer, where bitsandbytes has an
in-place kernel for the device (CUDA, XPU, MPS; not the CPU, where each call gets a fresh tensor).

`patch_lora_layers(model)` swaps peft's forward for this one on each LoRA layer it can run,
instance by instance, and leaves peft's modules and parameters as they are, so the adapter saves,
loads, merges and switches off exactly as before. Generation's one-token steps keep peft's
forward, which reaches bitsandbytes' inference kernels.
"""

from __future__ import annotations

import math
import types

import bitsandbytes as bnb
import torch
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

# The shared dequantisation buffers. Only one is live at a time: a layer dequantises, multiplies
# and is done before the next layer starts, and training runs one layer at a time. Not for
# threads running layers of one shape side by side.
_buffers: dict[tuple, torch.Tensor] = {}
_has_out_kernel: dict[str, bool] = {}


def _absmax(quant_state) -> torch.Tensor:
    """The fp32 per-block scales; with double quantization they are themselves 8-bit, as in
    bitsandbytes.functional.dequantize_4bit."""
    if not quant_state.nested:
        return quant_state.absmax
    absmax = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    return (absmax + quant_state.offset).float()


def dequantize(base: bnb.nn.Linear4bit, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight, [out, in], in `dtype`. The ops are called directly rather than
    through dequantize_4bit(), which dequantises into quant_state.dtype (the dtype the model was
    loaded in), not necessarily the compute dtype; bitsandbytes' own matmul does the same."""
    weight = base.weight
    state = weight.quant_state
    args = (weight, _absmax(state), state.blocksize, state.quant_type, list(state.shape), dtype)
    device = weight.device
    if _has_out_kernel.get(device.type, True):
        key = (tuple(state.shape), dtype, device)
        buffer = _buffers.get(key)
        if buffer is None:
            buffer = _buffers[key] = torch.empty(tuple(state.shape), dtype=dtype, device=device)
        try:
            torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=buffer)
            _has_out_kernel[device.type] = True
            return buffer
        except NotImplementedError:  # no in-place kernel for this device: a buffer gains nothing
            _has_out_kernel[device.type] = False
            del _buffers[key]
    return torch.ops.bitsandbytes.dequantize_4bit.default(*args)


def release_buffers() -> None:
    """Frees the shared dequantisation buffers (they come back on the next fused call)."""
    _buffers.clear()


def dropout_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """(keep, scale): a bool mask that keeps each element with probability 1 - p (p rounded to a
    multiple of 2^-16), and the factor 1 / (1 - p) for the kept ones.

    Why not nn.Dropout's bernoulli_: on a CPU it draws one random number an element, serially, and
    was 23% of a training step of the embedded model (bench/train_step.md). Here one 64-bit draw
    gives four 16-bit lanes, compared against a threshold: about 5x faster on a CPU. The masks
    are as random as peft's but not the same ones for the same seed. It draws from the device's
    default generator, whose state gradient checkpointing saves and restores, so the recompute of
    a checkpointed layer draws this mask again."""
    numel = math.prod(shape)
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    # The full 64-bit range: random_() without bounds leaves the top bit 0 (one lane biased).
    lanes = draws.random_(-2**63, None).view(torch.int16)[:numel].view(shape)
    dropped = round(p * 65536)
    return lanes >= dropped - 32768, 65536 / (65536 - dropped)


class FusedLoRA4bit(torch.autograd.Function):
    """x: [..., in]; lora_a: [r, in]; lora_b: [out, r], in any float dtype: cast to the compute
    dtype here. Returns y in x's dtype, like peft's layer."""

    @staticmethod
    def forward(ctx, x, base, bias, lora_a, lora_b, scaling, dropout_p, compute_dtype):
        # Every dtype is chosen here; autocast (Trainer's bf16/fp16) would recast the matmuls.
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
            a, b = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
            bias_c = None if bias is None else bias.to(compute_dtype)
            # The sum in x's dtype (fp32 where the norms hand over fp32), as peft adds its LoRA
            # output: early in training the LoRA term is ~1e-4 of the base output, below bf16's
            # resolution, and a bf16 sum would round it away (measured: the loss fell slower).
            y = torch.nn.functional.linear(x2, dequantize(base, compute_dtype), bias_c).to(x.dtype)
            mask, keep_scale = None, 1.0
            if dropout_p > 0:
                mask, keep_scale = dropout_mask(x2.shape, dropout_p, x2.device)
                # The same factors, rounded to the compute dtype, as the backward's `kept`.
                xa = (x2 * mask.to(compute_dtype).mul_(keep_scale)) @ a.t()
            else:
                xa = x2 @ a.t()
            y.add_(xa @ b.t(), alpha=scaling)
        # x as it came, not x2: q, k and v (gate and up) share one input, often fp32 from the
        # norms; one saved x serves them all where copies in the compute dtype would add up.
        ctx.save_for_backward(x, mask, xa, lora_a, lora_b)
        ctx.base, ctx.scaling, ctx.compute_dtype = base, scaling, compute_dtype
        ctx.keep_scale = keep_scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, xa, lora_a, lora_b = ctx.saved_tensors
        dtype, s = ctx.compute_dtype, ctx.scaling
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_bias = grad_a = grad_b = None
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            gb = g @ b  # [tokens, r]: every LoRA gradient goes through this thin matrix
            # The dropout's factor per element, 0 or the keep scale, as the forward applied it:
            # the dropped-out input is x2 * kept, and its derivative.
            kept = None if mask is None else mask.to(dtype).mul_(ctx.keep_scale)
            if need_b:
                grad_b = torch.mm(g.t(), xa).mul_(s)
            if need_a:
                x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                grad_a = torch.mm(gb.t(), x2 if kept is None else x2 * kept).mul_(s)
                del x2
            if need_x:
                grad_x = g @ dequantize(ctx.base, dtype)
                if kept is None:
                    grad_x.addmm_(gb, a, alpha=s)
                else:
                    grad_x.addcmul_(gb @ a, kept, value=s)
                grad_x = grad_x.view(x.shape).to(x.dtype)
            if need_bias:
                grad_bias = g.sum(0, dtype=ctx.bias_dtype)  # as bitsandbytes sums it
        # The LoRA gradients go back through autograd, whose AccumulateGrad adds them in place
        # into an existing .grad (and adopts them, uncopied, where there is none). Writing .grad
        # here instead would skip that node's hooks, which DDP's gradient reduction and
        # torch.autograd.grad rely on, to save one [r, in] temporary.
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def _adapter_to_fuse(layer: LoraLinear4bit) -> str | None:
    """The one active adapter whose plain LoRA this layer can run fused right now, or None where
    peft's forward must run: adapters switched off or merged, several active, DoRA and the other
    variants, a LoRA bias, a dropout peft may have replaced, or weights bitsandbytes has
    repacked for its CPU inference kernel."""
    if layer.disable_adapters or layer.merged:
        return None
    names = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(names) != 1:
        return None
    name = names[0]
    base = layer.get_base_layer()
    if (name in layer.lora_variant or layer.lora_B[name].bias is not None
            or not isinstance(layer.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity))
            or not isinstance(base, bnb.nn.Linear4bit)):
        return None
    # The state sits on the module too, where FSDP lost it from the weight (bitsandbytes' fix).
    state = getattr(base.weight, "quant_state", None)
    state = getattr(base, "quant_state", None) if state is None else state
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    return name


def _fused_forward(self: LoraLinear4bit, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args or kwargs else _adapter_to_fuse(self)
    # One token without gradient is generation's decoding step: bitsandbytes has an inference
    # kernel for that (gemv, no whole dequantised weight). Evaluation batches come here, also on
    # the CPU, where bitsandbytes' forward would repack the weights for inference for good.
    decoding = not torch.is_grad_enabled() and x.numel() == x.shape[-1]
    if name is None or decoding:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    fix_4bit_weight_quant_state_from_module(base)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return FusedLoRA4bit.apply(x, base, base.bias, self.lora_A[name].weight,
                               self.lora_B[name].weight, self.scaling[name], p,
                               base.compute_dtype or x.dtype)


def _is_patched(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_forward


def patch_lora_layers(model: torch.nn.Module) -> int:
    """Runs every peft 4-bit LoRA layer of `model` that has one plain, active, unmerged adapter
    through FusedLoRA4bit; returns how many. The patch is the instance's own `forward`: the module
    tree, parameters and state dict are untouched. A patched layer still hands a call to peft's
    forward whenever the fused path cannot run it (see _adapter_to_fuse), checked on every call,
    so peft's disable_adapter() context and merging keep working."""
    patched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and not _is_patched(module) \
                and _adapter_to_fuse(module) is not None:
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    return patched


def unpatch_lora_layers(model: torch.nn.Module) -> int:
    """Gives every patched layer of `model` peft's forward back and frees the shared buffers;
    returns how many layers it restored."""
    restored = 0
    for module in model.modules():
        if _is_patched(module):
            del module.forward
            restored += 1
    release_buffers()
    return restored
