"""The run configuration: one typed dataclass; YAML is only how it is saved.

Every field has one type, one default and a one-line reason (its help); the command line's
`train` flags and the UI's form are built from the fields and their metadata (see `setting`). Recipes in presets/recipes/*.yaml
are partial overrides of these defaults (data, not code paths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from engine.formats import FORMATS
from engine.templates import template_names

STRATEGIES = ("auto", "ddp", "fsdp")
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A configuration a person wrote or chose is not usable; the message says what to change."""


def setting(default, help: str, *, label: str = "", flag: str = "", advanced: bool = True,
            ui: bool = True, choices: tuple = ()):
    """A RunConfig field with what the CLI flag and the UI form are built from: help (the one line
    of why), label (the form's), flag (when not the field's name), advanced (in the form's
    Advanced section), ui (False: not a form setting) and choices (a fixed set of values)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "label": label, "flag": flag, "advanced": advanced, "ui": ui, "choices": choices})


@dataclass
class RunConfig:
    # What to train on
    model: str = setting("embedded", "catalog id, Hub id, local folder, or 'embedded' (offline "
                         "SmolLM2-135M)", ui=False)  # the Hardware & model choice sets it
    data_path: str = setting("", "training file (.jsonl/.json/.csv/.parquet) or Hub dataset id; kept "
                             "unchanged", flag="data", ui=False)  # the uploaded or named data sets it
    eval_data_path: str = setting("", "optional second file for eval loss; wins over eval_share",
                                  label="Eval file (optional)", flag="eval-data")
    eval_share: float = setting(0.0, "share of rows held out for eval loss (0 = no eval split)",
                                label="Eval share")
    data_format: str = setting("auto", "detected per file, or forced", label="Format",
                               flag="format", choices=("auto", *FORMATS))
    data_columns: str = setting("", "csv/parquet column mapping, e.g. \"prompt=question,completion=answer\"",
                                label="Columns", flag="columns")
    skip_bad_rows: bool = setting(False, "train on the good rows of a file with bad ones (the count is "
                                  "logged)", label="Skip bad rows")
    template: str = setting("guanaco", "prompt format: guanaco is the paper's, model the model's own chat "
                            "template", label="Prompt format", choices=tuple(template_names()))
    max_seq_len: int = setting(512, "longer rows are cut; the main lever on activation memory",
                               label="Max sequence length (tokens)", advanced=False)

    # Schedule
    epochs: float = setting(3.0, "passes over the data; ignored when max_steps > 0", label="Epochs",
                            advanced=False)
    max_steps: int = setting(-1, "optimizer steps to run instead of epochs (-1 = use epochs)",
                             label="Max steps (-1 = use epochs)")
    lr: float = setting(2e-4, "the QLoRA paper's rate for models up to 13B", label="Learning rate",
                        advanced=False)
    lr_scheduler: str = setting("constant", "the paper found constant as good as cosine for QLoRA",
                                label="LR schedule", choices=("constant", "cosine", "linear"))
    warmup_ratio: float = setting(0.03, "the paper's warmup share", label="Warmup share of steps")
    max_grad_norm: float = setting(0.3, "the paper's clipping; keeps 4-bit training stable",
                                   label="Max gradient norm")
    micro_batch_size: int = setting(1, "rows per forward pass; the other lever on activation memory",
                                    label="Micro-batch size", flag="micro-batch", advanced=False)
    grad_accum_steps: int = setting(16, "micro-batches per optimizer step (effective batch = product)",
                                    label="Gradient accumulation steps", flag="grad-accum",
                                    advanced=False)
    group_by_length: bool = setting(True, "batch similar lengths together: less padding, as in the paper",
                                    label="Group rows by length")
    seed: int = setting(42, "same seed, same data order and same LoRA init", label="Seed")

    # LoRA
    lora_r: int = setting(64, "adapter rank (the paper's default)", label="LoRA rank (r)",
                          advanced=False)
    lora_alpha: int = setting(16, "scale is alpha / r (the paper's default)",
                              label="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = setting(0.1, "the paper's value up to 13B (0.05 from 33B up)",
                                  label="LoRA dropout")
    lora_target: str = setting("all-linear", "the paper's finding: adapters on every linear layer matter",
                               label="LoRA target modules")

    # Quantization and compute
    quant_type: str = setting("nf4", "4-bit NormalFloat, the paper's data type (or fp4)",
                              label="4-bit data type", choices=("nf4", "fp4"))
    double_quant: bool = setting(True, "quantize the quantization constants too: ~0.37 bits/param saved",
                                 label="Double quantization")
    compute_dtype: str = setting("auto", "auto: bf16 on GPUs with native bf16, else fp16; CPU: the faster",
                                 label="Compute dtype", choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = setting(True, "recompute activations: far less memory, ~30% slower",
                                           label="Gradient checkpointing")
    optimizer: str = setting("auto", "auto = paged_adamw_32bit on CUDA; on CPU adamw_torch, or "
                             "bitsandbytes' AdamW 32-bit (unpaged) for 16-bit LoRA weights",
                             label="Optimizer")
    kernels: str = setting("auto", "our faster, leaner training path (kernels/) where a benchmark "
                           "on this kind of device showed it pays; off = the reference QLoRA stack",
                           label="Training kernels", choices=("auto", "off"))
    device: str = setting("auto", "auto = cuda if available, else cpu", label="Device",
                          choices=("auto", "cuda", "cpu"))
    gpu: int = setting(-1, "which GPU, as nvidia-smi numbers them (-1 = the most free memory at start)",
                       label="GPU")
    # Several processes (DDP): one per GPU, here and on other machines (engine/distributed.py)
    gpus: str = setting("", "the GPUs of a run on several processes, as nvidia-smi numbers them, "
                        "e.g. \"0,1\" (empty: one GPU, as gpu says)", label="GPUs (several)")
    num_processes: int = setting(1, "training processes on this machine, one per GPU (a CPU run "
                                 "may use several too); each trains on its share of every batch",
                                 label="Processes on this machine")
    strategy: str = setting("auto", "how several processes share the work: ddp = each holds the "
                            "whole model, fsdp = the model sharded over them; auto = what the "
                            "planner picks", label="Multi-process strategy",
                            choices=STRATEGIES)
    num_machines: int = setting(1, "machines training this run together", label="Machines")
    machine_rank: int = setting(0, "this machine's number among them (0 = the main machine)",
                                label="This machine's rank")
    main_process_ip: str = setting("", "the main machine's address, for a run on several "
                                   "machines", label="Main machine's address")
    main_process_port: int = setting(29500, "the port the processes meet on at the main "
                                     "machine", label="Main machine's port")
    trust_remote_code: bool = setting(False, "never run a model repo's own code unless asked",
                                      ui=False)  # asked for at a terminal, never from a web form

    # Bookkeeping
    logging_steps: int = setting(1, "log every optimizer step so the live chart moves",
                                 label="Log every N steps")
    save_steps: int = setting(50, "checkpoint every N optimizer steps (resumable)",
                              label="Checkpoint every N steps")
    save_total_limit: int = setting(2, "keep the last few checkpoints only; they hold optimizer state",
                                    label="Checkpoints kept")
    save_minutes: float = setting(10.0, "also checkpoint at least this often, so a crash loses little "
                                  "work", label="Checkpoint every N minutes")

    def validate(self) -> "RunConfig":
        problems = []
        if not self.model:
            problems.append("model is empty: pick a catalog model, a Hub id or a folder")
        if not self.data_path:
            problems.append("data_path is empty: upload or name a training file")
        if self.template not in template_names():
            problems.append(f"template '{self.template}' is unknown: use {', '.join(template_names())}")
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
        if self.kernels not in ("auto", "off"):
            problems.append(f"kernels '{self.kernels}' is unknown: use auto or off")
        if self.gpu < -1:
            problems.append(f"gpu {self.gpu} is not a GPU number: use -1 (the one with the most "
                            "free memory) or an index as nvidia-smi lists them (0, 1, ...)")
        problems += self._layout_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def _layout_problems(self) -> list[str]:
        """What is wrong with the process layout (gpus, num_processes, strategy, machines)."""
        problems = []
        try:
            listed = self.gpu_list()
        except ValueError:
            return [f"gpus '{self.gpus}' is not a list of GPU numbers: write them as nvidia-smi "
                    "lists them, separated by commas, e.g. 0,1"]
        if len(set(listed)) != len(listed):
            problems.append(f"gpus '{self.gpus}' names a GPU twice: one process per GPU")
        if self.num_processes < 1:
            problems.append("num_processes must be at least 1")
        elif listed and self.num_processes not in (1, len(listed)):
            problems.append(f"num_processes {self.num_processes} does not match the {len(listed)} "
                            f"GPUs in gpus '{self.gpus}': one process per GPU (or leave "
                            "num_processes at 1 and it follows gpus)")
        if listed and self.device == "cpu":
            problems.append("gpus names GPUs but device is cpu: clear gpus, or set device to "
                            "auto or cuda")
        if listed and self.gpu != -1:
            problems.append("set either gpu (one GPU) or gpus (several), not both")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy '{self.strategy}' is unknown: use {', '.join(STRATEGIES)}")
        if self.num_machines < 1:
            problems.append("num_machines must be at least 1")
        elif not 0 <= self.machine_rank < self.num_machines:
            problems.append(f"machine_rank {self.machine_rank} must be from 0 to "
                            f"{self.num_machines - 1} (num_machines is {self.num_machines})")
        if self.num_machines > 1 and not self.main_process_ip:
            problems.append("a run on several machines needs main_process_ip: the address of "
                            "the machine with machine_rank 0")
        if not 0 < self.main_process_port < 65536:
            problems.append(f"main_process_port {self.main_process_port} is not a port number "
                            "(1 to 65535)")
        return problems

    def gpu_list(self) -> list[int]:
        """The GPUs in `gpus` as numbers ([] when empty); ValueError when they are not numbers."""
        numbers = [int(part) for part in self.gpus.replace(" ", "").split(",") if part]
        if any(number < 0 for number in numbers):
            raise ValueError(self.gpus)
        return numbers

    def processes_here(self) -> int:
        """Training processes on this machine: one per GPU in gpus, else num_processes."""
        if self.num_processes == 1:
            return len(self.gpu_list()) or 1
        return self.num_processes

    def several_processes(self) -> bool:
        """Whether the run trains in several processes (here or over several machines)."""
        return self.processes_here() > 1 or self.num_machines > 1

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
