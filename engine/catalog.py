"""The model catalog (presets/models.yaml) read as data."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from engine.config import PRESETS_DIR


@dataclass
class CatalogModel:
    id: str
    name: str
    hub_id: str
    params_b: float
    vram_gb: float  # rough QLoRA peak at 512 tokens, micro-batch 1 (see the file's header)
    licence: str
    cpu_ok: bool = False  # small enough to train on a CPU in minutes


def load_catalog() -> list[CatalogModel]:
    entries = yaml.safe_load((PRESETS_DIR / "models.yaml").read_text())
    return [CatalogModel(**entry) for entry in entries]


def find(model_id: str) -> CatalogModel | None:
    return next((m for m in load_catalog() if m.id == model_id), None)


def recommend(free_vram_gb: float | None) -> list[tuple[CatalogModel, str]]:
    """Catalog models that fit, largest first, each with a one-line reason.

    free_vram_gb None means no GPU: only models marked cpu_ok. A 10% margin is kept because the
    allocator fragments and the card may also drive a screen.
    """
    if free_vram_gb is None:
        return [(m, "CPU mode: small enough to train on a CPU") for m in load_catalog() if m.cpu_ok]
    budget = free_vram_gb * 0.9
    fitting = [m for m in load_catalog() if m.vram_gb <= budget]
    fitting.sort(key=lambda m: m.params_b, reverse=True)
    return [(m, f"about {m.vram_gb:.1f} GB of {free_vram_gb:.1f} GB free at 512 tokens") for m in fitting]
