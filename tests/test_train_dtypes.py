"""What training holds in memory: the frozen embeddings and head go back to the compute dtype
after peft's fp32 upcast (as the paper's qlora.py does); norms and LoRA weights stay fp32."""

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from engine.models import load_quantized_model
from engine.train import _frozen_embeddings_to


def prepared(source, dtype):
    model = load_quantized_model(str(source), "nf4", True, dtype, "cpu")
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    _frozen_embeddings_to(model, dtype)
    return get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def test_embeddings_and_head_are_16_bit_norms_and_lora_fp32(embedded_model):
    model = prepared(embedded_model, torch.bfloat16)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [p for name, p in base.named_parameters() if "norm" in name]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert not base.get_input_embeddings().weight.requires_grad
    # and it still trains: a loss and gradients on the adapters
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in lora)


def test_fp32_compute_keeps_fp32(embedded_model):
    model = prepared(embedded_model, torch.float32)
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.float32
