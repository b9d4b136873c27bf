"""Which pieces of our kernels/ package a run with `kernels: auto` turns on, per device class.

presets/kernels.yaml holds the choice and, for each piece, the benchmark figure that justified it
(or that it still awaits one). Read as data: the planner, the UI and the training recipe ask here
without importing kernels/, which imports torch.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from engine.config import PRESETS_DIR, ConfigError

KERNELS_FILE = PRESETS_DIR / "kernels.yaml"
DEVICE_CLASSES = ("cuda", "cpu")
# The pieces, in the order a person reads them; presets/kernels.yaml says what each one does.
PIECES = ("lora4bit", "chunked_loss", "padding_free", "lora16")


class KernelChoiceError(ConfigError):
    """presets/kernels.yaml, or a kernels setting or device class asked of it, that the engine
    cannot use; a ConfigError, so the UI says it in a sentence."""


def read_choices(path: Path = KERNELS_FILE) -> dict[str, dict[str, str]]:
    """Device class -> {piece: why it is on}, checked: known classes and pieces, a reason each."""
    try:
        choices = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KernelChoiceError(f"{path} could not be read ({exc}): restore the file from a fresh "
                                "copy of the project.") from None
    if not isinstance(choices, dict):
        raise KernelChoiceError(f"{path} must map a device class ({', '.join(DEVICE_CLASSES)}) to "
                                "its pieces.")
    for device, pieces in choices.items():
        if device not in DEVICE_CLASSES:
            raise KernelChoiceError(f"{path} names an unknown device class '{device}': use "
                                    f"{' or '.join(DEVICE_CLASSES)}.")
        if not isinstance(pieces or {}, dict):
            raise KernelChoiceError(f"{path}: {device} must map each piece it turns on to why "
                                    "(e.g. `lora16: awaits a benchmark`).")
        for piece, why in (pieces or {}).items():
            if piece not in PIECES:
                raise KernelChoiceError(f"{path} turns on an unknown piece '{piece}' for {device}: "
                                        f"the pieces are {', '.join(PIECES)}.")
            if not isinstance(why, str) or not why.strip():
                raise KernelChoiceError(f"{path}: the piece '{piece}' for {device} needs its "
                                        "reason (the benchmark file and figure, or 'awaits a "
                                        "benchmark').")
    return {device: dict(pieces or {}) for device, pieces in choices.items()}


@cache
def _choices() -> dict[str, dict[str, str]]:
    return read_choices()


def kernel_pieces(device_class: str) -> dict[str, str]:
    """The pieces `kernels: auto` turns on for a device class ("cuda" or "cpu"), each with why,
    in PIECES' order."""
    if device_class not in DEVICE_CLASSES:
        raise KernelChoiceError(f"Kernels are chosen per device class, '{device_class}' is none: "
                                f"use {' or '.join(DEVICE_CLASSES)}.")
    chosen = _choices().get(device_class, {})
    return {piece: chosen[piece] for piece in PIECES if piece in chosen}


def optimizer_for(optimizer: str, device: str, lora16: bool = False) -> str:
    """The optimizer a run with this setting gets. `auto` is the QLoRA paper's paged AdamW 32-bit
    on CUDA. On a CPU there is no GPU memory to page from: AdamW (torch), as the reference stack
    trains there, except with 16-bit LoRA weights, whose moments must stay 32-bit: bitsandbytes'
    AdamW 32-bit then, which bitsandbytes runs unpaged on a CPU (and says so in the log)."""
    if optimizer != "auto":
        return optimizer
    return "paged_adamw_32bit" if device == "cuda" or lora16 else "adamw_torch"


def keeps_32bit_state(optimizer: str) -> bool:
    """Whether this optimizer (transformers' name) keeps its state in 32 bits (or bitsandbytes'
    blockwise 8) whatever the weights' dtype: bitsandbytes' do. torch's keep it in the weights'
    dtype, so with 16-bit LoRA weights (lora16) the moments would be 16-bit too, which the paper's
    recipe never trained with: lora16 goes with a bitsandbytes optimizer only (`auto` picks one)."""
    return "bnb" in optimizer or optimizer.endswith(("_8bit", "_32bit"))


def allows_lora16(optimizer: str) -> bool:
    """Whether a run with this optimizer setting may keep 16-bit LoRA weights: `auto` (which then
    picks bitsandbytes' AdamW, optimizer_for) or an optimizer that keeps 32-bit state."""
    return optimizer == "auto" or keeps_32bit_state(optimizer)
