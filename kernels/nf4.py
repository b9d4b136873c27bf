"""NF4 with double quantisation in plain PyTorch, bit for bit as bitsandbytes stores it.

This is the reference the GPU kernels are held to, so it is written to be read, not to be fast.
A weight is cut into blocks of 64 values (in row-major order, across rows). Each block keeps its
absolute maximum (absmax) and, per value, the 4-bit index of the nearest of 16 NF4 code values
after dividing by that absmax. Double quantisation then stores the absmaxes themselves in 8 bits:
their mean is subtracted (the offset) and each block of 256 centred absmaxes is scaled by its own
absmax (absmax2, fp32) and rounded to bitsandbytes' signed 8-bit dynamic map (code2).
Dequantising runs it backwards: absmax = code2[code] * absmax2 + offset, weight = NF4[nibble] *
absmax, each product rounded to fp32 as bitsandbytes rounds it, then cast to the weight's dtype.

It is written here rather than imported from bitsandbytes so that the tests compare two
independent implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, Dettmers et
# al. 2023), as bitsandbytes lists them (create_normal_map(offset=0.9677083); hard-coded there too).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NF4Error(ValueError):
    """A weight or buffer that cannot be quantised to, read as, or dequantised from NF4."""


@dataclass(eq=False)  # fields are tensors: compare them with torch.equal
class NF4Weight:
    """One quantised weight: what bitsandbytes keeps in a Params4bit and its quant_state."""

    packed: torch.Tensor  # uint8, ceil(numel / 2): value 2i in the high nibble, 2i+1 in the low
    shape: torch.Size
    dtype: torch.dtype  # of the original weight, and of the dequantised one
    blocksize: int
    absmax: torch.Tensor  # per block: uint8 codes into code2 (double quant) or float32 scales
    absmax2: torch.Tensor | None = None  # float32, one per blocksize2 absmax codes
    code2: torch.Tensor | None = None  # float32, the 256 values the absmax codes index
    offset: torch.Tensor | None = None  # float32 scalar, the mean absmax added back
    blocksize2: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device) -> NF4Weight:
        moved = {name: getattr(self, name).to(device)
                 for name in ("packed", "absmax", "absmax2", "code2", "offset")
                 if getattr(self, name) is not None}
        return replace(self, **moved)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()): for each exponent 10^-6 ..
    10^0, 2^e evenly spaced fractions in (0.1, 1], both signs, plus 0 and 1; 256 sorted values.
    Dense near zero, where the centred absmaxes cluster."""
    values = [torch.tensor([0.0, 1.0])]
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += [10 ** (exponent - 6) * means, -(10 ** (exponent - 6)) * means]
    return torch.cat(values).sort().values


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise a float32/float16/bfloat16 weight to NF4, as bitsandbytes' quantize_4bit does
    (compress_statistics=double_quant)."""
    if weight.dtype not in DTYPES:
        raise NF4Error(f"NF4 quantises float32, float16 or bfloat16 weights, not {weight.dtype}: "
                       "convert the weight to one of those first.")
    if blocksize not in BLOCKSIZES:
        raise NF4Error(f"The NF4 block size must be one of {BLOCKSIZES}, not {blocksize}.")
    if weight.numel() == 0:
        raise NF4Error("The weight is empty: there is nothing to quantise.")
    blocks = _blocks(weight.reshape(-1).float(), blocksize)  # zero-padded: adds no absmax, code 7
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal, as bitsandbytes does (its CPU code divides in a last, partial
    # block, which can differ only for a value within one ulp of a midpoint between two codes).
    # The clamp only keeps an all-zero block from dividing by zero.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    code = NF4_CODE.to(weight.device)
    nibbles = torch.bucketize(scaled.reshape(-1), (code[:-1] + code[1:]) / 2).to(torch.uint8)
    nibbles = nibbles[: weight.numel() + weight.numel() % 2]  # an odd weight keeps one pad (0.0)
    packed = (nibbles[0::2] << 4) | nibbles[1::2]
    q = NF4Weight(packed, weight.shape, weight.dtype, blocksize, absmax)
    return _double_quantize(q) if double_quant else q


def _double_quantize(q: NF4Weight, blocksize2: int = 256) -> NF4Weight:
    offset = q.absmax.mean()
    centred = _blocks(q.absmax - offset, blocksize2)
    absmax2 = centred.abs().amax(dim=1)
    code2 = dynamic_map().to(centred.device)
    empty = absmax2 == 0  # every absmax equal to the mean: bitsandbytes writes code 0
    scaled = centred * torch.where(empty, 0.0, 1.0 / absmax2)[:, None]
    codes = _round_to_code2(scaled, code2).masked_fill_(empty[:, None], 0)
    codes = codes.reshape(-1)[: q.absmax.numel()]
    return replace(q, absmax=codes, absmax2=absmax2, code2=code2, offset=offset,
                   blocksize2=blocksize2)


def _round_to_code2(scaled: torch.Tensor, code2: torch.Tensor) -> torch.Tensor:
    """The index of the 8-bit code for each scaled absmax, chosen exactly as bitsandbytes chooses it
    on the tensor's device: its CUDA kernel and its pure-PyTorch fallback take the nearest code,
    while its CPU library reads a 65,536-slot table over [-1, 1] (each slot holds the code
    nearest to the slot's left edge), which picks the other neighbour for about 0.2% of values.
    The tests hold each rule to bitsandbytes on its device (the GPU one where there is a GPU)."""
    midpoints = (code2[:-1] + code2[1:]) / 2
    scaled = scaled.clamp(-1, 1)
    if scaled.device.type != "cpu":
        return torch.bucketize(scaled, midpoints).to(torch.uint8)
    slots = 65535
    slot_edges = (2.0 * torch.arange(slots + 1, dtype=torch.float32, device=scaled.device)) / slots
    table = torch.searchsorted(midpoints, slot_edges - 1.0)
    # The library computes round(x * 65535 + 0.5) with one fused multiply-add (one rounding to
    # fp32, then truncation); float64 holds x * 65535 + 0.5 exactly, so this rounds the same way.
    slot = (((scaled + 1.0) * 0.5).double() * slots + 0.5).float().trunc().long()
    return table[slot].to(torch.uint8)


def dequantize_nf4(q: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight in q.dtype and q.shape; written into `out` (same shape, dtype, device, contiguous)
    when given, so that a caller can reuse one buffer for every layer of the same shape."""
    out = dequantize_buffer(q, out)
    nibbles = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1).long()
    values = _blocks(NF4_CODE.to(q.packed.device)[nibbles], q.blocksize)
    values = (values * block_scales(q)[:, None]).reshape(-1)[: q.numel]
    return out.copy_(values.view(q.shape))  # fp32 -> dtype rounds to nearest even, as bnb does


