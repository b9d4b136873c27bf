"""GGUF for llama.cpp, Ollama and LM Studio, written in Python with the gguf package: no compiler
and no llama.cpp checkout. F16, BF16 and Q8_0 are written here from a merged 16-bit folder;
Q4_K_M and Q5_K_M need llama.cpp's own quantizer (k-quants pick bits per tensor by rules only
llama.cpp implements), which llama-cpp-python exposes where it is installed.

llama.cpp's conventions that a plain copy of the weights would break (learned from its
convert_hf_to_gguf.py and the model code in src/models/):
- the "llama" architecture rotates adjacent pairs of each head's query/key dimensions, transformers
  rotates the two halves: the rows of q_proj and k_proj are reordered to match (Qwen2, Phi-3,
  Gemma 2 and GPT-NeoX rotate halves in llama.cpp too, so theirs stay as they are);
- GPT-NeoX fuses q, k and v per head ([head][q|k|v]); llama.cpp wants [q|k|v] of all heads;
- Gemma stores RMSNorm weights as w - 1 and multiplies by 1 + w; llama.cpp multiplies by w;
- one-dimensional tensors (norms, biases) stay 32-bit floats, as llama.cpp's kernels expect.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from engine.gguf_vocab import GgufError, add_tokenizer
from engine.ollama import create_in_ollama, modelfile_text, ollama_command, ollama_name

Progress = Callable[[float, str], None]  # progress(fraction done 0..1, what happens now)
# The types written here: each weight matrix's type, and the file type the header declares.
WRITTEN = {"f16": (Q.F16, LlamaFileType.MOSTLY_F16), "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
           "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
QUANTIZED = ("q4_k_m", "q5_k_m")  # by llama.cpp's quantizer, from a 16-bit GGUF written here
GGUF_TYPES = (*WRITTEN, *QUANTIZED)


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    pair_rope: bool = False  # llama.cpp rotates adjacent pairs: q/k rows are reordered for it
    norms_minus_one: bool = False  # Gemma: RMSNorm weights are stored as w - 1


# transformers' model_type -> how llama.cpp runs it. Mistral is a llama to llama.cpp.
FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, pair_rope=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, pair_rope=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "gpt_neox": Family(gguf.MODEL_ARCH.GPTNEOX),
    "gemma2": Family(gguf.MODEL_ARCH.GEMMA2, norms_minus_one=True),
    "phi3": Family(gguf.MODEL_ARCH.PHI3),
}
NOT_POSSIBLE = {
    "gptj": "llama.cpp cannot run GPT-J: its list of architectures names gptj, but it has no "
            "code to load or run one (checked in the llama.cpp that llama-cpp-python 0.3.36 "
            "bundles), so a GGUF of it would not load in llama.cpp, Ollama or LM Studio. Export "
            "the merged model instead and run it with transformers",
}


def gguf_supported(model_type: str) -> tuple[bool, str]:
    """Whether a model of this transformers model_type can be exported to GGUF, and why not."""
    if model_type in FAMILIES:
        return True, f"llama.cpp runs {model_type} models"
    if model_type in NOT_POSSIBLE:
        return False, NOT_POSSIBLE[model_type]
    return False, (f"GGUF export knows {', '.join(sorted(FAMILIES))} models, not {model_type}: "
                   "export the merged model instead")


def quantizer_available() -> tuple[bool, str]:
    """Whether Q4_K_M and Q5_K_M can be made here (llama.cpp's quantizer, from llama-cpp-python)."""
    from importlib.util import find_spec

    if find_spec("llama_cpp") is not None:
        return True, "llama.cpp's quantizer (from llama-cpp-python) is installed"
    return False, ("Q4_K_M and Q5_K_M need llama.cpp's quantizer, which comes with "
                   "llama-cpp-python: install it with `pip install llama-cpp-python` (it compiles "
                   "llama.cpp, so a C++ compiler and cmake must be installed), then export again. "
                   "F16, BF16 and Q8_0 need nothing extra")


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise GgufError(f"unknown GGUF type '{gguf_type}': use {', '.join(GGUF_TYPES)}")
    if gguf_type in QUANTIZED:
        available, why = quantizer_available()
        if not available:
            raise GgufError(why)


def write_gguf(model_dir: Path, out_file: Path, gguf_type: str, progress: Progress | None = None,
               name: str | None = None) -> Path:
    """A GGUF file of the (merged, 16-bit) transformers model in model_dir: f16, bf16 or q8_0.
    name: the model's name in the file (default: the folder's). Not decoration: llama.cpp reads
    tokenizer quirks from it (with "phi3" in the name it expects Phi-3's special tokens)."""
    from transformers import AutoConfig

    from engine.gguf_tensors import add_hparams, plan_tensors

    progress = progress or (lambda fraction, message: None)
    if gguf_type not in WRITTEN:
        raise GgufError(f"GGUF type '{gguf_type}' is not written by the gguf package: use "
                        f"{', '.join(WRITTEN)} (or export, which quantizes {', '.join(QUANTIZED)} "
                        "with llama.cpp)")
    config = AutoConfig.from_pretrained(model_dir)
    supported, why = gguf_supported(config.model_type)
    if not supported:
        raise GgufError(why)
    family = FAMILIES[config.model_type]
    weight_type, file_type = WRITTEN[gguf_type]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(model_dir).name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    add_hparams(writer, family, config)
    add_tokenizer(writer, model_dir, config.vocab_size)
    tensors = plan_tensors(model_dir, family, config, weight_type)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.stored_shape, tensor.stored_dtype,
                               tensor.nbytes, raw_dtype=tensor.qtype)
    out_file = Path(out_file)
    try:
        writer.write_header_to_file(path=out_file)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # One tensor in memory at a time, however large the model
        for done, tensor in enumerate(tensors):
            progress(done / len(tensors), f"writing the GGUF file ({gguf_type.upper()}): "
                     f"{done} of {len(tensors)} tensors")
            writer.write_tensor_data(tensor.data())
    except BaseException:
        writer.close()
        out_file.unlink(missing_ok=True)
        raise
    writer.close()
    progress(1.0, f"GGUF file written ({gguf_type.upper()})")
    return out_file


