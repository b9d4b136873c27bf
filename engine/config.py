"""The run configuration: one typed dataclass; YAML is only how it is saved.

Every field has one type, one default and a one-line reason. Recipes in presets/recipes/*.yaml
are partial overrides of these defaults (data, not code paths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from engine.formats import FORMATS

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A configuration a person wrote or chose is not usable; the message says what to change."""


@dataclass
class RunConfig:
    # What to train on
    model: str = "embedded"  # catalog id, Hub id, local folder, or "embedded" (offline SmolLM2-135M)
    data_path: str = ""  # training file (.jsonl/.json/.csv/.parquet) or Hub dataset id; kept unchanged
    eval_data_path: str = ""  # optional second file for eval loss; wins over eval_share
    eval_share: float = 0.0  # share of rows held out for eval loss (0 = no eval split)
    data_format: str = "auto"  # detected per file, or forced (engine.formats.FORMATS names one)
    data_columns: str = ""  # csv/parquet column mapping, e.g. "prompt=question,completion=answer"
    skip_bad_rows: bool = False  # train on the good rows of a file with bad ones (the count is logged)
    template: str = "guanaco"  # prompt format: guanaco (the paper's), alpaca, or model (its chat template)
    max_seq_len: int = 512  # longer rows are cut; the main lever on activation memory

    # Schedule
    epochs: float = 3.0  # passes over the data; ignored when max_steps > 0
    max_steps: int = -1  # optimizer steps to run instead of epochs (-1 = use epochs)
    lr: float = 2e-4  # the QLoRA paper's rate for models up to 13B
    lr_scheduler: str = "constant"  # the paper found constant as good as cosine for QLoRA
    warmup_ratio: float = 0.03  # the paper's warmup share
    max_grad_norm: float = 0.3  # the paper's clipping; keeps 4-bit training stable
    micro_batch_size: int = 1  # rows per forward pass; the other lever on activation memory
    grad_accum_steps: int = 16  # micro-batches per optimizer step (effective batch = product)
    group_by_length: bool = True  # batch similar lengths together: less padding, as in the paper
    seed: int = 42  # same seed, same data order and same LoRA init

    # LoRA
    lora_r: int = 64  # adapter rank (the paper's default)
    lora_alpha: int = 16  # scale is alpha / r (the paper's default)
    lora_dropout: float = 0.1  # the paper's value up to 13B (0.05 from 33B up)
    lora_target: str = "all-linear"  # the paper's finding: adapters on every linear layer matter

    # Quantization and compute
    quant_type: str = "nf4"  # 4-bit NormalFloat, the paper's data type (or fp4)
    double_quant: bool = True  # quantize the quantization constants too: ~0.37 bits/param saved
    compute_dtype: str = "auto"  # auto: bf16 on GPUs with native bf16, else fp16; CPU: the faster
    gradient_checkpointing: bool = True  # recompute activations: far less memory, ~30% slower
    optimizer: str = "auto"  # auto = paged_adamw_32bit on CUDA, adamw_torch on CPU
    device: str = "auto"  # auto = cuda if available, else cpu
    gpu: int = -1  # which GPU, as nvidia-smi numbers them (-1 = the most free memory at start)
    trust_remote_code: bool = False  # never run a model repo's own code unless asked

    # Bookkeeping
    logging_steps: int = 1  # log every optimizer step so the live chart moves
    save_steps: int = 50  # checkpoint every N optimizer steps (resumable)
    save_total_limit: int = 2  # keep the last few checkpoints only; they hold optimizer state
    save_minutes: float = 10.0  # also checkpoint at least this often, so a crash loses little work

    def validate(self) -> "RunConfig":
        problems = []
        if not self.model:
            problems.append("model is empty: pick a catalog model, a Hub id or a folder")
        if not self.data_path:
            problems.append("data_path is empty: upload or name a training file")
        if self.template not in ("guanaco", "alpaca", "model"):
            problems.append(f"template '{self.template}' is unknown: use guanaco, alpaca or model")
        if self.max_seq_len < 16:
            problems.append(f"max_seq_len {self.max_seq_len} is too short: use at least 16")
        if self.epochs <= 0 and self.max_steps <= 0:
            problems.append("set epochs above 0 or max_steps above 0")
        if not 0 < self.lr < 1:
            problems.append(f"lr {self.lr} is out of range: typical values are 1e-5 to 1e-3")
        for name in ("micro_batch_size", "grad_accum_steps", "lora_r", "lora_alpha", "save_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            problems.append("lora_dropout must be between 0 and 1")
        if not 0 <= self.eval_share < 0.5:
            problems.append("eval_share must be between 0 and 0.5")
        if self.data_format not in ("auto", *FORMATS):
            problems.append(f"data_format '{self.data_format}' is unknown: use auto, "
                            f"{', '.join(FORMATS)}")
        if self.quant_type not in ("nf4", "fp4"):
            problems.append(f"quant_type '{self.quant_type}' is unknown: use nf4 or fp4")
        if self.compute_dtype not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"compute_dtype '{self.compute_dtype}' is unknown: use auto, bf16, fp16, fp32")
        if self.gpu < -1:
            problems.append(f"gpu {self.gpu} is not a GPU number: use -1 (the one with the most "
                            "free memory) or an index as nvidia-smi lists them (0, 1, ...)")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        converted = {}
        for name, value in values.items():
            converted[name] = _coerce(name, known[name].type, value)
        return cls(**converted)

    def save(self, path: Path) -> None:
        header = "# QLoRA Studio run configuration (complete and resolved; edit and rerun with\n"
        header += "# `python -m engine train --config this.yaml --out NEW_RUN_DIR`)\n"
        Path(path).write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold settings as 'name: value' lines")
        return cls.from_dict(values)


def _coerce(name: str, type_name: str, value):
    """YAML and HTML forms give strings and ints where floats are meant; convert, or say which field."""
    target = {"str": str, "int": int, "float": float, "bool": bool}[type_name]
    if isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError  # true is not 1, and None or a list is not the text "None"/"[...]"
        if target is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return target(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a {type_name}, got {value!r}") from None


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (PRESETS_DIR / "recipes").glob("*.yaml"))


def load_recipe(name: str, **overrides) -> RunConfig:
    """A recipe's values on top of the defaults, then the caller's overrides on top of those."""
    path = PRESETS_DIR / "recipes" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe '{name}' not found: choose one of {', '.join(recipe_names())}")
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("description", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_dict(values)


def recipe_description(name: str) -> str:
    path = PRESETS_DIR / "recipes" / f"{name}.yaml"
    return str((yaml.safe_load(path.read_text()) or {}).get("description", ""))
