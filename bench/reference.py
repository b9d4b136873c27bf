"""The reference QLoRA stack our engine is measured against, in one place for every benchmark.

It is the recipe as transformers' and peft's docs give it, with the QLoRA paper's defaults: a
4-bit NF4 model with double quantization (bitsandbytes), peft's prepare_model_for_kbit_training
(its fp32 embeddings and head stay fp32), LoRA on all linear layers (alpha 16, dropout 0.1),
transformers' Trainer with lr 2e-4 constant, max grad norm 0.3 and gradient checkpointing. Paged
AdamW 32-bit on a GPU; on a CPU there is nothing to page to, so AdamW (torch).
"""

from __future__ import annotations

import time
from pathlib import Path


def train_reference(source: str, rows: list[dict], tokenizer, *, device: str, dtype,
                    micro_batch: int, steps: int, out_dir: Path, lora_r: int = 64,
                    optim: str | None = None, seed: int = 42) -> dict:
    """Train `steps` steps on tokenised rows (input_ids, labels); the losses and the median
    tokens/s after the first (warm-up) step, measured as engine/callback.py measures ours."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainerCallback, TrainingArguments)

    from engine.templates import IGNORE_INDEX

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization,
                                                 dtype=dtype, device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.1,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=2e-4,
        lr_scheduler_type="constant", max_grad_norm=0.3,
        optim=optim or ("paged_adamw_32bit" if device == "cuda" else "adamw_torch"),
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", use_cpu=device == "cpu", seed=seed, report_to="none",
        disable_tqdm=True, include_num_input_tokens_seen="non_padding",
    )
    rates, losses, last = [], [], [time.time(), 0]

    class Rate(TrainerCallback):  # the same measure as engine/callback.py's tokens_per_s
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                now = time.time()
                rates.append((state.num_input_tokens_seen - last[1]) / max(now - last[0], 1e-6))
                losses.append(logs["loss"])
                last[:] = [now, state.num_input_tokens_seen]

    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                           label_pad_token_id=IGNORE_INDEX),
                      callbacks=[Rate()])
    trainer.train()
    return {"losses": losses, "tokens_per_s": median(rates[1:])}


def median(values: list[float | None]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return round(values[len(values) // 2], 1) if values else None
