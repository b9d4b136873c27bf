"""NF4 dequantisation on the GPU with Triton, the double-dequantisation of the block scales fused
in: one pass reads the packed codes and the 8-bit absmax codes and writes the weight, where
bitsandbytes runs one kernel for the scales and another for the weights. Bit for bit equal to
kernels.nf4.dequantize_nf4, the reference it is tested against.

Needs Triton (it comes with PyTorch's CUDA builds on Linux); importing this module without it
raises an ImportError that says so. Tests run it on the CPU under Triton's interpreter
(TRITON_INTERPRET=1 set before triton is first imported).
"""

from __future__ import annotations

import functools

import torch

from kernels.nf4 import NF4_CODE, NF4Error, NF4Weight, dequantize_buffer

try:
    import triton
    import triton.language as tl
except ImportError as missing:
    raise ImportError("kernels.triton_nf4 needs Triton, which is not installed here. It comes with "
                      "PyTorch's CUDA builds on Linux (pip install triton); without a GPU, use "
                      "kernels.nf4.dequantize_nf4.") from missing

VALUES_PER_PROGRAM = 2048  # a group of whole blocks per program: 32 blocks of 64


@triton.jit
def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                           out_ptr, numel, n_blocks,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, GROUP: tl.constexpr,
                           DOUBLE_QUANT: tl.constexpr, OUT_BF16: tl.constexpr):
    blocks = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    real = blocks < n_blocks
    if DOUBLE_QUANT:
        scale_code = tl.load(absmax_ptr + blocks, mask=real, other=0).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=real, other=0.0)
        scales = tl.load(code2_ptr + scale_code) * absmax2 + tl.load(offset_ptr)
    else:
        scales = tl.load(absmax_ptr + blocks, mask=real, other=0.0)

    byte = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte < (numel + 1) // 2, other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4))  # the earlier value of each pair
    low = tl.load(code_ptr + (packed & 0x0F))
    values = tl.interleave(high, low) * scales[:, None]

    index = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    if OUT_BF16:
        # Round to nearest even on the bits, as torch and bitsandbytes do: Triton's interpreter
        # truncates in a bfloat16 cast, and this costs a GPU a few integer operations.
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + index, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True),
                 mask=index < numel)
    else:
        tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < numel)


def dequantize_nf4_triton(q: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight in q.dtype and q.shape, written into `out` when given (a reused buffer)."""
    out = dequantize_buffer(q, out)
    if q.packed.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise NF4Error("The Triton NF4 kernel runs on a GPU: move the weight there first "
                         "(NF4Weight.to('cuda')), or use kernels.nf4.dequantize_nf4 on a CPU.")
    group = max(1, VALUES_PER_PROGRAM // q.blocksize)
    n_blocks = q.absmax.numel()
    scale_args = (q.absmax2, q.code2, q.offset) if q.double_quant else (q.absmax,) * 3
    _dequantize_nf4_kernel[(triton.cdiv(n_blocks, group),)](
        q.packed, q.absmax, *scale_args, _code_on(q.packed.device), out, q.numel, n_blocks,
        BLOCKSIZE=q.blocksize, BLOCKSIZE2=q.blocksize2, GROUP=group,
        DOUBLE_QUANT=q.double_quant, OUT_BF16=q.dtype == torch.bfloat16,
        # Keep code2 * absmax2 + offset two roundings (no fused multiply-add), as bitsandbytes
        # and the reference compute it, so the scales match them bit for bit.
        enable_fp_fusion=False,
    )
    return out


@functools.cache
def _code_on(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)
