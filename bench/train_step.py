"""Our training path (`kernels: auto`) against the reference QLoRA stack, step by step.

    .venv/bin/python bench/train_step.py [--case embedded-512] [--steps 12] [--out bench/train_step.md]

The reference is bench/reference.py: transformers' Trainer + peft + bitsandbytes, NF4 with double
quantization, LoRA r=64 on all linear layers, gradient checkpointing, padded batches; paged AdamW
on a GPU, AdamW (torch) on a CPU. Ours is engine.train.run_training, a real run of the engine, with
the same model, rows, seed, micro-batch and learning rate, once with `kernels: auto` and once with
`kernels: off` (which must be the reference's numbers: its loss difference is the noise floor).
Every stack runs in its own process, one after the other, so the peak memory is its own and the
stacks never share the cores.

Our fused layer draws its own dropout masks (kernels/lora4bit.dropout_mask), not peft's, so with
--dropout-noise a fourth run repeats `auto` with other masks: the loss difference they make alone
is the noise floor ours is held to.

tokens/s counts the tokens a step learns from (padding excluded, for both stacks), median over
the steps after the first. Peak memory: the process's peak RSS on a CPU, torch's peak allocated
memory on a GPU. It prints one JSON line per case and, with --out, writes Markdown beside it.

The rows are chat-format conversations with lengths spread between an eighth of the case's
sequence length and all of it, as a real dataset's are; their text is invented (word salad from a
fixed vocabulary, seeded), which is what a timing needs and keeps the benchmark offline.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

# name: (model, sequence length, micro-batch, rows' shortest share of the length)
CASES = {
    "embedded-256": ("embedded", 256, 4, 1 / 8),  # the quick-test recipe's length
    "embedded-512": ("embedded", 512, 4, 1 / 8),
    "llama-0.5b-2048": ("random-llama-0.5b", 2048, 2, 1 / 8),
    "llama-8b-512": ("random-llama-8b", 512, 4, 1 / 8),
    "llama-8b-2048": ("random-llama-8b", 2048, 2, 1 / 8),
    "llama-8b-8192": ("random-llama-8b", 8192, 1, 1 / 8),
}
# Random-weight shapes: a ~0.5B llama with Llama 3's 128k vocabulary, and Llama-3.1-8B itself.
SHAPES = {
    "random-llama-0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                              num_attention_heads=16, num_key_value_heads=4, vocab_size=128256,
                              tie_word_embeddings=True),
    "random-llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            rope_theta=500000.0, tie_word_embeddings=False),
}
# Dense bf16 tensor-core peaks of data-centre cards (NVIDIA's datasheets), which the consumer
# table presets/gpus.yaml does not list; the most specific name first.
DATACENTER_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                     "L40S": 362.0, "L4": 121.0}
WORDS = ("the a of to and in is was for on that with as by at from river capital ship garden "
         "invented called measured light north harbour season tower bridge letter music number "
         "answer question story winter silver heron city map quiet bright").split()


def write_rows(path: Path, tokenizer, rows: int, max_len: int, shortest: float, seed: int) -> Path:
    """`rows` conversations whose token counts are spread evenly over [shortest, 0.95] x max_len."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            target = int(max_len * rng.uniform(shortest, 0.95))
            words = [rng.choice(WORDS) for _ in range(target)]
            while len(tokenizer(" ".join(words))["input_ids"]) > target - 24:  # the template's share
                words = words[: int(len(words) * 0.9)]
            question, answer = " ".join(words[:8]) + "?", " ".join(words[8:]) + "."
            fh.write(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return path


def model_source(name: str, cache: Path, layers: int | None = None) -> str:
    """The embedded model's folder, or a random-weight model of a SHAPES shape saved once in cache
    (with `layers` decoder layers instead of the shape's, where given: per-layer speed is the
    same, and a GPU check must stay within minutes)."""
    from engine.models import ensure_embedded

    if name == "embedded":
        return str(ensure_embedded())
    shape = dict(SHAPES[name], **({"num_hidden_layers": layers} if layers else {}))
    folder = cache / f"{name}-{shape['num_hidden_layers']}-layers"
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**shape, max_position_embeddings=8192, torch_dtype="bfloat16")
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(ensure_embedded())).save_pretrained(folder)
    return str(folder)


