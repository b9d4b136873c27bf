"""`python -m engine`: the engine from the command line (headless training, checks, chat).

Exit code 0 on success; 1 with a one-line reason on failure (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine.config import ConfigError, RunConfig, load_recipe, recipe_names
from engine.data import DataError, read_dataset
from engine.models import ModelError
from engine.runner import RunnerError
from engine.templates import TemplateError


class CliError(RuntimeError):
    """A command-line mistake; printed as one line."""


# Flags that map one-to-one onto RunConfig fields (flag -> field).
TRAIN_FLAGS = {
    "model": (str, "catalog id, Hub id, local folder, or 'embedded'"),
    "data": (str, "training file (.jsonl)"),
    "eval_data": (str, "optional eval file (.jsonl) for eval loss"),
    "eval_share": (float, "share of rows held out for eval (default 0)"),
    "template": (str, "prompt format: guanaco, alpaca or model"),
    "epochs": (float, "passes over the data"),
    "max_steps": (int, "optimizer steps instead of epochs"),
    "lr": (float, "learning rate"),
    "lora_r": (int, "LoRA rank"),
    "lora_alpha": (int, "LoRA alpha (scale = alpha / r)"),
    "max_seq_len": (int, "longest row in tokens; longer rows are cut"),
    "micro_batch": (int, "rows per forward pass"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "save_steps": (int, "checkpoint every N steps"),
    "seed": (int, "random seed"),
}
FIELD_OF_FLAG = {"data": "data_path", "eval_data": "eval_data_path", "micro_batch": "micro_batch_size",
                 "grad_accum": "grad_accum_steps"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    hardware = commands.add_parser("hardware", help="show GPUs, RAM and disk")
    hardware.add_argument("--json", action="store_true", help="machine-readable output")

    data = commands.add_parser("data", help="check a dataset")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="validate a .jsonl file: format, rows, problems")
    check.add_argument("file")
    check.add_argument("--json", action="store_true", help="machine-readable output")

    train = commands.add_parser("train", help="train a QLoRA adapter (foreground)",
                                description="Train from flags, from --config, or an existing run dir.")
    train.add_argument("run_dir", nargs="?", help="an existing run directory holding config.yaml")
    train.add_argument("--config", help="a run configuration YAML")
    train.add_argument("--recipe", choices=recipe_names(), help="start from a preset recipe")
    train.add_argument("--out", help="the run directory to create")
    for flag, (kind, text) in TRAIN_FLAGS.items():
        train.add_argument("--" + flag.replace("_", "-"), type=kind, help=text)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--background", action="store_true", help=argparse.SUPPRESS)

    chat = commands.add_parser("chat", help="ask a tuned run (or a base model) one question")
    chat.add_argument("run_dir", nargs="?", help="a finished or stopped run directory")
    chat.add_argument("--base", help="chat with this base model instead of a run")
    chat.add_argument("--prompt", required=True)
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=0.9)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CliError, ConfigError, DataError, ModelError, RunnerError, TemplateError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


def cmd_hardware(args) -> int:
    from engine.hardware import detect

    found = detect()
    print(json.dumps(found.to_dict(), indent=1) if args.json else found.summary())
    return 0


def cmd_data(args) -> int:
    report = read_dataset(args.file)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_train(args) -> int:
    from engine.rundir import RunDir
    from engine.train import run_training

    if args.run_dir:
        run = RunDir(args.run_dir)
        if not run.is_run():
            raise CliError(f"{args.run_dir} has no config.yaml: to start a new run use --out")
    else:
        run = _new_run(args)
    if not args.background:
        run.stop_path.unlink(missing_ok=True)  # an old stop request is not meant for this session
    _setup_logging(run, args.background)
    state = run_training(str(run.path), resume=args.resume)
    status = run.read_status()
    print(f"{state}: {status.get('message', '')} ({run.path})", file=sys.stderr)
    return 0 if state in ("finished", "stopped") else 1


def _new_run(args):
    from engine.rundir import RunDir

    if not args.out:
        raise CliError("say where the run goes with --out RUN_DIR (or give an existing run dir)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CliError(f"{out} already exists and is not empty: choose a new --out folder")
    if args.config:
        cfg = RunConfig.load(args.config)
    elif args.recipe:
        cfg = load_recipe(args.recipe)
    else:
        cfg = RunConfig()
    for flag in TRAIN_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, FIELD_OF_FLAG.get(flag, flag), value)
    for name in ("data_path", "eval_data_path"):
        if getattr(cfg, name):
            setattr(cfg, name, str(Path(getattr(cfg, name)).expanduser().resolve()))
    cfg.validate()
    data = read_dataset(cfg.data_path)
    if not data.ok:
        raise DataError(data.summary(max_errors=3).replace("\n", " "))
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    cfg.save(run.config_path)
    run.write_status(state="queued", step=0, message="starting")
    return run


def _setup_logging(run, background: bool) -> None:
    # In the background, stdout already is train.log (the runner redirects it there).
    handlers = [logging.StreamHandler(sys.stdout if background else sys.stderr)]
    if not background:
        handlers.append(logging.FileHandler(run.log_path, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def cmd_chat(args) -> int:
    from engine.chat import ChatModel

    if bool(args.run_dir) == bool(args.base):
        raise CliError("give either a run directory or --base MODEL")
    model = ChatModel(run_dir=args.run_dir) if args.run_dir else ChatModel(base_model=args.base)
    messages = [{"role": "user", "content": args.prompt}]
    print(model.reply(messages, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens))
    return 0


COMMANDS = {"hardware": cmd_hardware, "data": cmd_data, "train": cmd_train, "chat": cmd_chat}
