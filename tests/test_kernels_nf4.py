"""kernels.nf4, the plain-PyTorch NF4 reference, against bitsandbytes bit for bit (packed bytes,
absmax codes, second-level scales, dequantised weights), and the Triton kernel against the
reference under Triton's CPU interpreter."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes.functional as bnb
import pytest
import torch
from safetensors import safe_open

from kernels.nf4 import (NF4_CODE, NF4Error, bits_per_parameter, dequantize_nf4, dynamic_map,
                         from_bitsandbytes, quantize_nf4)

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 210 values: neither the count nor a row is a multiple of 64; 65 values: an odd count, so the
# last byte holds one value and a pad. (Rows that are a multiple of 16 but not of 64, like 3x80,
# are left out: bitsandbytes 0.50's AVX-512 CPU dequantiser reads the wrong scales for them.)
SHAPES = [(256, 576), (3, 70), (5, 13)]


def assert_same_as_bitsandbytes(weight, double_quant=True):
    q = quantize_nf4(weight, double_quant=double_quant)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                      quant_type="nf4")
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.absmax2, state.state2.absmax)
        assert torch.equal(q.code2, state.state2.code)
        assert torch.equal(q.offset, state.offset) and q.blocksize2 == state.state2.blocksize
    dequantized = dequantize_nf4(q)
    assert dequantized.dtype == weight.dtype and dequantized.shape == weight.shape
    assert torch.equal(dequantized, bnb.dequantize_4bit(packed, state).reshape(weight.shape))
    return q


def test_code_tables_are_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())
    assert (NF4_CODE.diff() > 0).all() and (NF4_CODE == 0).sum() == 1
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_weights_match_bitsandbytes(dtype, shape, double_quant):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    q = assert_same_as_bitsandbytes(weight, double_quant)
    error = (dequantize_nf4(q).float() - weight.float()).abs().max()
    assert error < 0.2 * weight.float().abs().max()  # and it is still the weight


def test_zero_blocks_and_equal_scales_match_bitsandbytes():
    signs = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).sign()
    # Every block's absmax is 0.25: the centred absmaxes are all 0 (absmax2 = 0, code 0).
    q = assert_same_as_bitsandbytes(signs * 0.25)
    assert q.absmax2.eq(0).all() and q.absmax.eq(0).all()
    assert torch.equal(dequantize_nf4(q), signs * 0.25)  # +-1 times the absmax are NF4 values
    with_zero_block = torch.cat([signs * 0.5, torch.zeros(1, 64), signs * 0.1]).bfloat16()
    assert_same_as_bitsandbytes(with_zero_block)


def test_a_real_weight_of_the_embedded_model(embedded_model):
    with safe_open(str(embedded_model / "model.safetensors"), "pt") as weights:
        q_proj = weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
    q = assert_same_as_bitsandbytes(q_proj)
    assert q_proj.shape == (576, 576)
    # 4-bit codes + an 8-bit absmax per 64 values + an fp32 absmax2 per 256 blocks (+ the offset)
    assert round(bits_per_parameter(q), 3) == 4.127
    # without double quantisation the absmax is fp32: 4 + 32/64
    assert bits_per_parameter(quantize_nf4(q_proj, double_quant=False)) == 4.5


def test_dequantize_into_a_reused_buffer():
    first, second = (quantize_nf4(torch.randn(64, 128, generator=torch.Generator().manual_seed(s)))
                     for s in (2, 3))
    buffer = torch.empty(64, 128)
    assert dequantize_nf4(first, out=buffer) is buffer
    assert torch.equal(buffer, dequantize_nf4(first))
    dequantize_nf4(second, out=buffer)
    assert torch.equal(buffer, dequantize_nf4(second))
    with pytest.raises(NF4Error, match="dequantises to"):
        dequantize_nf4(first, out=torch.empty(64, 128, dtype=torch.bfloat16))
    with pytest.raises(NF4Error, match="contiguous"):
        dequantize_nf4(first, out=torch.empty(128, 64).t())


def test_what_cannot_be_quantized_is_refused_in_words():
    with pytest.raises(NF4Error, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(NF4Error, match="block size"):
        quantize_nf4(torch.ones(64), blocksize=48)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama saved in bf16: a real checkpoint for transformers' 4-bit loading."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def load_4bit(path, quant_type="nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quantization,
                                                dtype=torch.bfloat16, device_map={"": "cpu"})


def test_from_bitsandbytes_reads_a_linear4bit_loaded_by_transformers(tiny_llama):
    model = load_4bit(tiny_llama)
    linear = model.model.layers[0].self_attn.q_proj
    q = from_bitsandbytes(linear)
    assert q.packed.data_ptr() == linear.weight.data.data_ptr()  # shared, not copied
    assert q.double_quant and q.shape == (128, 128) and q.dtype == torch.bfloat16
    state = linear.weight.quant_state
    assert torch.equal(dequantize_nf4(q), bnb.dequantize_4bit(linear.weight.data, state))
    # what transformers stored is what our quantiser makes of the checkpoint's weight
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as weights:
        original = weights.get_tensor("model.layers.0.self_attn.q_proj.weight")
    ours = quantize_nf4(original)
    assert torch.equal(ours.packed, q.packed) and torch.equal(ours.absmax, q.absmax)
    assert torch.equal(ours.absmax2, q.absmax2) and torch.equal(ours.offset, q.offset)
    assert torch.equal(from_bitsandbytes(linear.weight).packed, q.packed)  # the Params4bit too


def test_from_bitsandbytes_refuses_what_is_not_nf4(tiny_llama):
    with pytest.raises(NF4Error, match="not quantised to 4 bits"):
        from_bitsandbytes(torch.nn.Linear(4, 4))
    fp4 = load_4bit(tiny_llama, quant_type="fp4").model.layers[0].self_attn.q_proj
    with pytest.raises(NF4Error, match="stored as FP4"):
        from_bitsandbytes(fp4)


def test_from_bitsandbytes_refuses_a_weight_repacked_for_cpu_inference(tiny_llama):
    model = load_4bit(tiny_llama).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    linear = model.model.layers[0].self_attn.q_proj
    if not getattr(linear.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    with pytest.raises(NF4Error, match="repacked"):
        from_bitsandbytes(linear)


TRITON_CHECK = """
import os
import sys

