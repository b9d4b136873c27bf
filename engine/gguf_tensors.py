"""What a GGUF file says about the model's shape (llama.cpp's hyperparameter keys), and each
tensor under llama.cpp's name, in llama.cpp's layout and type. See engine/gguf_export.py for the
conventions and why they exist."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from engine.gguf_vocab import GgufError

ARCH = gguf.MODEL_ARCH
SKIPPED = (".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")  # buffers
Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]  # Q8_0 packs each row in blocks of 32 weights


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: planned first (the header lists every tensor before any data),
    loaded and converted only when its turn to be written comes."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    load: Callable[[], np.ndarray]  # float32 values in llama.cpp's layout

    @property
    def stored_dtype(self):
        return {Q.F32: np.float32, Q.F16: np.float16}.get(self.qtype, np.uint8)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.stored_dtype is np.uint8:  # packed types are written as bytes
            return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))
        return self.shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored_shape)) * np.dtype(self.stored_dtype).itemsize

    def data(self) -> np.ndarray:
        values = self.load().astype(np.float32)
        if self.stored_dtype is np.uint8:
            return gguf.quants.quantize(values, self.qtype)
        return values.astype(self.stored_dtype)


def add_hparams(writer: gguf.GGUFWriter, family, config) -> None:
    """The shape keys llama.cpp reads for this architecture, from the transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if "rope_theta" in rope:
        writer.add_rope_freq_base(rope["rope_theta"])
    if family.arch == ARCH.GPTNEOX:
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_parallel_residual(config.use_parallel_residual)
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family.arch == ARCH.GEMMA2:
        if config.attn_logit_softcapping is not None:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if family.arch == ARCH.PHI3:
        writer.add_sliding_window(config.sliding_window or 0)  # 0: none (llama.cpp's reading)
    rope_type = rope.get("rope_type", "default")
    original = rope.get("original_max_position_embeddings",
                        getattr(config, "original_max_position_embeddings", None))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "longrope" and family.arch == ARCH.PHI3:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(ROPE_INIT_FUNCTIONS["longrope"](config)[1])
    elif not (rope_type == "default" or rope_type == "llama3" and family.arch == ARCH.LLAMA):
        raise GgufError(f"this model's RoPE scaling '{rope_type}' is not one GGUF export writes "
                        "(it writes default, linear, Llama 3's and Phi-3's long RoPE); export "
                        "the merged model instead")
    if original and family.arch == ARCH.PHI3 and rope_type != "longrope":
        writer.add_rope_scaling_orig_ctx_len(original)


def plan_tensors(model_dir: Path, family, config, weight_type: Q) -> list[PlannedTensor]:
    """Every tensor of the file, in order: names, shapes and types now, data on demand."""
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    # Gemma's output layer always is its embedding; llama.cpp reuses token_embd where no output is
    tied = config.tie_word_embeddings or family.arch == ARCH.GEMMA2
    planned = _rope_tensors(family, config)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise GgufError(f"{model_dir} holds no safetensors weights to convert")
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for source in weights.keys():
                if source.endswith(SKIPPED) or (tied and source == "lm_head.weight"):
                    continue
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GgufError(f"the model has a tensor {source} that llama.cpp's "
                                    f"{gguf.MODEL_ARCH_NAMES[family.arch]} models have no place "
                                    "for (a changed architecture?); export the merged model "
                                    "instead")
                shape = tuple(weights.get_slice(source).get_shape())
                planned.append(PlannedTensor(name, shape, _weight_type(name, shape, weight_type),
                                             partial(_load, file, source, family, config)))
    return planned


def _weight_type(name: str, shape: tuple[int, ...], weight_type: Q) -> Q:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32  # norms and biases: llama.cpp's kernels take them in 32 bits
    if weight_type == Q.Q8_0 and shape[-1] % Q8_0_BLOCK:
        return Q.F16  # a row Q8_0 cannot pack, as llama.cpp's converter does too
    return weight_type


def _load(file: Path, source: str, family, config) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as weights:
        tensor = weights.get_tensor(source).float()
    heads = config.num_attention_heads
    if family.pair_rope and source.endswith(("q_proj.weight", "q_proj.bias")):
        tensor = _halves_to_pairs(tensor, heads)
    elif family.pair_rope and source.endswith(("k_proj.weight", "k_proj.bias")):
        tensor = _halves_to_pairs(tensor, getattr(config, "num_key_value_heads", None) or heads)
    elif family.arch == ARCH.GPTNEOX and ".query_key_value." in source:
        # [head][q|k|v] -> [q|k|v][head]
        fused = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
        tensor = fused.transpose(0, 1).reshape(tensor.shape)
    elif family.norms_minus_one and source.endswith("norm.weight"):
        tensor = tensor + 1
    return tensor.numpy()


def _halves_to_pairs(tensor, heads: int):
    """Reorder each head's rows from transformers' RoPE layout (first half rotates with the second)
    to llama.cpp's (row 2i rotates with row 2i + 1)."""
    rows = tensor.shape[0] // heads // 2
    return tensor.reshape(heads, 2, rows, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _rope_tensors(family, config) -> list[PlannedTensor]:
    """Per-frequency RoPE factors that llama.cpp reads as tensors: Llama 3.1's frequency scaling,
    Phi-3's long-context factors. Computed by transformers' own RoPE code."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if family.arch == ARCH.LLAMA and rope_type == "llama3":
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
        dim = 2 * len(scaled)
        unscaled = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2) / dim)
        return [_constant(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          (unscaled / scaled).numpy())]
    if family.arch == ARCH.PHI3 and rope_type == "longrope":
        return [_constant(gguf.TENSOR_NAMES[kind] + ".weight", np.array(rope[key], np.float32))
                for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                                  (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"))]
    return []


def _constant(name: str, values: np.ndarray) -> PlannedTensor:
    values = np.asarray(values, np.float32)
    return PlannedTensor(name, values.shape, Q.F32, lambda: values)
