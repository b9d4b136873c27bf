"""The QLoRA training recipe, top to bottom: runs in its own process on one run directory.

    python -m engine train RUN_DIR        (what the job runner spawns)

Load the 4-bit base model, add LoRA to every linear layer, tokenise the conversations with loss
on assistant tokens only, and hand all of it to transformers' Trainer. This process alone writes
the run's status.json (here and in its callback, engine/callback.py, which also writes
metrics.jsonl and honours stop requests); engine/faults.py puts what went wrong into words. What
happens after the recipe (the next queued run, a fresh process after an out-of-memory) is the job
runner's: engine/runner.after_training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any

import psutil
from transformers import PrinterCallback

from engine import checkpoints, distributed, fsdp, kernel_path
from engine.callback import StudioCallback
from engine.config import ConfigError, RunConfig
from engine.data import DataError, load_conversations
from engine.faults import (
    disk_message,
    injected_faults,
    is_disk_problem,
    is_out_of_memory,
    model_too_big_message,
    oom_message,
)
from engine.gpuhealth import GpuSampler, gpu_indices
from engine.kernel_choice import optimizer_for
from engine.models import (
    ModelError,
    compute_dtype,
    download,
    download_status,
    free_memory,
    load_quantized_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from engine.progress import Progress, phase, transformers_bar
from engine.rundir import RETRYING, TEMPLATE_FILE, RunDir, process_alive, process_created
from engine.templates import IGNORE_INDEX, TemplateError, encode, get_template, pack, text_tokens

log = logging.getLogger("engine.train")
KNOWN_ERRORS = (ConfigError, DataError, ModelError, TemplateError)
MAX_OOM_RETRIES = 3  # micro-batch 8 -> 4 -> 2 -> 1; each retry loads the model again
PREDECESSOR_WAIT_S = 60  # a process that handed its run over exits in seconds; a hung one is ended


class OutOfMemoryInStep(RuntimeError):
    """GPU out of memory in a training (or eval) step: a smaller micro-batch may fit."""


def run_training(run_dir: str, resume: bool = False) -> str:
    """Train one run to its end in this process; returns the final state (finished, stopped or
    failed), or RETRYING when a GPU out-of-memory in a step asks for the run to go on from its
    last checkpoint in a fresh process, with half the micro-batch (runner.after_training starts
    it; a CUDA context left broken by an OOM could poison a retry in this one)."""
    run = distributed.run_dir_for_this_process(run_dir)  # only the main process writes the run
    taking_over = _wait_for_predecessor(run)
    pid = psutil.Process().pid
    notes = (run.read_status().get("notes") or []) if taking_over else []  # retries so far
    # `launch`: the launch this process reports on; from here on its status is the run's state.
    run.write_status(state="running", launch=run.latest_launch(), pid=pid,
                     pid_created=process_created(pid), started=time.time(),
                     message="loading the model", error="", notes=notes,
                     predecessor_pid=None, predecessor_created=None)
    # A plain `kill` (SIGTERM) or Ctrl-C is a stop request: save, then exit, like the Stop button.
    # On Windows Ctrl-Break too: what a process group of its own gets (CTRL_BREAK_EVENT).
    stop_signals = [signal.SIGTERM, signal.SIGINT]
    if hasattr(signal, "SIGBREAK"):
        stop_signals.append(signal.SIGBREAK)
    for sig in stop_signals if distributed.world_size() == 1 else []:  # workers: torchrun's
        signal.signal(sig, lambda *_: run.request_stop())  # signals end them (launcher: stops)
    try:
        return _train_with_retries(run, resume)
    finally:
        free_memory()  # the GPU's memory goes to the next run, or to this run's next process


def _train_with_retries(run: RunDir, resume: bool) -> str:
    """_train, with every error ending as a readable status; RETRYING after a GPU out-of-memory
    in a step that a smaller micro-batch may avoid."""
    try:
        cfg = RunConfig.load(run.config_path).validate()
        return _train(run, cfg, resume)
    except KNOWN_ERRORS as exc:
        return _fail(run, str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else still ends as a readable status
        if not isinstance(exc, OutOfMemoryInStep) and not is_out_of_memory(exc):
            if is_disk_problem(exc):
                return _fail(run, disk_message(run, exc))
            log.error("unexpected error:\n%s", traceback.format_exc())
            return _fail(run, f"unexpected error: {type(exc).__name__}: {exc} (details in train.log)")
        in_step = isinstance(exc, OutOfMemoryInStep)
        if in_step and distributed.world_size() > 1:
            # The others wait in the next exchange: this process ends, torchrun ends them all,
            # and their launcher retries with a smaller micro-batch (engine/distributed.py).
            log.error("%s %s", distributed.OOM_IN_STEP, exc)
            return RETRYING
    # Go on outside the except block: the exception's frames hold the failed attempt's tensors,
    # and the free memory the message reports must not count them.
    free_memory()
    if not in_step:  # while loading: the model itself does not fit, whatever the micro-batch
        return _fail(run, model_too_big_message(cfg))
    return _retry_with_half_batch(run, cfg)


def _retry_with_half_batch(run: RunDir, cfg: RunConfig) -> str:
    """RETRYING with the micro-batch halved in config.yaml (the run stays "running" until the
    new process reports), or a failure when no retry is left."""
    retries = len(run.read_status().get("notes") or [])
    if cfg.micro_batch_size <= 1 or retries >= MAX_OOM_RETRIES:
        return _fail(run, oom_message(run, cfg, retries))
    _halve_micro_batch(run, cfg)
    return RETRYING


def _wait_for_predecessor(run: RunDir) -> bool:
    """True when this process takes the run over from one that ran out of GPU memory, after that
    process has ended: its GPU memory is only free then."""
    status = run.read_status()
    pid, created = status.get("predecessor_pid"), status.get("predecessor_created")
    if not pid:
        return False
    log.info("taking the run over from process %s after GPU out of memory: waiting for it to end",
             pid)
    for _ in range(PREDECESSOR_WAIT_S * 5):
        if not process_alive(pid, created):
            return True
        time.sleep(0.2)
    log.warning("process %s has not exited after %d s: ending it", pid, PREDECESSOR_WAIT_S)
    try:
        psutil.Process(int(pid)).kill()
    except psutil.Error:
        pass  # it ended just now
    return True


def _halve_micro_batch(run: RunDir, cfg: RunConfig) -> RunConfig:
    old_batch, old_accum = cfg.micro_batch_size, cfg.grad_accum_steps
    cfg.micro_batch_size = old_batch // 2
    cfg.grad_accum_steps = old_accum * 2
    cfg.save(run.config_path)  # a later Resume must not run out of memory the same way
    checkpoint = run.latest_checkpoint()
    note = (f"GPU out of memory at step {run.read_status().get('step', 0)} with micro-batch "
            f"{old_batch}: retrying from {checkpoint.name if checkpoint else 'the start'} with "
            f"micro-batch {cfg.micro_batch_size} and gradient accumulation {cfg.grad_accum_steps} "
            f"(effective batch {old_batch * old_accum} -> {cfg.micro_batch_size * cfg.grad_accum_steps})")
    log.warning(note)
    notes = run.read_status().get("notes") or []
    run.write_status(message=note, notes=notes + [note])
    return cfg


# --- the recipe: setup, data, model, trainer, run, save ----------------------------------------

@dataclass
class Setup:
    """What the recipe's steps share: where it computes and in what, and the model's source,
    tokenizer and prompt template."""
    device: str
    dtype: Any  # a torch.dtype (torch is imported only once training starts)
    dtype_why: str
    source: str
    name: str
    tokenizer: Any
    template: Any
    kernels: Any = None  # the kernel_path.KernelPlan, once the model has it


def _train(run: RunDir, cfg: RunConfig, resume: bool) -> str:
    setup = _set_up(run, cfg)
    train_set, eval_set = _data(run, cfg, setup)
    model = _model(run, cfg, setup)
    trainer, callback = _trainer(run, cfg, setup, model, train_set, eval_set)
    _run(run, trainer, setup.device, resume)
    return _save(run, cfg, setup, model, trainer.state.global_step, callback)


def _set_up(run: RunDir, cfg: RunConfig) -> Setup:
    """Seed, device, compute dtype, and the model's tokenizer and prompt template."""
    from transformers import set_seed

    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    if device == "cuda" and distributed.world_size() > 1:
        import torch

        # Each process loads its copy onto its own GPU (CUDA_VISIBLE_DEVICES lists the run's).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _cap_gpu_memory(device)
    dtype, dtype_why = compute_dtype(cfg.compute_dtype, device)
    source = resolve_model(cfg.model)
    name = os.path.basename(source.rstrip("/\\")) if os.path.isdir(source) else source
    with phase(run, f"loading the tokenizer of {name}", "loaded the tokenizer"):
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    return Setup(device, dtype, dtype_why, source, name, tokenizer,
                 get_template(cfg.template, tokenizer))