import torch
from kernels.nf4 import NF4Error, dequantize_nf4, quantize_nf4

sys.modules["triton"] = None  # first, as if Triton were not installed
try:
    import kernels.triton_nf4
except ImportError as error:
    print("without triton:", error)
del sys.modules["triton"]  # a failed import leaves no kernels.triton_nf4 behind
from kernels.triton_nf4 import dequantize_nf4_triton

cases = [((64, 96), torch.bfloat16, True, 64), ((3, 70), torch.float16, True, 64),
         ((5, 13), torch.float32, False, 64), ((300, 64), torch.bfloat16, True, 64),
         ((2, 256), torch.float32, True, 128)]
generator = torch.Generator().manual_seed(0)
for shape, dtype, double_quant, blocksize in cases:
    weight = (torch.randn(shape, generator=generator) * 0.05).to(dtype)
    q = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    expected = dequantize_nf4(q)
    assert torch.equal(dequantize_nf4_triton(q), expected), (shape, dtype, double_quant)
    buffer = torch.full_like(expected, float("nan"))
    assert dequantize_nf4_triton(q, out=buffer) is buffer and torch.equal(buffer, expected)
    print("equal", shape, dtype, double_quant, blocksize)

os.environ["TRITON_INTERPRET"] = "0"  # a CPU without the interpreter: refused in words
try:
    dequantize_nf4_triton(q)
except NF4Error as error:
    print("on a CPU:", error)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_equals_the_reference_under_the_interpreter():
    # Exact equality: the kernel rounds as the reference does (no fused multiply-add in the
    # scales, round-to-nearest-even into bfloat16). A subprocess, because the interpreter must be
    # chosen before triton is first imported.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(TRITON_CHECK)], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("equal") == 5
    assert "without triton: kernels.triton_nf4 needs Triton" in result.stdout
    assert "on a CPU: The Triton NF4 kernel runs on a GPU" in result.stdout


@pytest.mark.gpu
def test_on_a_gpu_the_reference_the_kernel_and_bitsandbytes_agree():
    from bitsandbytes.nn import Params4bit

    from kernels.triton_nf4 import dequantize_nf4_triton

    generator = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        weight = (torch.randn(1024, 576, generator=generator) * 0.02).to(dtype)
        param = Params4bit(weight, quant_type="nf4", compress_statistics=True).cuda()
        theirs = from_bitsandbytes(param)
        expected = bnb.dequantize_4bit(param.data, param.quant_state)
        assert torch.equal(dequantize_nf4(theirs), expected)
        assert torch.equal(dequantize_nf4_triton(theirs), expected)
        ours = quantize_nf4(weight.cuda())
        # bitsandbytes' CUDA build scales by a fast-math reciprocal (within 1 ulp), so a value
        # within an ulp of a midpoint between two codes may round the other way: nearly all agree.
        assert (ours.packed != theirs.packed).float().mean() < 1e-4
        assert (ours.absmax != theirs.absmax).float().mean() < 1e-3
        assert torch.equal(dequantize_nf4_triton(ours), dequantize_nf4(ours))
        assert torch.equal(dequantize_nf4(ours).cpu(), dequantize_nf4(ours.to("cpu")))
