"""`python -m engine`: the engine from the command line (headless training, checks, chat).

Exit code 0 on success; 1 with a one-line reason on failure (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from engine.catalog import default_template
from engine.config import PRESETS_DIR, ConfigError, RunConfig, load_recipe, recipe_names
from engine.data import DataError, read_dataset
from engine.models import ModelError
from engine.readers import is_hub_id
from engine.rundir import RETRYING
from engine.runner import RunnerError
from engine.templates import TemplateError


class CliError(RuntimeError):
    """A command-line mistake; printed as one line."""


def flag_of(setting: dataclasses.Field) -> str:
    """A RunConfig field's `train` flag: its own name unless its metadata names a shorter one."""
    return "--" + (setting.metadata["flag"] or setting.name.replace("_", "-"))


# flag -> field where they differ (e.g. micro_batch -> micro_batch_size)
FIELD_OF_FLAG = {flag_of(f)[2:].replace("-", "_"): f.name for f in dataclasses.fields(RunConfig)
                 if flag_of(f)[2:].replace("-", "_") != f.name}


def _add_setting_flags(train: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, its help the field's; unset flags stay None (the config,
    recipe or default wins)."""
    for setting in dataclasses.fields(RunConfig):
        text = setting.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if setting.default != "":
            text += f" (default: {setting.default})"
        if setting.type == "bool":  # --group-by-length / --no-group-by-length
            train.add_argument(flag_of(setting), dest=setting.name, help=text,
                               action=argparse.BooleanOptionalAction)
        else:
            train.add_argument(flag_of(setting), dest=setting.name, help=text,
                               type={"str": str, "int": int, "float": float}[setting.type],
                               choices=setting.metadata["choices"] or None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    hardware = commands.add_parser("hardware", help="show GPUs, RAM and disk")
    hardware.add_argument("--json", action="store_true", help="machine-readable output")

    data = commands.add_parser("data", help="check a dataset")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="validate a data file: format, rows, problems")
    check.add_argument("file", help=".jsonl, .json, .csv or .parquet file, or a Hub dataset id")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--format", default="auto", help="auto (default), alpaca, chat, sharegpt, "
                       "completion, guanaco or text")
    check.add_argument("--columns", default="", help="csv/parquet columns, e.g. prompt=question,completion=answer")
    check.add_argument("--model", help="also count tokens with this model's tokenizer (e.g. embedded)")
    check.add_argument("--template", default="guanaco", help="prompt format for token counts")
    check.add_argument("--max-seq-len", type=int, default=512, help="rows longer than this are reported")
    check.add_argument("--skip-bad-rows", action="store_true", help="exit 0 if the good rows are usable")

    train = commands.add_parser(
        "train", help="train a QLoRA adapter (foreground)",
        description="Train from flags, from --config, or an existing run dir, in this terminal. "
        "One run trains at a time: while another run of this data folder (QLS_DATA_DIR) trains, "
        "or one started here elsewhere, this is refused at once (exit code 1) rather than "
        "queued; runs queued meanwhile start when this one ends.")
    train.add_argument("run_dir", nargs="?", help="an existing run directory holding config.yaml")
    train.add_argument("--config", help="a run configuration YAML")
    train.add_argument("--recipe", choices=recipe_names(), help="start from a preset recipe")
    train.add_argument("--out", help="the run directory to create")
    _add_setting_flags(train)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    # one of a run's several processes, started by torchrun (engine/distributed.py)
    train.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    train.add_argument("--vram-gb", type=float, help="check the memory plan against this much free "
                       "GPU memory instead of the detected amount")
    _add_planner_commands(commands)
    _add_export_command(commands)

    chat = commands.add_parser("chat", help="ask a tuned run (or a base model) one question")
    chat.add_argument("run_dir", nargs="?", help="a finished or stopped run directory")
    chat.add_argument("--base", help="chat with this base model instead of a run")
    chat.add_argument("--prompt", required=True)
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=0.9)

    resume = commands.add_parser("resume", help="continue a stopped or failed run from its last checkpoint")
    resume.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/)")
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
    except BrokenPipeError:  # `... | head` closed the pipe: what was asked for is printed
        sys.stderr.close()  # and Python's own flush at exit must not complain about it either
        return 0


def cmd_hardware(args) -> int:
    from engine.hardware import detect

    found = detect()
    print(json.dumps(found.to_dict(), indent=1) if args.json else found.summary())
    return 0


def cmd_data(args) -> int:
    stats = None
    if args.model:
        from engine.datastats import StatsCollector
        from engine.models import load_tokenizer, resolve_model
        from engine.templates import get_template

        tokenizer = load_tokenizer(resolve_model(args.model))
        stats = StatsCollector(tokenizer, get_template(args.template, tokenizer), args.max_seq_len)
    report = read_dataset(args.file, args.format, args.columns, keep=0,
                          on_row=stats.add if stats else None)
    result = stats.finish() if stats else None
    if args.json:
        print(json.dumps({**report.to_dict(), **({"stats": result.to_dict()} if result else {})}, indent=1))
    else:
        print(report.summary() + (f"\n{result.summary()}" if result else ""))
    return 0 if report.usable(args.skip_bad_rows) else 1


def cmd_train(args) -> int:
    from engine import runner
    from engine.rundir import RunDir

    if args.worker:
        return _train_as_worker(args)
    if args.background:  # spawned by the job runner, which recorded this launch and pinned it
        run = RunDir(args.run_dir)
        cfg = RunConfig.load(run.config_path)
    else:
        run = _foreground_run(args)
        cfg = RunConfig.load(run.config_path)
        runner.start_here(run, resume=args.resume)  # refused while another of our runs trains
        _pin_gpu(run, cfg)
    from engine.train import run_training  # after pinning: torch must not see the other GPUs

    _setup_logging(run, args.background)
    state = "failed"  # also when something escapes the recipe: the queue still moves on
    try:
        if cfg.several_processes():  # this process starts the run's processes and waits for them
            from engine.distributed import launch_and_wait

            state = launch_and_wait(run, cfg, args.resume, args.background)
        else:
            _share_the_cpu(cfg)
            state = run_training(str(run.path), resume=args.resume)
    finally:
        runner.after_training(run, state)  # the next queued run, or this run's next process
    status = run.read_status()
    print(f"{state}: {status.get('message', '')} ({run.path})", file=sys.stderr)
    if state == RETRYING:  # out of GPU memory: a new background process goes on with the run
        print(f"the run goes on in the background; follow it in {run.log_path}", file=sys.stderr)
    return 0 if state in ("finished", "stopped", RETRYING) else 1


def _train_as_worker(args) -> int:
    """One of a run's several processes: trains; only the main one writes the run directory, and
    the process that started them all tells what follows (engine/distributed.py)."""
    from engine.distributed import rank
    from engine.rundir import RunDir
    from engine.train import run_training

    run = RunDir(args.run_dir)
    _setup_logging(run, args.background, f"[rank {rank()}] ")
    _share_the_cpu(RunConfig.load(run.config_path))
    state = run_training(str(run.path), resume=args.resume)
    return 0 if state in ("finished", "stopped") else 1


def _foreground_run(args):
    """The run a person trains in this terminal: an existing run folder, or a new one (--out)."""
    from engine.rundir import RunDir

    if not args.run_dir:
        return _new_run(args)
    run = RunDir(args.run_dir)
    if not run.is_run():
        raise CliError(f"{args.run_dir} has no config.yaml: to start a new run use --out")
    _preflight(RunConfig.load(run.config_path), args.vram_gb)
    return run


def _share_the_cpu(cfg: RunConfig) -> None:
    """A CPU run computes with one thread per core that is idle as it starts (set here, for this
    process alone: tests that train inside their own process keep their threads)."""
    import torch

    from engine.models import cpu_threads

    if cfg.device != "cpu" and torch.cuda.is_available():
        return  # a GPU run: the CPU only feeds it
    from engine.distributed import local_processes

    threads, why = cpu_threads()
    if local_processes() > 1:  # the run's processes on this machine share its cores
        threads = max(1, threads // local_processes())
        why += f", {threads} for each of the run's {local_processes()} processes"
    torch.set_num_threads(threads)
    logging.getLogger("engine.train").info("computing with %s", why)


def _pin_gpu(run, cfg: RunConfig) -> None:
    """Show this process (and the processes of a run on several) only the run's GPUs, before torch
    starts CUDA: with several visible, transformers' Trainer would split every micro-batch over
    all of them (DataParallel)."""
    from engine.hardware import visible_indices
    from engine.runner import pin_env_for, record_gpus, run_gpus

    if "CUDA_VISIBLE_DEVICES" in os.environ and not visible_indices():
        return  # GPU UUIDs, MIG names, or "" (no GPU): the person chose, and we cannot narrow it
    gpus = run_gpus(cfg)  # within CUDA_VISIBLE_DEVICES, if set
    if gpus:
        os.environ.update(pin_env_for(gpus))
        record_gpus(run, gpus)


def _new_run(args):
    """A new run folder (--out) from the flags, once its settings and data are known to be good;
    the runner creates it, as it creates the app's runs."""
    from engine.runner import create_run, ensure_gpu_free

    if not args.out:
        raise CliError("say where the run goes with --out RUN_DIR (or give an existing run dir)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CliError(f"{out} already exists and is not empty: choose a new --out folder")
    cfg = config_from_args(args)
    cfg.validate()
    _preflight(cfg, args.vram_gb)
    data = read_dataset(cfg.data_path, cfg.data_format, cfg.data_columns, keep=0)
    if not data.usable(cfg.skip_bad_rows):
        raise DataError(data.summary(max_errors=3).replace("\n", " "))
    ensure_gpu_free()  # a run that cannot start now leaves no folder behind
    return create_run(cfg, path=out)


def config_from_args(args) -> RunConfig:
    """The new run's settings: --config, else --recipe, else the defaults; the flags given on top."""
    if args.config:
        cfg, chosen = RunConfig.load(args.config), _settings_in(Path(args.config))
    elif args.recipe:
        cfg, chosen = load_recipe(args.recipe), _settings_in(PRESETS_DIR / "recipes" / f"{args.recipe}.yaml")
    else:
        cfg, chosen = RunConfig(), set()
    for setting in dataclasses.fields(RunConfig):
        value = getattr(args, setting.name)
        if value is not None:
            setattr(cfg, setting.name, value)
    if args.template is None and "template" not in chosen:
        cfg.template = default_template(cfg.model)  # config.yaml records the name it resolved to
    for name in ("data_path", "eval_data_path"):
        value = getattr(cfg, name)
        if value and not is_hub_id(value):  # a Hub dataset id is not a path to resolve
            setattr(cfg, name, str(Path(value).expanduser().resolve()))
    return cfg


def _settings_in(path: Path) -> set[str]:
    """The settings a config or recipe file names itself (the rest are RunConfig's defaults)."""
    return set(yaml.safe_load(path.read_text()) or {})


def _setup_logging(run, background: bool, prefix: str = "") -> None:
    """`prefix`: which of a run's processes writes the line ("[rank 1] ")."""
    # In the background, stdout already is train.log (the runner redirects it there).
    handlers = [logging.StreamHandler(sys.stdout if background else sys.stderr)]
    if not background:
        handlers.append(logging.FileHandler(run.log_path, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, datefmt="%H:%M:%S",
                        format=f"%(asctime)s {prefix}%(levelname)s %(message)s")


def cmd_chat(args) -> int:
    from engine.chat import ChatModel

    if bool(args.run_dir) == bool(args.base):
        raise CliError("give either a run directory or --base MODEL")
    model = ChatModel(run_dir=args.run_dir) if args.run_dir else ChatModel(base_model=args.base)
    messages = [{"role": "user", "content": args.prompt}]
    print(model.reply(messages, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens))
    return 0


# --- memory planner: plan, recommend, and the pre-flight check of train ---------------------------

def _add_planner_commands(commands) -> None:
    plan = commands.add_parser("plan", help="estimate the GPU memory a QLoRA run needs, part by part")
    plan.add_argument("--model", required=True, help="catalog id, Hub id in the catalog, or local folder")
    recommend = commands.add_parser("recommend", help="the catalog models that fit a GPU, best first")
    for sub in (plan, recommend):
        card = sub.add_mutually_exclusive_group()
        card.add_argument("--gpu", help="a card from presets/gpus.yaml, e.g. 'RTX 3060' (default: detected)")
        card.add_argument("--vram-gb", type=float, help="free GPU memory to plan for (default: detected)")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    defaults = RunConfig()
    plan.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len)
    plan.add_argument("--micro-batch", type=int, default=defaults.micro_batch_size)
    plan.add_argument("--lora-r", type=int, default=defaults.lora_r)
    plan.add_argument("--kernels", choices=("auto", "off"), default=defaults.kernels,
                      help="plan our kernels/ pieces that auto turns on for CUDA "
                      "(presets/kernels.yaml), or off: the reference QLoRA stack")
    plan.add_argument("--num-gpus", type=int, default=1,
                      help="plan the run on this many GPUs of that memory each (DDP or FSDP-QLoRA)")
    plan.add_argument("--strategy", default="auto", help="with --num-gpus: auto (DDP when the "
                      "model fits one GPU, else FSDP-QLoRA), ddp or fsdp")


def _vram_of(args) -> tuple[float | None, str]:
    """GB to plan for and where that figure came from."""
    from engine.planner import detected_vram
    from engine.speed import find_gpu, load_gpus

    if args.vram_gb is not None:
        return args.vram_gb, f"{args.vram_gb:g} GB (--vram-gb)"
    if args.gpu:
        card = find_gpu(args.gpu)
        if card is None:
            names = sorted({g.name for g in load_gpus()})
            raise CliError(f"GPU '{args.gpu}' is not in presets/gpus.yaml: use one of {', '.join(names)}, "
                           "or --vram-gb")
        return card.vram_gb, f"{card.name} {card.vram_gb:g} GB"
    free, total = detected_vram()
    if free is None:
        return None, "no GPU detected"
    return free, f"{free:.1f} GB free of {total:.1f} GB (detected)"


def cmd_plan(args) -> int:
    from engine.catalog import CatalogError
    from engine.planner import model_shape, plan, stack_for

    try:
        model = model_shape(args.model)
    except CatalogError as exc:
        raise CliError(str(exc)) from None
    if model is None:
        raise CliError(f"model '{args.model}' is not in the catalog and not a local folder: the planner "
                       "needs its shapes (download it and pass its folder)")
    vram, source = _vram_of(args)
    if args.num_gpus > 1 or args.strategy != "auto":
        return _plan_several(args, model, vram, source)
    result = plan(model, args.max_seq_len, args.micro_batch, args.lora_r, vram,
                  stack_for(args.kernels, "cuda"))
    if args.json:
        values = result.to_dict()
        values["fits"] = result.fits if vram is not None else None
        print(json.dumps(values, indent=1))
        return 0
    print(f"{model.name}: {args.max_seq_len} tokens x micro-batch {args.micro_batch}, LoRA r={args.lora_r}")
    print(f"kernels {args.kernels}: " + (", ".join(result.pieces) + " (presets/kernels.yaml)"
                                         if result.pieces else "the reference QLoRA stack"))
    for part, gb in result.parts.items():
        how = f"  ({result.held_as[part]})" if part in result.held_as else ""
        print(f"  {part:<40} {gb:7.2f} GB{how}")
    print(f"  {'total':<40} {result.total_gb:7.2f} GB")
    if vram is None:
        print(f"{source}: pass --gpu or --vram-gb for a verdict")
    else:
        print(f"{'fits' if result.fits else 'does NOT fit'} in {source} (keeping 10% headroom)")
    return 0


def _plan_several(args, model, vram, source) -> int:
    from engine.planner_multi import StrategyError, plan_layout

    try:
        layout = plan_layout(model, args.num_gpus, args.strategy, args.max_seq_len,
                             args.micro_batch, args.lora_r, vram)
    except StrategyError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        values = layout.to_dict()
        values["fits"] = layout.fits if vram is not None else None
        print(json.dumps(values, indent=1))
        return 0
    print(f"{model.name} on {args.num_gpus} GPU(s): {layout.label}, {args.max_seq_len} tokens x "
          f"micro-batch {args.micro_batch}, LoRA r={args.lora_r}")
    for part, gb in layout.per_gpu.parts.items():
        print(f"  {part:<40} {gb:7.2f} GB per GPU")
    print(f"  {'total per GPU':<40} {layout.per_gpu.total_gb:7.2f} GB")
    if layout.cpu_offload:
        print(f"  CPU RAM for the offloaded shards: {layout.cpu_ram_gb:.1f} GB")
    print(f"{layout.how}. {layout.why}".strip())
    if vram is None:
        print(f"{source}: pass --gpu or --vram-gb for a verdict")
    else:
        print(f"{'fits' if layout.fits else 'does NOT fit'} in {source} per GPU (keeping 10% headroom)")
    return 0


def cmd_recommend(args) -> int:
    from engine.planner import recommend

    vram, source = _vram_of(args)
    picks = recommend(vram)
    if args.json:
        print(json.dumps([p.to_dict() for p in picks], indent=1))
        return 0
    print(f"Models that fit {source}, largest first:" if vram is not None
          else "No GPU: CPU mode, the embedded model:")
    for pick in picks:
        print(f"  {pick.model.id:<16} {pick.why}")
    if not picks:
        print("  none: this much memory fits no catalog model at 1024 tokens")
    return 0


def _preflight(cfg: RunConfig, vram_gb: float | None) -> None:
    """Refuse, before anything loads, a run the planner says will not fit on the GPU."""
    from engine.planner import config_refusal

    problem = config_refusal(cfg, vram_gb)
    if problem:
        raise CliError(problem)


def cmd_resume(args) -> int:
    """`train RUN_DIR --resume` in the foreground, once we know the run is not still training."""
    from engine.rundir import RunDir
    from engine.runner import ensure_resumable

    run = RunDir(args.run_dir)
    if not run.is_run():
        raise CliError(f"{args.run_dir} has no config.yaml: it is not a run directory")
    ensure_resumable(run)
    checkpoint = run.latest_checkpoint()
    print(f"resuming {run.path} from {checkpoint.name if checkpoint else 'the start (no checkpoint yet)'}",
          file=sys.stderr)
    args.resume, args.background, args.worker, args.vram_gb = True, False, False, None
    return cmd_train(args)


# --- export: the run's result for other programs (engine/export.py, engine/export_jobs.py) ------

def _add_export_command(commands) -> None:
    from engine.export import KINDS

    export = commands.add_parser(
        "export", help="export a run: its adapter (zip), a merged 16-bit model, or GGUF",
        description="Writes RUN_DIR/exports/<format>-<time>/, complete or not at all. A Hub token "
        "for --push comes from the HF_TOKEN variable, --token-file, or `hf auth login`; there is "
        "deliberately no flag for the token itself, which would land in your shell history.")
    export.add_argument("run_dir", help="a finished or stopped run directory (holds adapter/)")
    export.add_argument("--format", required=True, choices=list(KINDS),
                        help="; ".join(f"{kind}: {what}" for kind, what in KINDS.items()))
    export.add_argument("--gguf-type", default="q8_0", help="GGUF weight type: q8_0 (default), "
                        "f16, bf16, or q4_k_m and q5_k_m where llama.cpp's quantizer is installed")
    export.add_argument("--push", metavar="REPO_ID", help="then upload it to this Hugging Face "
                        "model repository (e.g. your-name/my-model), private unless --public")
    export.add_argument("--public", action="store_true", help="make a new --push repository public")
    export.add_argument("--token-file", help="a file holding the Hugging Face token for --push")
    export.add_argument("--job", help=argparse.SUPPRESS)  # the job file of a background export


def cmd_export(args) -> int:
    from engine.export import ExportError
    from engine.export_jobs import export_and_push
    from engine.rundir import RunDir

    run = RunDir(args.run_dir)
    if not run.is_run():
        raise CliError(f"{args.run_dir} has no config.yaml: it is not a run directory")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"cannot read the token file {args.token_file}: {exc.strerror}") from None
    try:
        result = export_and_push(run, args.format, args.gguf_type, args.push or "", token,
                                 private=not args.public, job=Path(args.job) if args.job else None,
                                 echo=lambda line: print(line, flush=True))
    except ExportError as exc:
        raise CliError(str(exc)) from None
    print(result)
    return 0


COMMANDS = {"hardware": cmd_hardware, "data": cmd_data, "train": cmd_train, "chat": cmd_chat,
            "plan": cmd_plan, "recommend": cmd_recommend,
            "resume": cmd_resume, "export": cmd_export}
