"""Measure our engine's real peak GPU memory and print it next to the planner's estimate.

    python bench/memory_peak.py                 # the default points (needs a CUDA GPU, ~15 min)
    python bench/memory_peak.py --quick         # the small models only (~3 min)
    python bench/memory_peak.py --point llama-3.1-8b:2048:1:32 --json out.json

Each point (catalog id : max_seq_len : micro-batch : LoRA r) runs in its own process, so one
point's CUDA context and cached blocks cannot leak into the next. The model has the catalog's
real shapes and random weights (no Hub needed): its config is saved to a temporary folder with
random bf16 weights, then loaded through engine.models.load_quantized_model and prepared exactly as
engine/train.py does (peft's prepare_model_for_kbit_training, LoRA on all linear layers, gradient
checkpointing without reentrancy, bf16 autocast, paged AdamW 32-bit). A few optimizer steps on
random token ids of full length follow; we report torch.cuda.max_memory_allocated / reserved and
the device memory NVML sees in use (which includes the CUDA context and paged optimizer state).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1024**3
DEFAULT_POINTS = [
    "smollm2-1.7b:512:1:16", "smollm2-1.7b:2048:2:16", "qwen2.5-1.5b:1024:1:64",
    "llama-3.2-3b:2048:1:16", "gemma-2-2b:1024:1:16", "gpt-j-6b:1024:1:16",
    "mistral-7b:1024:1:16", "llama-3.1-8b:512:1:32", "llama-3.1-8b:2048:1:32",
]
QUICK_POINTS = DEFAULT_POINTS[:4]
HF_CONFIG_KEYS = {  # our catalog field -> config.json key, per family
    "gptj": {"layers": "n_layer", "hidden": "n_embd", "intermediate": "n_inner", "heads": "n_head",
             "max_context": "n_positions"},
    "gpt_neox": {"layers": "num_hidden_layers", "hidden": "hidden_size",
                 "intermediate": "intermediate_size", "heads": "num_attention_heads",
                 "max_context": "max_position_embeddings"},
}
LLAMA_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
              "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
              "max_context": "max_position_embeddings"}


def hf_config(model_id: str):
    """A transformers config with the catalog entry's exact shapes."""
    from transformers import AutoConfig

    from engine.catalog import find

    entry = find(model_id)
    keys = HF_CONFIG_KEYS.get(entry.arch, LLAMA_KEYS)
    values = {key: getattr(entry, field) for field, key in keys.items()}
    values.update(vocab_size=entry.vocab, tie_word_embeddings=entry.tied)
    if entry.head_dim:
        values["head_dim"] = entry.head_dim
    if entry.arch == "gptj":
        values["rotary_dim"] = 64
    return AutoConfig.for_model(entry.arch, **values)


def save_random_model(model_id: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(model_id), dtype=torch.bfloat16)
    model.save_pretrained(folder)


def measure(point: str) -> dict:
    import pynvml
    import torch
    from bitsandbytes.optim import PagedAdamW32bit
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from engine.catalog import find
    from engine.models import load_quantized_model
    from engine.planner import plan
    from engine.train import _frozen_embeddings_to

    model_id, length, batch, rank = point.split(":")
    length, batch, rank = int(length), int(batch), int(rank)
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    used_before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    with tempfile.TemporaryDirectory() as folder:
        save_random_model(model_id, Path(folder))
        model = load_quantized_model(folder, "nf4", True, torch.bfloat16, "cuda")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    _frozen_embeddings_to(model, torch.bfloat16)  # as engine/train.py does after peft's upcast
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    peak_used = 0
    for _ in range(3):
        ids = torch.randint(0, find(model_id).vocab, (batch, length), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak_used = max(peak_used, pynvml.nvmlDeviceGetMemoryInfo(handle).used - used_before)
    estimate = plan(find(model_id), length, batch, rank)
    return {"point": point, "estimate_total_gb": estimate.total_gb, "estimate_torch_gb": estimate.torch_gb,
            "allocated_gb": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "reserved_gb": round(torch.cuda.max_memory_reserved() / GIB, 2),
            "nvml_used_gb": round(peak_used / GIB, 2), "breakdown": estimate.parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", action="append", help="model:max_seq_len:micro_batch:lora_r")
    parser.add_argument("--quick", action="store_true", help="small models only")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("memory_peak: PyTorch is not installed; run it in the project's virtual environment")
        return 2
    if not torch.cuda.is_available():
        print("memory_peak: no CUDA GPU here, so nothing can be measured. Run this on a machine with an "
              "NVIDIA GPU (see bench/memory.md); the planner's estimates alone: python -m engine plan")
        return 2
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    results = []
    print(f"{'point':<28} {'estimate':>8} {'est.torch':>9} {'allocated':>9} {'reserved':>8} "
          f"{'nvml':>6} {'error':>6}")
    for point in args.point or (QUICK_POINTS if args.quick else DEFAULT_POINTS):
        out = subprocess.run([sys.executable, __file__, "--child", point], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{point:<28} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        error = row["estimate_torch_gb"] / row["reserved_gb"] - 1
        row["torch_error"] = round(error, 3)
        results.append(row)
        print(f"{point:<28} {row['estimate_total_gb']:8.2f} {row['estimate_torch_gb']:9.2f} "
              f"{row['allocated_gb']:9.2f} {row['reserved_gb']:8.2f} {row['nvml_used_gb']:6.2f} {error:+6.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
