"""16-bit LoRA storage (the `lora16` piece): LoRA weights and gradients in the compute dtype, as the
QLoRA paper's qlora.py keeps them, with the optimizer's state in 32 bits (bitsandbytes' AdamW, as
the paper's paged_adamw_32bit; on a CPU bitsandbytes runs it unpaged). It must learn as the fp32
LoRA weights learn, and it goes only with an optimizer whose state stays 32-bit."""

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine.kernel_choice import keeps_32bit_state, optimizer_for
from engine.kernel_path import KernelPlan, apply_to_model, plan_for
from test_kernels_lora import load_4bit, save_llama


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Wide enough (256) that LoRA A's values (about 1/16) are not all far above bf16's step."""
    return save_llama(tmp_path_factory.mktemp("small-llama"), hidden=256, intermediate=512,
                      vocab=256)


def train(folder, lora16: bool, steps: int = 40) -> tuple[list[float], torch.nn.Module, object]:
    """The paper's step on a 4-bit model: AdamW 32-bit, lr 2e-4, gradients clipped at 0.3, bf16
    autocast; the same 8 rows every step (memorising them: the loss must fall)."""
    model = load_4bit(folder, torch.bfloat16, gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    plan = KernelPlan({"lora16": "test"} if lora16 else {})
    apply_to_model(plan, model, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW(params, lr=2e-4, optim_bits=32)
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model, optimizer


def test_16_bit_lora_with_32_bit_state_learns_as_fp32_lora(small_llama):
    full, _, _ = train(small_llama, lora16=False)
    half, model, optimizer = train(small_llama, lora16=True)
    weight = next(p for p in model.parameters() if p.requires_grad)
    assert weight.dtype == torch.bfloat16 and weight.grad is None  # zeroed to None
    assert optimizer.state[weight]["state1"].dtype == torch.float32  # the moments stay 32-bit
    drop = full[0] - full[-1]
    print(f"fp32 LoRA {full[0]:.4f} -> {full[-1]:.4f}, 16-bit LoRA {half[0]:.4f} -> {half[-1]:.4f}")
    assert drop > 0.3  # it learns at all (about 0.5 in 40 steps)
    assert abs(half[-1] - full[-1]) < 0.05 * drop  # and as far as fp32 LoRA does


def test_16_bit_lora_goes_only_with_an_optimizer_keeping_32_bit_state():
    assert optimizer_for("auto", "cuda") == "paged_adamw_32bit"
    assert optimizer_for("auto", "cpu") == "adamw_torch"  # the reference stack's, on a CPU
    assert optimizer_for("auto", "cpu", lora16=True) == "paged_adamw_32bit"  # run unpaged there
    assert optimizer_for("adamw_8bit", "cpu", lora16=True) == "adamw_8bit"
    for name in ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit", "lion_32bit"):
        assert keeps_32bit_state(name), name
    for name in ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor"):
        assert not keeps_32bit_state(name), name
    assert "lora16" in plan_for("auto", "cuda", optimizer="paged_adamw_32bit").wanted
    assert "lora16" in plan_for("auto", "cuda", optimizer="auto").wanted
    plan = plan_for("auto", "cuda", optimizer="adamw_torch")
    assert "lora16" not in plan.wanted
    assert "adamw_torch" in plan.off["lora16"] and "lora16 off" in plan.summary()