def _data(run: RunDir, cfg: RunConfig, setup: Setup):
    """The tokenised training set and eval set (None without eval rows)."""
    from datasets import Dataset

    with phase(run, "reading the training data", "read the data"):
        train_rows, eval_rows = _split(cfg)

    def tokenised(rows, split: str):
        return Dataset.from_list(_tokenise(rows, setup.tokenizer, setup.template, cfg, split, run))

    return tokenised(train_rows, "training"), (tokenised(eval_rows, "eval") if eval_rows else None)


def _model(run: RunDir, cfg: RunConfig, setup: Setup):
    """The base model (downloaded if needed) in 4 bits, prepared for training, with LoRA."""
    from peft import LoraConfig, get_peft_model

    download(setup.source, download_status(run.write_status, setup.source))
    loading = Progress(run, f"loading {setup.name} into 4-bit", unit="tensors")
    with transformers_bar("Loading weights", loading):  # a step per tensor read and quantized
        model = load_quantized_model(setup.source, cfg.quant_type, cfg.double_quant, setup.dtype,
                                     setup.device, cfg.trust_remote_code,
                                     quant_storage=fsdp.quant_storage(setup.dtype))
    loading.done(f"loaded {setup.name} into 4-bit"
                 + (f" ({loading.total} tensors)" if loading.total else ""))
    with phase(run, f"preparing the model for training: LoRA r={cfg.lora_r} on {cfg.lora_target}",
               "prepared the model for LoRA training"):
        prepare_for_kbit_training(model, cfg.gradient_checkpointing)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    setup.kernels = kernel_path.plan_for(cfg.kernels, setup.device,
                                         "fsdp" if fsdp.sharded() else "ddp", cfg.optimizer)
    kernel_path.apply_to_model(setup.kernels, model, setup.dtype)
    return model