def block_scales(q: NF4Weight) -> torch.Tensor:
    """Each block's absmax in float32; with double quantisation code2[code] * absmax2 + offset,
    a product rounded to fp32, then a sum rounded to fp32 (no fused multiply-add), as bnb."""
    if not q.double_quant:
        return q.absmax.float()
    absmax2 = q.absmax2.repeat_interleave(q.blocksize2)[: q.absmax.numel()]
    return q.code2[q.absmax.long()] * absmax2 + q.offset


def dequantize_buffer(q: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """`out` checked to fit q's dequantised weight, or a new empty one where none is given."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.packed.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.packed.device:
        raise NF4Error(f"The output buffer is {tuple(out.shape)} {out.dtype} on {out.device}, but "
                       f"this weight dequantises to {tuple(q.shape)} {q.dtype} on "
                       f"{q.packed.device}: pass a buffer of that shape, dtype and device.")
    if not out.is_contiguous():
        raise NF4Error("The output buffer must be contiguous: pass a fresh tensor, not a view.")
    return out


def from_bitsandbytes(weight) -> NF4Weight:
    """The NF4Weight held by a bitsandbytes Params4bit (or the Linear4bit owning one), sharing its
    tensors (no copy)."""
    weight = getattr(weight, "weight", weight)  # a Linear4bit module -> its Params4bit
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise NF4Error("This weight is not quantised to 4 bits (it has no bitsandbytes "
                       "quant_state): load the model with a 4-bit BitsAndBytesConfig.")
    if state.quant_type != "nf4":
        raise NF4Error(f"This weight is stored as {state.quant_type.upper()}, not NF4: load the "
                       "model with bnb_4bit_quant_type='nf4'.")
    if getattr(state, "packing_format_for_cpu", False):
        raise NF4Error("bitsandbytes has repacked this weight for its CPU inference kernel (an "
                       "inference pass on a CPU with AVX512-BF16 does that), and its block "
                       "scales are now bfloat16, so it is no longer exact NF4: read the weight "
                       "before running inference, or load the model again.")
    q = NF4Weight(weight.data.view(torch.uint8).reshape(-1), state.shape, state.dtype,
                  state.blocksize, state.absmax)
    if not state.nested:
        return q
    return replace(q, absmax2=state.state2.absmax, code2=state.state2.code, offset=state.offset,
                   blocksize2=state.state2.blocksize)


def bits_per_parameter(q: NF4Weight) -> float:
    """Stored bits per weight value: the 4-bit codes, the per-block absmax (8-bit codes, or fp32
    without double quantisation), and with double quantisation the fp32 absmax2 per 256 blocks
    and the fp32 offset. The code tables (16 and 256 values) are constants of the format, shared
    by every weight, and not counted. At block sizes 64/256: 4 + 8/64 + 32/(64*256) = 4.127."""
    bits = 8 * (q.packed.numel() + q.absmax.numel() * q.absmax.element_size())
    if q.double_quant:
        bits += 32 * (q.absmax2.numel() + 1)
    return bits / q.numel


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A 1-D tensor as rows of `blocksize`, the last one padded with zeros."""
    padding = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, padding)).view(-1, blocksize)