def run_ours(source: str, data: Path, work: Path, seq: int, micro: int, steps: int,
             kernels: str, dtype_name: str) -> dict:
    """kernels: "off", "auto", or "auto:piece+piece" (those pieces alone, for an ablation)."""
    from engine import kernel_path
    from engine.config import load_recipe
    from engine.runner import create_run
    from engine.train import run_training
    from reference import median  # the reference stack's measure, so both read alike

    if kernels == "dropout-noise":
        # `auto` with each dropout mask shifted by one element: the same rate and model, other
        # elements dropped. Its loss difference to `auto` is what other masks alone change, the
        # noise floor for ours, whose masks are not peft's (kernels/lora4bit.dropout_mask).
        from kernels import lora4bit

        draw = lora4bit.dropout_mask

        def shifted_masks(shape, p, device):
            keep, scale = draw(shape, p, device)
            return keep.roll(1, -1), scale

        lora4bit.dropout_mask = shifted_masks
        kernels = "auto"
    if ":" in kernels:
        kernels, pieces = kernels.split(":")
        kernel_path.kernel_pieces = lambda device_class: dict.fromkeys(pieces.split("+"), "ablation")

    cfg = load_recipe("paper", model=source, data_path=str(data), max_steps=steps,
                      micro_batch_size=micro, grad_accum_steps=1, max_seq_len=seq,
                      group_by_length=False, save_steps=100_000, warmup_ratio=0.0,
                      eval_share=0.0, kernels=kernels,
                      compute_dtype={"bfloat16": "bf16", "float32": "fp32"}[dtype_name])
    run = create_run(cfg, name="bench", parent=work)
    assert run_training(str(run.path)) == "finished", run.read_status()
    metrics = [m for m in run.read_metrics() if m.get("loss") is not None]
    status = run.read_status()
    return {"losses": [m["loss"] for m in metrics],
            "tokens_per_s": median([m.get("tokens_per_s") for m in metrics[1:]]),
            "compute_dtype": status.get("compute_dtype"), "kernels": status.get("kernels", "")}


def run_reference(source: str, data: Path, work: Path, seq: int, micro: int, steps: int,
                  dtype_name: str) -> dict:
    import torch

    from engine.config import load_recipe
    from engine.data import load_conversations
    from engine.models import load_tokenizer
    from engine.templates import encode, get_template
    from reference import train_reference

    cfg = load_recipe("paper", max_seq_len=seq)
    tokenizer = load_tokenizer(source)
    template = get_template(cfg.template, tokenizer)
    rows = [encode(tokenizer, template, row.messages, seq)
            for row in load_conversations(str(data)).rows]
    for row in rows:
        row.pop("length")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = train_reference(source, rows, tokenizer, device=device,
                             dtype=getattr(torch, dtype_name), micro_batch=micro, steps=steps,
                             out_dir=work / "reference", lora_r=cfg.lora_r, seed=cfg.seed)
    return {"losses": result["losses"], "tokens_per_s": result["tokens_per_s"],
            "compute_dtype": dtype_name}


