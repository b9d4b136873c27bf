"""What training holds in memory: the frozen embeddings and head stay in the compute dtype (the
QLoRA paper's qlora.py casts them back after peft's fp32 upcast; we never upcast them); norms and
LoRA weights are fp32."""

import torch
from peft import LoraConfig, get_peft_model

from engine.models import load_quantized_model
from engine.train import prepare_for_kbit_training


def prepared(source, dtype):
    model = load_quantized_model(str(source), "nf4", True, dtype, "cpu")
    prepare_for_kbit_training(model, gradient_checkpointing=True)
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


def test_the_embeddings_are_never_copied_to_fp32(embedded_model, monkeypatch):
    # The transient fp32 copy was the loading peak on a GPU: no cast of them may happen at all.
    model = load_quantized_model(str(embedded_model), "nf4", True, torch.bfloat16, "cpu")
    embeddings = model.get_input_embeddings().weight
    before = embeddings.data.data_ptr()
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert embeddings.data.data_ptr() == before and embeddings.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