def _trainer(run: RunDir, cfg: RunConfig, setup: Setup, model, train_set, eval_set):
    """transformers' Trainer with the recipe's settings and our callback; (trainer, callback)."""
    from transformers import Trainer, TrainingArguments

    device, dtype = setup.device, str(setup.dtype).removeprefix("torch.")
    collator, tokens_seen = kernel_path.collator(setup.kernels, setup.tokenizer)
    optimizer = optimizer_for(cfg.optimizer, device, lora16="lora16" in setup.kernels.on)
    args = TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        # Plain "constant" would ignore the warmup; the paper warms up, then holds the rate.
        lr_scheduler_type="constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a share of steps
        max_grad_norm=cfg.max_grad_norm,
        optim=optimizer,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        # No activation_checkpointing here: prepare_for_kbit_training switched it on already.
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # the default hides a NaN loss; we must see it to stop
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if eval_set is not None else "no",
        eval_steps=max(1, cfg.save_steps // 2) if eval_set is not None else None,
        include_num_input_tokens_seen=tokens_seen,
        use_cpu=device == "cpu",
        # Several processes (DDP): every LoRA weight gets a gradient in every step, and the
        # frozen 4-bit base has none, so DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        **fsdp.trainer_arguments(),  # FSDP-QLoRA: the model sharded over the processes
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
    )
    callback = StudioCallback(run, device, save_every_s=cfg.save_minutes * 60)
    fsdp.allow_on_cpu(device)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        callbacks=[callback, *injected_faults(run), *_replica_checksums()],
    )
    trainer.remove_callback(PrinterCallback)  # our callback already logs each step, readably
    how = f"training on {device} with {optimizer}, compute {setup.dtype_why}"
    log.info(how)
    log.info(setup.kernels.summary())
    run.write_status(message=how, device=device, optimizer=optimizer, compute_dtype=dtype,
                     compute_why=setup.dtype_why, kernels=setup.kernels.summary())
    return trainer, callback


def _run(run: RunDir, trainer, device: str, resume: bool) -> None:
    """The training steps, from the last complete checkpoint on a resume, the GPU sampled."""
    checkpoint = _resume_point(run) if resume else None
    # Steps past the checkpoint are trained again: their old chart points go (a fresh start: all).
    run.drop_metrics_after(checkpoints.step_of(checkpoint) if checkpoint else 0)
    try:
        # GPU health into gpu.jsonl while the steps run (nothing on a CPU; never stops training)
        sampled = gpu_indices(run, device) if distributed.is_main_process() else []
        with GpuSampler(run, sampled, step=lambda: trainer.state.global_step):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as exc:
        if is_out_of_memory(exc):  # in a step, unlike one while loading: a retry may fit
            raise OutOfMemoryInStep(str(exc)) from exc
        raise


