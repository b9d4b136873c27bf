"""The planner with `kernels: auto`: presets/kernels.yaml's pieces per device class, each piece
changing exactly its own memory term, and the `paper` recipe fitting LLaMA 33B in 24 GB."""

import re
from pathlib import Path

import pytest

from engine import planner
from engine.catalog import find
from engine.config import load_recipe
from engine.hardware import Gpu
from engine.kernel_choice import PIECES, KernelChoiceError, kernel_pieces, read_choices
from engine.planner import (CONTEXT, LOGITS, LORA, LOSS_CHUNK_TOKENS, OPTIMIZER, OUR_STACK,
                            plan, stack_for, stack_with)

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9 / 1024**3  # one decimal gigabyte in GiB
LLAMA33 = find("llama-33b")
LLAMA31 = find("llama-3.1-8b")
AUTO_CUDA = stack_for("auto", "cuda")


def paper_33b(**changes):
    """The `paper` recipe (r=64, micro-batch 1) for LLaMA 33B at 512 tokens."""
    return load_recipe("paper", model="llama-33b", data_path="x.jsonl", max_seq_len=512, **changes)


def paper_plan(cfg, vram_gb=24):
    return plan(LLAMA33, cfg.max_seq_len, cfg.micro_batch_size, cfg.lora_r, vram_gb,
                stack_for(cfg.kernels, "cuda", cfg.optimizer))


def changed_parts(stack, *shape, model=LLAMA31):
    """The parts a stack changes against OUR_STACK (kernels off) at one shape."""
    ours, other = plan(model, *shape), plan(model, *shape, stack=stack)
    assert ours.parts.keys() == other.parts.keys()
    return {part for part in ours.parts if ours.parts[part] != other.parts[part]}


def test_kernels_yaml_turns_on_every_piece_and_says_why():
    # Each device class lists its pieces with the benchmark behind each, or that it awaits one.
    # No GPU has benchmarked the pieces that put our code on the GPU path: only lora16 is on.
    assert list(kernel_pieces("cuda")) == ["lora16"]
    assert "QLoRA paper" in kernel_pieces("cuda")["lora16"]
    # No lora16 on a CPU: measured no leaner there (bench/train_step.md)
    assert list(kernel_pieces("cpu")) == [piece for piece in PIECES if piece != "lora16"]
    for why in kernel_pieces("cpu").values():  # a figure from a results file that exists
        results, case = why.split()[:2]
        assert (ROOT / results).is_file() and case.rstrip(":") in (ROOT / results).read_text()
        measured = re.findall(r"\b\d+\.\d+\b(?![x%])", why)  # the measured figures, not ratios
        assert measured and all(figure in (ROOT / results).read_text() for figure in measured), why
    with pytest.raises(KernelChoiceError, match="cuda or cpu"):
        kernel_pieces("auto")


@pytest.mark.parametrize("text, complaint", [
    ("cuda:\n  lora8: because\n", "unknown piece 'lora8'"),
    ("tpu:\n  lora16: because\n", "unknown device class 'tpu'"),
    ("cuda:\n  lora16: ''\n", "needs its reason"),
    ("cuda: [lora16\n", "could not be read"),
    ("cuda: [lora16]\n", "must map each piece"),
])
def test_a_broken_kernels_file_is_refused_in_words(tmp_path, text, complaint):
    path = tmp_path / "kernels.yaml"
    path.write_text(text)
    with pytest.raises(KernelChoiceError, match=complaint):
        read_choices(path)


def test_kernels_off_is_todays_stack_and_the_paper_recipe_needs_25_3_gb():
    assert stack_for("off", "cuda") is OUR_STACK and stack_for("off", "cpu") is OUR_STACK
    off = paper_plan(paper_33b(kernels="off"))
    assert off == plan(LLAMA33, 512, 1, 64, 24)  # callers that pass no stack get the same
    assert (off.total_gb, off.fits, off.pieces, off.paged_gb) == (25.3, False, [], 0.0)
    assert off.parts[LORA] == off.parts[OPTIMIZER] == pytest.approx(3.63, abs=0.01)
    with pytest.raises(KernelChoiceError, match="use auto or off"):
        stack_for("fast", "cuda")


