"""The model catalog (presets/models.yaml) and model shapes, read as data.

A shape is all the memory planner needs to know about a model. It comes from the catalog, or from
a model folder's config.json, so that a model outside the catalog can be planned too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import yaml

from engine.config import PRESETS_DIR
from engine.templates import template_names

# Architectures whose MLP is two plain matrices (up, down); every other family we know uses a gated
# MLP with three (gate, up, down), as Llama does.
PLAIN_MLP_ARCHS = {"gptj", "gpt_neox", "gpt2", "gpt_bigcode", "opt", "phi", "falcon", "bloom"}


@cache
def attention_kernels() -> dict[str, str]:
    """Architecture (model_type) -> the attention transformers runs for it: sdpa or eager."""
    return yaml.safe_load((PRESETS_DIR / "attention.yaml").read_text())


class CatalogError(ValueError):
    """A catalog entry or a config.json that does not describe a usable model shape."""


@dataclass(frozen=True)
class CatalogModel:
    id: str
    name: str
    hub_id: str
    arch: str  # transformers' model_type
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # output head shares the input embedding
    max_context: int
    params_b: float = 0.0  # published parameter count (0 = unknown, e.g. a local folder)
    licence: str = "unknown"
    prompt_style: str = "guanaco"  # default template, a name in engine/templates.py's TEMPLATES
    head_dim: int = 0  # 0 = hidden / heads
    cpu_ok: bool = False  # small enough to fine-tune on a CPU in minutes
    gated: bool = False  # the Hub asks you to accept a licence first
    revision: str | None = None  # the Hub revision to download (None: the default branch)
    weights_bits: int = 16  # bits per weight of the weights there (what is downloaded)
    # "pickle" where that revision has only pytorch_model*.bin: converted once to safetensors on
    # download, by PyTorch's weights-only loader, since we load nothing but safetensors
    weights_format: str = "safetensors"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def attention(self) -> str:
        # SDPA is transformers' default wherever a model class supports it
        return attention_kernels().get(self.arch, "sdpa")

    @property
    def download_gb(self) -> float:
        """About how many GB the weights download is (0 = unknown)."""
        return self.params_b * self.weights_bits / 8

    @property
    def gated_mlp(self) -> bool:
        return self.arch not in PLAIN_MLP_ARCHS

    @property
    def linear_params_per_layer(self) -> int:
        """Weights in one block's linear layers: what bitsandbytes stores in 4 bits and LoRA wraps."""
        q_and_o = 2 * self.hidden * self.heads * self.head_size
        k_and_v = 2 * self.hidden * self.kv_heads * self.head_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return q_and_o + k_and_v + mlp

    @property
    def quantized_params(self) -> int:
        return self.layers * self.linear_params_per_layer

    @property
    def embedding_params(self) -> int:
        """Input embedding plus, unless tied, the output head: both stay in 16 bits (or fp32)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def other_params(self) -> int:
        # Norm weights (and biases where a family has them): a few vectors per layer.
        return (4 * self.layers + 2) * self.hidden

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.embedding_params + self.other_params

    def problems(self) -> list[str]:
        """What is wrong with this shape, in words; empty when it is usable."""
        found = []
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "max_context"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                found.append(f"{name} must be a positive whole number, got {getattr(self, name)!r}")
        if found:
            return found
        if not self.head_dim and self.hidden % self.heads:
            found.append(f"heads ({self.heads}) must divide hidden ({self.hidden}), or set head_dim")
        if self.heads % self.kv_heads:
            found.append(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.prompt_style not in template_names():
            found.append(f"prompt_style '{self.prompt_style}' is unknown: "
                         f"use {', '.join(template_names())}")
        if self.weights_format not in ("safetensors", "pickle"):
            found.append(f"weights_format '{self.weights_format}' is unknown: "
                         "use safetensors or pickle")
        return found


def _catalog_path() -> Path:
    return PRESETS_DIR / "models.yaml"


def load_catalog() -> list[CatalogModel]:
    path = _catalog_path()
    known = {f.name for f in fields(CatalogModel)}
    models = []
    for number, entry in enumerate(yaml.safe_load(path.read_text()) or [], start=1):
        unknown = sorted(set(entry) - known)
        if unknown:
            raise CatalogError(f"{path}, entry {number} ({entry.get('id')}): unknown field(s) "
                               f"{', '.join(unknown)}")
        try:
            model = CatalogModel(**entry)
        except TypeError as exc:
            raise CatalogError(f"{path}, entry {number} ({entry.get('id')}): {exc}") from None
        problems = model.problems()
        if model.arch not in attention_kernels():
            problems.append(f"arch '{model.arch}' is missing from presets/attention.yaml")
        if problems:
            raise CatalogError(f"{path}, entry {number} ({model.id}): {'; '.join(problems)}")
        models.append(model)
    return models


def find(model_id: str) -> CatalogModel | None:
    """A catalog entry by our id or by its Hub id (case-insensitive)."""
    wanted = model_id.strip().lower()
    return next((m for m in load_catalog() if wanted in (m.id.lower(), m.hub_id.lower())), None)


def shape_from_config(folder: str | Path) -> CatalogModel:
    """The shape of a local model folder, read from its config.json (no torch, no transformers)."""
    path = Path(folder).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"cannot read {path}: {exc}") from None
    config = {**config, **config.get("text_config", {})}  # multimodal configs nest the LM

    def pick(*names, default=None):
        return next((config[n] for n in names if config.get(n) is not None), default)

    hidden = pick("hidden_size", "n_embd", "d_model")
    heads = pick("num_attention_heads", "n_head")
    arch = str(pick("model_type", default="llama"))
    model = CatalogModel(
        id=str(Path(folder).name), name=str(Path(folder).name), hub_id=str(folder), arch=arch,
        layers=pick("num_hidden_layers", "n_layer", "num_layers"),
        hidden=hidden,
        intermediate=pick("intermediate_size", "n_inner", "ffn_dim", default=4 * (hidden or 0)),
        heads=heads,
        kv_heads=pick("num_key_value_heads", "num_kv_heads", default=heads),
        head_dim=pick("head_dim", default=0) or 0,
        vocab=pick("vocab_size"),
        # transformers' own default is to tie when a config does not say
        tied=bool(pick("tie_word_embeddings", default=True)),
        max_context=pick("max_position_embeddings", "n_positions", "max_seq_len", default=2048),
        prompt_style="model",
    )
    problems = model.problems()
    if problems:
        raise CatalogError(f"{path}: {'; '.join(problems)}")
    return model


# Where a tokenizer keeps its chat template: its own file (transformers 5) or a tokenizer_config.json field.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def default_template(model_name: str) -> str:
    """The prompt template a model trains with unless one is chosen: its catalog entry's prompt_style;
    for a folder or Hub id outside the catalog, "model" when its tokenizer ships a chat template
    (an instruct model), else "guanaco" (a base model: the QLoRA paper's format). A Hub model not
    downloaded yet counts as a base model: nothing here waits on the network."""
    entry = find(model_name or "embedded")
    if entry is not None:
        return entry.prompt_style
    return "model" if _has_chat_template(model_name.strip()) else "guanaco"


def _has_chat_template(name: str) -> bool:
    names = ("tokenizer_config.json", *CHAT_TEMPLATE_FILES)
    folder = Path(name).expanduser()
    if folder.is_dir():
        config, *template_files = (folder / filename for filename in names)
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
        config, *template_files = (_hub_file(name, filename) for filename in names)
    else:
        return False
    if any(path is not None and path.is_file() for path in template_files):
        return True
    try:  # older tokenizers keep the template inside tokenizer_config.json
        return config is not None and bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False  # missing or unreadable: no template we can see


def _hub_file(repo: str, filename: str) -> Path | None:
    """One file of a Hub model already in the local Hugging Face cache, else None. Never the network:
    this answers while someone picks a model, and an offline machine would wait a minute on retries."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename)
    except ValueError:  # not a valid repo id after all
        return None
    return Path(found) if isinstance(found, str) else None