def _save(run: RunDir, cfg: RunConfig, setup: Setup, model, step: int, callback) -> str:
    """The adapter saved and the final state (finished or stopped); failed on a NaN loss."""
    if callback.bad_loss:
        last = run.latest_checkpoint()
        return _fail(run, f"{callback.bad_loss}; training stopped at step {step}. "
                     + (f"The last good checkpoint ({last.name}) is kept: " if last else "")
                     + f"lower the learning rate (now {cfg.lr:g}) or max_grad_norm, then start again"
                     + (" or resume the run" if last else ""))
    weights = fsdp.gathered_lora_weights(model)  # sharded: every process hands in its part
    if distributed.is_main_process():  # the processes hold the same weights: one saves them
        _save_adapter(run, model, setup.tokenizer, cfg, setup.source, weights)
    stopped = callback.stop_seen
    notes = run.read_status().get("notes") or []
    message = (f"stopped at step {step}; adapter saved" if stopped
               else f"finished {step} steps; adapter saved")
    if notes:
        message += f" (after {len(notes)} out-of-memory retr{'y' if len(notes) == 1 else 'ies'}: "
        message += f"micro-batch {cfg.micro_batch_size}, gradient accumulation {cfg.grad_accum_steps})"
    state = "stopped" if stopped else "finished"
    run.write_status(state=state, message=message, step=step, eta_s=0)
    log.info(message)
    return state


def _cap_gpu_memory(device: str) -> None:
    """QLS_GPU_MEMORY_GB: train within this many GB, leaving the rest of the card to a display or
    another program (and letting a test force a real out-of-memory on a big card)."""
    value = os.environ.get("QLS_GPU_MEMORY_GB", "").strip()
    if not value:
        return
    try:
        limit_gb = float(value)
    except ValueError:
        limit_gb = 0.0
    if limit_gb <= 0:
        raise ConfigError(f"QLS_GPU_MEMORY_GB is '{value}': set it to the GB of GPU memory "
                          "training may use, e.g. 10.5, or unset it")
    if device != "cuda":
        log.info("QLS_GPU_MEMORY_GB=%s ignored: training runs on the %s, not a GPU", value, device)
        return
    import torch

    total_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
    torch.cuda.set_per_process_memory_fraction(min(limit_gb / total_gb, 1.0))
    log.info("GPU memory capped at %.1f GB of %.1f GB (QLS_GPU_MEMORY_GB)",
             min(limit_gb, total_gb), total_gb)


