"""Our kernels (kernels/) in a run: the pieces `kernels: auto` turns on for this kind of device
(presets/kernels.yaml, read by kernel_choice), put into the model and the batches. `kernels: off`
leaves the reference QLoRA stack untouched.

Each piece is an opt-in the run can do without: where one cannot apply (an architecture it does not
know, a 32-bit compute dtype for 16-bit LoRA, FSDP's flattened weights), the run goes on with the
reference's code for that part, and the reason goes into train.log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kernel_choice import allows_lora16, kernel_pieces
from engine.templates import IGNORE_INDEX


@dataclass
class KernelPlan:
    """The pieces a run asked for (piece -> why), those it got (piece -> how, "" if plainly),
    and why others stayed off (piece -> why not)."""

    wanted: dict[str, str]
    on: dict[str, str] = field(default_factory=dict)
    off: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for train.log and the status: what is on, and why anything is not."""
        if not self.wanted and not self.off:
            return "kernels off: the reference QLoRA stack"
        text = "kernels: " + (", ".join(f"{piece} ({how})" if how else piece
                                         for piece, how in self.on.items()) or "none applied")
        if self.off:
            text += " (" + "; ".join(f"{piece} off: {why}" for piece, why in self.off.items()) + ")"
        return text


def plan_for(kernels: str, device: str, strategy: str = "ddp",
             optimizer: str = "auto") -> KernelPlan:
    """The pieces a run with this `kernels` setting asks for on this device, with this optimizer
    setting (`auto` picks one that suits the pieces: kernel_choice.optimizer_for)."""
    if kernels == "off":
        return KernelPlan({})
    plan = KernelPlan(kernel_pieces("cuda" if device == "cuda" else "cpu"))
    if "lora16" in plan.wanted and not allows_lora16(optimizer):
        del plan.wanted["lora16"]
        plan.off["lora16"] = (f"{optimizer} keeps its state in the weights' dtype; 16-bit LoRA "
                              "weights need a bitsandbytes optimizer's 32-bit state")
    if strategy == "fsdp":
        # FSDP flattens the 4-bit weights and the LoRA weights into shards it gathers itself;
        # our patches read a layer's own weights, so under FSDP the reference code runs.
        for piece in list(plan.wanted):
            plan.off[piece] = "not with FSDP's sharded weights"
        plan.wanted = {}
    return plan


def apply_to_model(plan: KernelPlan, model, dtype) -> None:
    """Put the pieces of `plan` into a peft model (after get_peft_model); padding-free batches
    are decided here too, by the model's architecture and attention."""
    import torch

    if "lora16" in plan.wanted:
        if dtype in (torch.bfloat16, torch.float16):
            # As the QLoRA paper's qlora.py does: LoRA weights (and so their gradients) in the
            # compute dtype; the optimizer keeps its state in 32 bits.
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(dtype)
            plan.on["lora16"] = ""
        else:
            plan.off["lora16"] = f"the compute dtype is {str(dtype).removeprefix('torch.')}"
    if "lora4bit" in plan.wanted:
        from kernels.lora4bit import patch_lora_layers

        layers = patch_lora_layers(model)
        if layers:
            plan.on["lora4bit"] = f"{layers} layers"
        else:
            plan.off["lora4bit"] = "no 4-bit LoRA layer it can fuse"
    if "chunked_loss" in plan.wanted:
        from kernels.chunked_loss import patch_causal_lm

        if patch_causal_lm(model):
            plan.on["chunked_loss"] = ""
        else:
            plan.off["chunked_loss"] = f"not written for the {model.config.model_type} architecture"
    if "padding_free" in plan.wanted:
        from kernels.padding_free import supports_padding_free, use_row_attention

        supported, why = supports_padding_free(model)
        if not supported:
            plan.off["padding_free"] = why
        else:
            plan.on["padding_free"] = "attention row by row" if use_row_attention(model) else ""


def collator(plan: KernelPlan, tokenizer):
    """(the data collator, TrainingArguments' include_num_input_tokens_seen) for the batches."""
    from transformers import DataCollatorForSeq2Seq

    if "padding_free" in plan.on:
        from kernels.padding_free import TOKENS_SEEN, padding_free_collator

        return padding_free_collator(IGNORE_INDEX), TOKENS_SEEN
    return (DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
            "non_padding")