def test_paper_recipe_fits_llama_33b_in_24_gb_with_kernels_auto_on_cuda():
    off, auto = paper_plan(paper_33b(kernels="off")), paper_plan(paper_33b())
    assert paper_33b().kernels == "auto"  # the default
    assert auto.fits and auto.total_gb <= 24 * planner.SAFETY
    assert auto.pieces == list(kernel_pieces("cuda"))  # what presets/kernels.yaml turns on
    # LoRA weights and gradients at 16 bits: half the fp32 bytes
    assert auto.parts[LORA] == pytest.approx(off.parts[LORA] / 2, abs=0.001)
    assert auto.held_as[LORA] == "16-bit weights and gradients"
    assert off.held_as[LORA] == "32-bit weights and gradients"
    # the 32-bit AdamW state is paged: reported as what may spill to CPU RAM, not in the total
    assert auto.parts[OPTIMIZER] == 0 and auto.paged_gb == off.parts[OPTIMIZER]
    assert "paged: 3.63 GB may spill to CPU RAM" in auto.held_as[OPTIMIZER]
    assert "counted in GPU memory" in off.held_as[OPTIMIZER]
    # a run that picks a non-paged optimizer holds that state in VRAM: it counts again
    resident = paper_plan(paper_33b(optimizer="adamw_torch"))
    assert resident.parts[OPTIMIZER] == off.parts[OPTIMIZER] and resident.paged_gb == 0


def test_the_pre_flight_check_plans_the_runs_kernels():
    # Start and `train` share config_refusal: it refuses `off` and lets `auto` start on 24 GB.
    refusal = planner.config_refusal(paper_33b(kernels="off"), vram_gb=24)
    assert "needs about 25.3 GB" in refusal
    assert planner.config_refusal(paper_33b(), vram_gb=24) is None


def test_qlora_paper_points_with_kernels_auto_on_cuda():
    # The paper (batch 1 x 512, r=64): 33B in about 21 GB, 65B under 48 GB. 15%: the paper's
    # figures are rounded and do not say what they count (GB as 1e9 or 2^30 bytes).
    llama33 = plan(LLAMA33, 512, 1, 64, stack=AUTO_CUDA).total_gb
    assert llama33 == pytest.approx(21 * GB, rel=0.15) and llama33 == pytest.approx(21, rel=0.15)
    assert plan(find("llama-65b"), 512, 1, 64, stack=AUTO_CUDA).total_gb < 48 * GB


def test_chunked_loss_changes_only_the_loss_term():
    # At 4096 tokens the loss peak covers one chunk of 1024 tokens: a quarter of the whole.
    chunked = stack_with(["chunked_loss"])
    assert changed_parts(chunked, 4096, 1, 16) == {LOGITS}
    ours, other = plan(LLAMA31, 4096, 1, 16), plan(LLAMA31, 4096, 1, 16, stack=chunked)
    assert other.parts[LOGITS] == pytest.approx(ours.parts[LOGITS] * LOSS_CHUNK_TOKENS / 4096,
                                                abs=0.001)
    assert other.held_as[LOGITS] == "the loss in chunks of 1024 tokens"
    assert changed_parts(chunked, 512, 2, 16) == set()  # 1024 tokens: one chunk is the whole