def prepare_for_kbit_training(model, gradient_checkpointing: bool) -> None:
    """peft's prepare_model_for_kbit_training without its fp32 copy of the frozen embeddings and
    output head. peft upcasts every unquantized weight to fp32; the QLoRA paper's qlora.py then
    casts the embeddings and head back to 16 bits, as we did. But the fp32 copies exist for a
    moment, and on an H200 that moment was the run's peak: a Llama-3-vocabulary model held 6.4 GB
    while loading against 3.6 GB planned for training (bench/results/gpu-check-nvidia-h200-*).
    So: freeze everything, upcast only the small unquantized weights (norms, biases: precision
    matters there) and leave the embeddings and head in the compute dtype they were loaded in."""
    import torch

    big = {id(module.weight) for module in (model.get_input_embeddings(),
                                            model.get_output_embeddings()) if module is not None}
    # Under FSDP every weight computes in the dtype the 4-bit codes are stored and gathered in:
    # an fp32 norm would hand fp32 activations to 16-bit weights (accelerate uses no autocast).
    upcast = () if fsdp.sharded() else (torch.float16, torch.bfloat16)
    for param in model.parameters():
        param.requires_grad = False
        if (param.dtype in upcast and id(param) not in big
                and type(param).__name__ != "Params4bit"):
            param.data = param.data.to(torch.float32)
    keep_4bit_layout_for_training(model)
    # The one place gradient checkpointing is switched on (TrainingArguments leaves it alone).
    # use_reentrant=False: the frozen inputs need no requires_grad hook.
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def keep_4bit_layout_for_training(model) -> None:
    """Keep bitsandbytes from repacking the 4-bit weights for its CPU inference kernel. On a CPU
    with AVX512-BF16 it does so at a layer's first forward in eval mode without gradients (each
    Trainer evaluation), for good, in the quantization state the layer shares: later training
    forwards then run that kernel, which has no backward (no gradient flows back through the
    frozen weights), and FSDP, which gathers the weights again in their stored layout, reads them
    as repacked (garbage outputs). A chat model, which never trains, keeps the faster kernel."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False


def _resume_point(run: RunDir):
    # The main process tidies; the others only ever pick a complete checkpoint, the same one.
    removed = checkpoints.remove_incomplete(run.checkpoints_dir) if distributed.is_main_process() \
        else []
    if removed:
        log.warning("removed incomplete checkpoint(s) %s (written when the run broke off)",
                    ", ".join(removed))
    checkpoint = run.latest_checkpoint()
    log.info("resuming from %s", checkpoint.name if checkpoint else "the start (no checkpoint yet)")
    return checkpoint


def _save_adapter(run: RunDir, model, tokenizer, cfg: RunConfig, source: str,
                  weights: dict | None = None) -> None:
    # Written beside, then swapped in: a crash while saving leaves the previous adapter whole.
    tmp = run.path / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)  # weights: gathered from FSDP's shards
    tokenizer.save_pretrained(tmp)
    (tmp / TEMPLATE_FILE).write_text(json.dumps(
        {"template": cfg.template, "base_model": cfg.model, "base_source": source}, indent=1))
    old = run.path / "adapter.old"
    if run.adapter_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(run.adapter_dir, old)
    os.replace(tmp, run.adapter_dir)
    shutil.rmtree(old, ignore_errors=True)


def _split(cfg: RunConfig):
    """(train rows, eval rows): the eval file when given, else a seeded share of the training rows."""
    rows = _read_rows(cfg.data_path, cfg)
    if cfg.eval_data_path:
        return rows, _read_rows(cfg.eval_data_path, cfg)
    if cfg.eval_share <= 0 or len(rows) < 10:
        if cfg.eval_share > 0:
            log.warning("only %d rows: no eval split (it needs at least 10)", len(rows))
        return rows, []
    import random

    shuffled = rows[:]
    random.Random(cfg.seed).shuffle(shuffled)
    held = max(1, int(len(rows) * cfg.eval_share))
    log.info("held out %d of %d rows for eval (seed %d)", held, len(rows), cfg.seed)
    return shuffled[held:], shuffled[:held]


def _read_rows(source: str, cfg: RunConfig) -> list:
    report = load_conversations(source, cfg.data_format, cfg.data_columns, cfg.skip_bad_rows)
    if report.errors:
        log.warning("%s: skipped %d bad rows, as asked (skip_bad_rows); first problems:\n%s",
                    source, report.bad_rows, report.summary(max_errors=5))
    log.info("%s: %d rows in %s format", source, report.row_count, report.format)
    return report.rows


def _tokenise(rows, tokenizer, template, cfg: RunConfig, split: str, run=None) -> list[dict]:
    texts = [row for row in rows if row.is_text]
    progress = Progress(run, f"tokenising the {split} data", len(texts or rows))
    if texts:  # continued pre-training: every token trained, rows packed into full blocks
        blocks = pack((text_tokens(tokenizer, row.text) for row in progress.iterate(texts)),
                      cfg.max_seq_len)
        progress.done(f"tokenised {len(texts):,} {split} text rows")
        log.info("%d %s text rows packed into %d blocks of up to %d tokens",
                 len(texts), split, len(blocks), cfg.max_seq_len)
        return blocks
    examples, cut, empty = [], 0, 0
    for row in progress.iterate(rows):
        example = encode(tokenizer, template, row.messages, cfg.max_seq_len)
        cut += example.pop("length") > cfg.max_seq_len
        if all(label == IGNORE_INDEX for label in example["labels"]):
            empty += 1  # truncation removed every answer token: nothing to learn from this row
            continue
        examples.append(example)
    progress.done(f"tokenised {len(rows):,} {split} rows")
    if cut:
        log.warning("%d %s rows are longer than max_seq_len=%d and were cut", cut, split, cfg.max_seq_len)
    if empty:
        log.warning("%d %s rows were skipped: no answer tokens left within max_seq_len", empty, split)
    if not examples:
        raise DataError(f"no {split} row has answer tokens within max_seq_len={cfg.max_seq_len}: "
                        "raise max_seq_len or shorten the prompts")
    return examples


def _replica_checksums() -> list:
    folder = os.environ.get(distributed.CHECKSUMS_ENV, "")
    return [distributed.replica_checksums(folder)] if folder else []


def _fail(run: RunDir, message: str) -> str:
    log.error(message)
    try:
        run.write_status(state="failed", message=message, error=message)
    except OSError:
        pass  # a full disk: the log line above and the dead pid still tell the UI it failed
    return "failed"
