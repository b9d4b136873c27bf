"""Hardware & model tab: what this machine has, and which base model to fine-tune."""

from __future__ import annotations

import gradio as gr

from app.errors import EXPECTED, in_words
from engine import catalog, hardware, planner, planner_multi
from engine.hardware import cpu_dtype_note, detect
from engine.paths import data_dir


def model_choices(free_vram_gb: float | None, picks: list) -> tuple[list[tuple[str, str]], str]:
    """Dropdown choices (label, catalog id), the recommended picks first, and the default pick."""
    fits = {pick.model.id for pick in picks}
    choices = [(f"✓ {pick.why}", pick.model.id) for pick in picks]
    for model in catalog.load_catalog():
        if model.id not in fits:
            if free_vram_gb is None:
                need = "a GPU"
            else:
                need = f"about {planner.plan(model, 1024, 1, 16).total_gb:.0f} GB at 1024 tokens"
            choices.append((f"✗ {model.name}: needs {need}", model.id))
    return choices, (picks[0].model.id if picks else "embedded")


def recommendation_markdown(free_vram_gb: float | None, picks: list,
                            free_per_gpu: list[float] = ()) -> str:
    """The ranked list a person reads: what fits, at which length and micro-batch, and why;
    with 2+ GPUs (free GB of each), what 1..N of them give."""
    if free_vram_gb is None:
        return "### Recommended\n- **embedded**: no GPU, so the small offline model trains on the CPU."
    lines = [f"### Recommended for {free_vram_gb:.1f} GB free (LoRA r=16, 10% headroom kept)"]
    lines += [f"{rank}. **{pick.why}**, micro-batch {pick.micro_batch} ({pick.model.licence}"
              f"{download_note(pick.model)})" for rank, pick in enumerate(picks[:10], start=1)]
    if not picks:
        lines.append("- Nothing in the catalog fits at 1024 tokens: free GPU memory, or train on the CPU.")
    if len(free_per_gpu) >= 2:
        lines.append(several_gpus_markdown(free_per_gpu))
    return "\n".join(lines)


def several_gpus_markdown(free_per_gpu: list[float]) -> str:
    """What 1..N GPUs give: the largest model each count trains, how it is split, and why."""
    free = sorted(free_per_gpu, reverse=True)
    lines = ["### With several GPUs (largest model at 1024 tokens, LoRA r=16, 10% headroom kept)"]
    for count, layout in enumerate(planner_multi.largest_fits(free), start=1):
        gpus = f"{count} GPU{'s' if count > 1 else ''}"
        where = f"{free[count - 1]:.1f} GB free" + (" or more on each" if count > 1 else "")
        if layout is None:
            lines.append(f"- **{gpus}** ({where}): nothing in the catalog fits")
            continue
        plan = layout.per_gpu
        line = f"- **{gpus}** ({where}): **{plan.name}**, {plan.total_gb:.1f} GB"
        if count > 1:
            line += f" per GPU with {layout.label}"
            if layout.cpu_ram_gb:
                line += f" ({layout.cpu_ram_gb:.0f} GB of CPU RAM)"
            line += f": {layout.why}; {layout.how}"
        lines.append(line)
    lines.append(f"- A model that fits one GPU trains on {len(free)} with DDP: each GPU holds a "
                 f"whole copy, up to {len(free)}x the tokens/s; one that does not is sharded with "
                 "FSDP-QLoRA, which fits more but passes the weights between the GPUs every step")
    return "\n".join(lines)


def download_note(model) -> str:
    """The weights download a first run of this model makes; the embedded model is already here."""
    gb = model.download_gb
    if model.id == "embedded" or not gb:
        return ""
    return f", about {gb:.0f} GB to download" if gb >= 10 else f", about {gb:.1f} GB to download"


def hardware_markdown() -> str:
    try:
        found = detect(data_dir())
    except EXPECTED as exc:  # e.g. the data folder's disk cannot be measured
        return f"### This machine\n- {in_words(exc)}"
    lines = ["### This machine"]
    if found.has_gpu:
        for gpu in found.gpus:
            lines.append(f"- **GPU {gpu.index}: {gpu.name}**: {gpu.free_gb:.1f} GB free of "
                         f"{gpu.total_gb:.1f} GB; bf16 {'yes' if gpu.bf16 else 'no (fp16 compute)'}")
            held = gpu.total_gb - gpu.free_gb
            if held > 1.0:
                lines.append(f"  - {held:.1f} GB is held by other programs (a desktop, a game, "
                             "another model): free VRAM is what counts")
        if len(found.gpus) >= 2:
            lines.append("- A run trains on one GPU: the one with the most free memory (the "
                         "recommendations below are for it), or the one you pick on the Train tab; "
                         "what several GPUs give follows the recommendations")
    else:
        lines.append(f"- **No GPU: CPU mode, tiny models only** ({found.gpu_note}). Training uses "
                     "plain AdamW (paged optimizers need CUDA).")
        lines.append(f"- CPU compute: {cpu_dtype_note(found.cpu_bf16)}")
    lines.append(f"- CPU: {found.cpu_name}, {found.cpu_cores} cores; RAM {found.ram_free_gb:.1f} GB "
                 f"free of {found.ram_total_gb:.1f} GB")
    lines.append(f"- Disk: {found.disk_free_gb:.1f} GB free in {data_dir()}")
    return "\n".join(lines)


def free_vram() -> float | None:
    """Free GB on the GPU training will use (free, not total: other programs' memory is gone)."""
    return planner.detected_vram()[0]


def free_per_gpu() -> list[float]:
    """Free GB of every GPU a run may use (CUDA_VISIBLE_DEVICES narrows them)."""
    return [gpu.free_gb for gpu in hardware.visible_gpus(hardware.detect_gpus()[0])]


def ranked_models() -> tuple[float | None, list]:
    """Free VRAM and the planner's picks for it: computed once, shown as a list and as choices."""
    free = free_vram()
    return free, planner.recommend(free)


def build() -> dict:
    free, picks = ranked_models()
    choices, default = model_choices(free, picks)
    info = gr.Markdown(hardware_markdown(), elem_id="hardware-info")
    refresh = gr.Button("Refresh", size="sm")
    ranked = gr.Markdown(recommendation_markdown(free, picks, free_per_gpu()),
                         elem_id="recommendations")
    gr.Markdown("### Base model\nModels that fit this machine come first (✓), each with the longest "
                "sequence length that fits. The Train tab shows the memory plan of your settings.")
    model = gr.Dropdown(choices=choices, value=default, label="Base model", elem_id="model-choice")
    custom = gr.Textbox(label="Or a Hugging Face Hub id or a local model folder (overrides the list)",
                        placeholder="e.g. EleutherAI/gpt-j-6b or /models/my-llama", elem_id="custom-model")
    refresh.click(refreshed, model, [info, ranked, model], api_name=False)
    return {"model": model, "custom_model": custom}


def refreshed(current: str | None):
    """The machine, the recommendations and the model list read again (free memory changes as
    other programs come and go). The list's choices and value change together: the chosen model
    stays chosen, as every catalog model is listed whether it fits or not."""
    info = hardware_markdown()
    try:
        free, picks = ranked_models()
        choices, default = model_choices(free, picks)
        ranked = recommendation_markdown(free, picks, free_per_gpu())
    except EXPECTED as exc:
        return info, in_words(exc), gr.skip()
    values = [value for _, value in choices]
    return (info, ranked,
            gr.update(choices=choices, value=current if current in values else default))


def selected_model(choice: str, custom: str) -> str:
    return (custom or "").strip() or choice or "embedded"