def quantize(source: Path, out_file: Path, gguf_type: str) -> Path:
    """Quantize a 16-bit GGUF to Q4_K_M or Q5_K_M with llama.cpp's quantizer."""
    import ctypes

    if gguf_type not in QUANTIZED:
        raise GgufError(f"llama.cpp's quantizer is used here for {', '.join(QUANTIZED)} only")
    check_gguf_type(gguf_type)
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # installed, but its compiled library does not load
        raise GgufError(f"llama-cpp-python is installed but does not load ({exc}): reinstall it "
                        "with `pip install --force-reinstall llama-cpp-python`") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(),
                                          ctypes.byref(params))
    if code != 0 or not Path(out_file).is_file():
        Path(out_file).unlink(missing_ok=True)
        raise GgufError(f"llama.cpp's quantizer could not make {gguf_type.upper()} (code {code}); "
                        "Q8_0 is written without it")
    return Path(out_file)


def export_gguf(run, dest: Path, gguf_type: str, progress: Progress | None = None) -> list[str]:
    """Into the empty folder dest: `<run>-<type>.gguf` and an Ollama `Modelfile`, made from the
    run's merged model (written to a scratch folder inside dest, deleted afterwards). Returns
    notes for people: what was written and the command that adds it to Ollama."""
    from transformers import AutoTokenizer

    from engine.export import adapter_info, write_merged
    from engine.templates import get_template

    progress = progress or (lambda fraction, message: None)
    check_gguf_type(gguf_type)
    info = adapter_info(run)
    known_type = _base_model_type(info)
    if known_type is not None:  # refused before the minutes a merge takes
        supported, why = gguf_supported(known_type)
        if not supported:
            raise GgufError(why)
    dest = Path(dest)
    gguf_file = dest / f"{run.name}-{gguf_type}.gguf"
    scratch = dest / ".merged"
    scratch.mkdir()
    try:
        write_merged(run, scratch, _span(progress, 0.0, 0.5))
        if gguf_type in WRITTEN:
            write_gguf(scratch, gguf_file, gguf_type, _span(progress, 0.5, 0.95), run.name)
        else:
            sixteen = _sixteen_bit_type(scratch)
            source = write_gguf(scratch, scratch / f"model-{sixteen}.gguf", sixteen,
                                _span(progress, 0.5, 0.75), run.name)
            progress(0.75, f"quantizing to {gguf_type.upper()} with llama.cpp")
            quantize(source, gguf_file, gguf_type)
        tokenizer = AutoTokenizer.from_pretrained(scratch)
        template = get_template(info.get("template", "model"), tokenizer)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    modelfile = dest / "Modelfile"
    modelfile.write_text(modelfile_text(gguf_file.name, template), encoding="utf-8")
    name = ollama_name(run.name)
    notes = [f"{gguf_file.name}: {gguf_file.stat().st_size / 1e6:,.0f} MB, for llama.cpp, LM "
             "Studio and Ollama (its chat template and stop tokens are inside)",
             f"Ollama: in the export folder, run `{ollama_command(name, Path('Modelfile'))}`"]
    created = create_in_ollama(name, modelfile)
    if created:
        notes.append(created)
    return notes


def _base_model_type(info: dict) -> str | None:
    """The base model's model_type, where the catalog or its folder tells without loading it."""
    from engine.export import base_shape

    shape = base_shape(info)
    return shape.arch if shape is not None else None


def _sixteen_bit_type(model_dir: Path) -> str:
    """The merged weights' own 16-bit type, so the file llama.cpp quantizes from is lossless."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return "f16" if config.get("dtype", config.get("torch_dtype")) == "float16" else "bf16"


def _span(progress: Progress, start: float, end: float) -> Progress:
    """A step's own 0..1 progress, shown as start..end of the whole export."""
    return lambda fraction, message: progress(start + fraction * (end - start), message)
