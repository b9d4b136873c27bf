"""Hardware & model tab: what this machine has, and which base model to fine-tune."""

from __future__ import annotations

import gradio as gr

from engine import catalog
from engine.hardware import detect
from engine.paths import data_dir


def model_choices(free_vram_gb: float | None) -> tuple[list[tuple[str, str]], str]:
    """Dropdown choices (label, catalog id), recommended first, and the default pick."""
    recommended = catalog.recommend(free_vram_gb)
    fits = {m.id for m, _ in recommended}
    choices = [(f"✓ {m.name}: {why}", m.id) for m, why in recommended]
    for model in catalog.load_catalog():
        if model.id not in fits:
            need = "a GPU" if free_vram_gb is None else f"about {model.vram_gb:.0f} GB"
            choices.append((f"✗ {model.name}: needs {need}", model.id))
    return choices, (recommended[0][0].id if recommended else "embedded")


def hardware_markdown() -> str:
    found = detect(data_dir())
    lines = ["### This machine"]
    if found.has_gpu:
        for gpu in found.gpus:
            lines.append(f"- **GPU {gpu.index}: {gpu.name}**: {gpu.free_gb:.1f} GB free of "
                         f"{gpu.total_gb:.1f} GB; bf16 {'yes' if gpu.bf16 else 'no (fp16 compute)'}")
            held = gpu.total_gb - gpu.free_gb
            if held > 1.0:
                lines.append(f"  - {held:.1f} GB is held by other programs (a desktop, a game, "
                             "another model): free VRAM is what counts")
    else:
        lines.append(f"- **No GPU: CPU mode, tiny models only** ({found.gpu_note}). Training uses "
                     "plain AdamW (paged optimizers need CUDA).")
    lines.append(f"- CPU: {found.cpu_name}, {found.cpu_cores} cores; RAM {found.ram_free_gb:.1f} GB "
                 f"free of {found.ram_total_gb:.1f} GB")
    lines.append(f"- Disk: {found.disk_free_gb:.1f} GB free in {data_dir()}")
    return "\n".join(lines)


def free_vram() -> float | None:
    found = detect(data_dir())
    return max(g.free_gb for g in found.gpus) if found.has_gpu else None


def build() -> dict:
    choices, default = model_choices(free_vram())
    info = gr.Markdown(hardware_markdown(), elem_id="hardware-info")
    refresh = gr.Button("Refresh", size="sm")
    gr.Markdown("### Base model\nRecommended models that fit this machine come first (✓). Memory "
                "figures are rough guides at 512 tokens and micro-batch 1.")
    model = gr.Dropdown(choices=choices, value=default, label="Base model", elem_id="model-choice")
    custom = gr.Textbox(label="Or a Hugging Face Hub id or a local model folder (overrides the list)",
                        placeholder="e.g. EleutherAI/gpt-j-6b or /models/my-llama", elem_id="custom-model")
    refresh.click(hardware_markdown, outputs=info, api_name=False)
    return {"model": model, "custom_model": custom}


def selected_model(choice: str, custom: str) -> str:
    return (custom or "").strip() or choice or "embedded"