def child(args) -> None:
    import torch

    from engine.models import load_tokenizer

    model, seq, micro, shortest = CASES[args.case]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = model_source(model, args.cache, args.layers)
        data = write_rows(work / "rows.jsonl", load_tokenizer(source), args.steps * micro, seq,
                          shortest, seed=0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if args.stack == "reference":
            result = run_reference(source, data, work, seq, micro, args.steps, args.dtype)
        else:
            result = run_ours(source, data, work, seq, micro, args.steps, args.stack, args.dtype)
    result["params"] = _parameters(source)
    result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available()
                              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
    print("RESULT " + json.dumps(result), flush=True)


def measure(case: str, steps: int, cache: Path, stacks=("reference", "off", "auto"),
            dtype: str = "bfloat16", layers: int | None = None, timeout_s: float | None = None) -> dict:
    """The stacks' results side by side; ablation stacks ("auto:piece+piece") are reported too."""
    results = {}
    for stack in stacks:
        out = subprocess.run([sys.executable, __file__, "--child", stack, "--case", case,
                              "--steps", str(steps), "--cache", str(cache), "--dtype", dtype,
                              *(["--layers", str(layers)] if layers else [])],
                             capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{case} / {stack} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        results[stack] = json.loads(line[len("RESULT "):])
    ref, auto = results["reference"], results["auto"]
    summary = {
        "case": case, "steps": steps, "dtype": dtype,
        "ours_tokens_per_s": auto["tokens_per_s"], "reference_tokens_per_s": ref["tokens_per_s"],
        "speedup": round(auto["tokens_per_s"] / ref["tokens_per_s"], 2),
        "ours_peak_gb": auto["peak_gb"], "reference_peak_gb": ref["peak_gb"],
        "peak_saving": round(1 - auto["peak_gb"] / ref["peak_gb"], 3),
        "max_loss_diff": _max_diff(auto["losses"], ref["losses"]),
        "kernels": auto.get("kernels"),
        "ours_bf16_peak_fraction": bf16_peak_fraction(auto["tokens_per_s"], auto["params"]),
        "reference_bf16_peak_fraction": bf16_peak_fraction(ref["tokens_per_s"], ref["params"]),
    }
    if "off" in results:
        off = results["off"]
        summary.update(off_tokens_per_s=off["tokens_per_s"], off_peak_gb=off["peak_gb"],
                       off_max_loss_diff=_max_diff(off["losses"], ref["losses"]))
    if "dropout-noise" in results:
        summary["dropout_noise_max_loss_diff"] = _max_diff(results["dropout-noise"]["losses"],
                                                           auto["losses"])
    for stack in [s for s in results if s.startswith("auto:")]:
        r = results[stack]
        summary.setdefault("ablation", {})[stack[5:]] = {
            "tokens_per_s": r["tokens_per_s"], "peak_gb": r["peak_gb"],
            "max_loss_diff": _max_diff(r["losses"], ref["losses"])}
    summary["losses"] = {stack: [round(x, 4) for x in r["losses"]] for stack, r in results.items()}
    return summary


def _parameters(source: str) -> int:
    """The model's parameters (embeddings excluded: their lookup costs no matmul), from config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(source)
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # + the output head


def bf16_peak_fraction(tokens_per_s: float, params: int) -> float | None:
    """The share of this GPU's dense bf16 peak the tokens/s reach, at 6 x parameters FLOPs per
    token (forward 2, backward 4; the recompute of checkpointing is not counted as useful work)."""
    import torch

    from engine.speed import find_gpu

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = getattr(find_gpu(name), "tflops_16bit", None) or next(
        (tflops for card, tflops in DATACENTER_TFLOPS.items() if card in name), None)
    return round(6 * params * tokens_per_s / (peak * 1e12), 3) if peak else None


def _max_diff(a: list, b: list) -> float | None:
    pairs = list(zip(a, b))
    return round(max(abs(x - y) for x, y in pairs), 4) if pairs else None


def machine() -> str:
    import torch

    from engine.hardware import _cpu_name, cpu_bf16_native

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{_cpu_name()} ({platform.machine()}), {__import__('os').cpu_count()} cores, no GPU, "
            f"native bf16: {cpu_bf16_native()}, torch {torch.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES),
                        help="repeatable; default: the CPU cases (embedded-512, llama-0.5b-2048)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--no-off", action="store_true", help="skip the kernels: off run")
    parser.add_argument("--layers", type=int, help="cut the random shapes to this many layers")
    parser.add_argument("--dropout-noise", action="store_true",
                        help="also run `auto` with other dropout masks: the noise they make alone")
    parser.add_argument("--ablation", action="append", default=[], metavar="PIECE+PIECE",
                        help="also run `auto` with only these pieces (repeatable), e.g. lora16")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qls-bench-models")
    parser.add_argument("--out", type=Path, help="append the results as Markdown here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the compute dtype of every stack (the paper's is bf16)")
    args = parser.parse_args()
    if args.child:
        args.stack, args.case = args.child, args.case[0]
        child(args)
        return 0
    stacks = (("reference", "auto") if args.no_off else ("reference", "off", "auto")) \
        + (("dropout-noise",) if args.dropout_noise else ()) \
        + tuple(f"auto:{pieces}" for pieces in args.ablation)
    for case in args.case or ["embedded-512", "llama-0.5b-2048"]:
        started = time.time()
        summary = measure(case, args.steps, args.cache, stacks, args.dtype, args.layers)
        summary["wall_s"] = round(time.time() - started)
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(report(summary, args))
    return 0


def report(s: dict, args) -> str:
    cases = " ".join([*(f"--case {c}" for c in (args.case or [])),
                      *(f"--ablation {a}" for a in args.ablation), *(["--no-off"] if args.no_off else []),
                      *(["--dropout-noise"] if args.dropout_noise else []),
                      *([f"--dtype {args.dtype}"] if args.dtype != "bfloat16" else [])])
    lines = [f"## {s['case']} ({time.strftime('%Y-%m-%d')})", "",
             f"- machine: {machine()}",
             f"- command: `.venv/bin/python bench/train_step.py {cases} --steps {args.steps}`",
             f"- ours (`kernels: auto`) turned on: {s.get('kernels') or 'nothing'}", "",
             "| stack | tokens/s | peak GB | max loss diff vs reference |", "| --- | --- | --- | --- |",
             f"| reference | {s['reference_tokens_per_s']} | {s['reference_peak_gb']} | - |"]
    if "off_tokens_per_s" in s:
        lines.append(f"| ours, kernels off | {s['off_tokens_per_s']} | {s['off_peak_gb']} | "
                     f"{s['off_max_loss_diff']} |")
    lines += [f"| ours, kernels auto | {s['ours_tokens_per_s']} | {s['ours_peak_gb']} | "
              f"{s['max_loss_diff']} |"]
    if "dropout_noise_max_loss_diff" in s:
        lines.append(f"| ours, kernels auto, other dropout masks | - | - | "
                     f"{s['dropout_noise_max_loss_diff']} (vs auto) |")
    lines += [f"| ours, only {pieces} | {r['tokens_per_s']} | {r['peak_gb']} | {r['max_loss_diff']} |"
              for pieces, r in s.get("ablation", {}).items()]
    lines += ["",
              f"speed-up {s['speedup']}x, peak memory {s['peak_saving']:.0%} lower", "",
              "```json", json.dumps(s), "```", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