def test_lora16_halves_lora_and_pages_the_optimizer_state_on_cuda_only():
    assert changed_parts(stack_with(["lora16"], "cuda"), 1024, 1, 64) == {LORA, OPTIMIZER}
    # on a CPU nothing to page; with AdamW (torch), which would keep 16-bit moments, no lora16
    assert changed_parts(stack_with(["lora16"], "cpu"), 1024, 1, 64) == {LORA}
    assert changed_parts(stack_with(["lora16"], "cpu", "adamw_torch"), 1024, 1, 64) == set()
    assert changed_parts(stack_with(["lora16"], "cuda", "adamw_torch"), 1024, 1, 64) == set()
    ours = plan(LLAMA31, 1024, 1, 64)
    half = plan(LLAMA31, 1024, 1, 64, stack=stack_with(["lora16"]))
    assert half.parts[LORA] == pytest.approx(ours.parts[LORA] / 2, abs=0.001)
    assert half.paged_gb == ours.parts[OPTIMIZER]


def test_lora4bit_keeps_one_dequantisation_buffer_per_weight_shape_on_cuda():
    # bitsandbytes dequantises the largest weight afresh for each matmul; lora4bit keeps one
    # 16-bit buffer per distinct weight shape of a block (LLaMA 33B: q/k/v/o 6656 x 6656, gate
    # and up 17920 x 6656, down 6656 x 17920), shared by all 60 layers.
    assert changed_parts(stack_with(["lora4bit"], "cuda"), 512, 1, 64, model=LLAMA33) == {CONTEXT}
    fused = plan(LLAMA33, stack=stack_with(["lora4bit"], "cuda"))
    buffers = 2 * (6656 * 6656 + 2 * 17920 * 6656) / 1024**3
    assert fused.parts[CONTEXT] == pytest.approx(planner.CUDA_CONTEXT_GB + buffers, abs=0.001)
    assert "one kept buffer per weight shape" in fused.held_as[CONTEXT]
    # on the CPU bitsandbytes has no in-place dequantisation, so lora4bit dequantises afresh too
    assert changed_parts(stack_with(["lora4bit"], "cpu"), 512, 1, 64) == set()


def test_padding_free_changes_no_term():
    # The plan is for full-length rows, the worst case a batch can reach: no pad tokens to drop.
    for shape in [(512, 1, 16), (4096, 4, 64)]:
        assert changed_parts(stack_with(["padding_free"]), *shape) == set()


def test_the_planners_loss_chunk_is_the_chunked_losss_own():
    import inspect

    from kernels.chunked_loss import chunked_cross_entropy

    default = inspect.signature(chunked_cross_entropy).parameters["chunk_tokens"].default
    assert LOSS_CHUNK_TOKENS == default


def test_cli_plan_names_the_pieces_it_assumed(capsys):
    from engine.cli import main

    args = ["plan", "--model", "llama-33b", "--vram-gb", "24", "--max-seq-len", "512",
            "--lora-r", "64", "--micro-batch", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"kernels auto: {', '.join(kernel_pieces('cuda'))}" in out
    assert "16-bit weights and gradients" in out and "may spill to CPU RAM" in out
    assert "fits in 24 GB" in out
    assert main(args + ["--kernels", "off"]) == 0
    out = capsys.readouterr().out
    assert "kernels off: the reference QLoRA stack" in out and "25.30 GB" in out
    assert "does NOT fit" in out


def test_the_train_tab_and_the_oom_message_plan_the_runs_kernels(monkeypatch):
    from app.train_tab import memory_bar
    from engine.faults import model_too_big_message

    card = Gpu(index=0, name="NVIDIA GeForce RTX 4090", total_gb=24.0, free_gb=24.0,
               compute_capability="8.9", bf16=True)
    monkeypatch.setattr("engine.hardware.detect_gpus", lambda: ([card], ""))
    bar = memory_bar("llama-33b", "", 512, 1, 64, kernels="auto")
    assert "19.9 GB of 24.0 GB free" in bar and ": fits" in bar
    assert "does not fit" in memory_bar("llama-33b", "", 512, 1, 64, kernels="off")
    assert "about 19.9 GB" in model_too_big_message(paper_33b())
    assert "about 25.3 GB" in model_too_big_message(paper_33b(kernels="off"))
