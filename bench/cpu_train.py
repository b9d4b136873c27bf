"""Our training engine against the reference QLoRA stack, same model, data and settings, on the CPU.

    .venv/bin/python bench/cpu_train.py [--steps 30] [--out bench/cpu_train.md]

The reference is the QLoRA recipe as transformers' and peft's docs give it: a 4-bit NF4 model with
double quantization (bitsandbytes), peft's prepare_model_for_kbit_training, LoRA on all linear
layers with the paper's r=64, alpha=16, dropout 0.1, transformers' Trainer with lr 2e-4 constant,
max grad norm 0.3, gradient checkpointing, bf16. Ours is `engine.train.run_training` with the
`paper` recipe (which differs only where engine/train.py says why), and its compute dtype chosen
for this CPU (engine.models.compute_dtype: fp32 where bf16 is not native or measures slower). Each stack runs in its own
process, so peak RSS is its own. Both see the same tokenised rows (tests/facts.py, guanaco format).
On a CPU the paged optimizer does not exist: both use AdamW (torch).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]


def common_config(data: Path, steps: int, compute_dtype: str = "auto"):
    from engine.config import load_recipe

    # micro-batch 4 x 1 keeps a CPU step short; the schedule is otherwise the paper's.
    return load_recipe("paper", model="embedded", data_path=str(data), max_steps=steps,
                       micro_batch_size=4, grad_accum_steps=1, max_seq_len=256,
                       group_by_length=False, save_steps=10_000, warmup_ratio=0.0,
                       compute_dtype=compute_dtype)


def run_ours(data: Path, steps: int, work: Path, compute_dtype: str = "auto") -> dict:
    from engine.runner import create_run
    from engine.train import run_training
    from reference import median

    run = create_run(common_config(data, steps, compute_dtype), name="bench", parent=work)
    started = time.time()
    assert run_training(str(run.path)) == "finished", run.read_status()
    losses = [m for m in run.read_metrics() if m.get("loss") is not None]
    return {"seconds": time.time() - started, "final_loss": losses[-1]["loss"],
            "tokens_per_s": median([m["tokens_per_s"] for m in losses[1:]]),
            "compute": run.read_status().get("compute_why", "?")}


def run_reference(data: Path, steps: int, work: Path) -> dict:
    import torch

    from engine.data import load_conversations
    from engine.models import ensure_embedded, load_tokenizer
    from engine.templates import encode, get_template
    from reference import train_reference

    started = time.time()  # like run_training's wall time: loading included
    cfg = common_config(data, steps)
    source = str(ensure_embedded())
    tokenizer = load_tokenizer(source)
    template = get_template(cfg.template, tokenizer)
    rows = [encode(tokenizer, template, row.messages, cfg.max_seq_len)
            for row in load_conversations(str(data)).rows]
    for row in rows:
        row.pop("length")
    result = train_reference(source, rows, tokenizer, device="cpu", dtype=torch.bfloat16,
                             micro_batch=cfg.micro_batch_size, steps=steps, lora_r=cfg.lora_r,
                             out_dir=work / "reference", seed=cfg.seed)
    return {"seconds": time.time() - started, "final_loss": result["losses"][-1],
            "tokens_per_s": result["tokens_per_s"], "compute": "bf16 (the paper's compute dtype)"}


def child(stack: str, steps: int, ours_dtype: str) -> None:
    from facts import write_facts

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_facts(work / "facts.jsonl")
        if stack == "ours":
            result = run_ours(data, steps, work, ours_dtype)
        else:
            result = run_reference(data, steps, work)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
    print("RESULT " + json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, help="write the results as Markdown here")
    parser.add_argument("--ours-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="our compute dtype (default auto: what a user's run gets here)")
    parser.add_argument("--stack", choices=("ours", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stack:
        child(args.stack, args.steps, args.ours_dtype)
        return 0
    results = {}
    for stack in ("reference", "ours"):  # one after the other: they must not share the cores
        out = subprocess.run([sys.executable, __file__, "--stack", stack, "--steps", str(args.steps),
                              "--ours-dtype", args.ours_dtype],
                             capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        results[stack] = json.loads(line[len("RESULT "):])
        print(stack, results[stack], flush=True)
    ratio = results["ours"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
    print(f"ours / reference tokens/s: {ratio:.2f}")
    if args.out:
        args.out.write_text(report(results, args.steps, args.ours_dtype))
    return 0


def report(results: dict, steps: int, ours_dtype: str = "auto") -> str:
    import torch

    from engine.hardware import _cpu_name, cpu_bf16_native

    native = {True: "yes", False: "no", None: "unknown (flags not readable)"}[cpu_bf16_native()]
    ratio = results["ours"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
    lines = [
        "# Our engine against the reference QLoRA stack, on the CPU",
        "",
        f"- machine: {_cpu_name()} ({platform.machine()}), {_cores()} cores, no GPU; native bf16: "
        f"{native}; torch {torch.__version__}",
        f"- date: {time.strftime('%Y-%m-%d')}",
        f"- command: `.venv/bin/python bench/cpu_train.py --steps {steps} --ours-dtype {ours_dtype} "
        "--out FILE`",
        "- model: the embedded SmolLM2-135M-Instruct in NF4 + double quantization; LoRA r=64, "
        "alpha=16, dropout 0.1 on all linear layers; micro-batch 4, 256 tokens",
        "",
        "| stack | compute | tokens/s (median) | peak RSS GB | wall s (load + train) | final loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stack, r in results.items():
        lines.append(f"| {stack} | {r['compute']} | {r['tokens_per_s']} | {r['peak_rss_gb']} | "
                     f"{r['seconds']:.0f} | {r['final_loss']:.4f} |")
    lines += ["", f"ours / reference tokens/s: **{ratio:.2f}**"]
    return "\n".join(lines) + "\n"


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
