"""The QLoRA training recipe, top to bottom: runs in its own process on one run directory.

    python -m engine train RUN_DIR        (what the job runner spawns)

Load the 4-bit base model, add LoRA to every linear layer, tokenise the conversations with loss
on assistant tokens only, and hand all of it to transformers' Trainer. The callback below is the
only bridge to the UI: it writes status.json and metrics.jsonl and honours stop requests.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import traceback

import psutil
from transformers import PrinterCallback, TrainerCallback

from engine.config import ConfigError, RunConfig
from engine.data import DataError, load_conversations
from engine.models import (
    ModelError,
    compute_dtype,
    load_quantized_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from engine.rundir import RunDir, process_created
from engine.templates import IGNORE_INDEX, TemplateError, encode, get_template

log = logging.getLogger("engine.train")
TEMPLATE_FILE = "prompt_template.json"
KNOWN_ERRORS = (ConfigError, DataError, ModelError, TemplateError)


def run_training(run_dir: str, resume: bool = False) -> str:
    """Train one run to its end; returns the final state (finished, stopped or failed)."""
    run = RunDir(run_dir)
    pid = psutil.Process().pid
    run.write_status(state="running", pid=pid, pid_created=process_created(pid),
                     started=time.time(), message="loading the model", error="")
    # A plain `kill` (SIGTERM) or Ctrl-C is a stop request: save, then exit, like the Stop button.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: run.request_stop())
    try:
        cfg = RunConfig.load(run.config_path).validate()
        state = _train(run, cfg, resume)
    except KNOWN_ERRORS as exc:
        return _fail(run, str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else still ends as a readable status
        if _is_out_of_memory(exc):
            return _fail(run, _oom_message(run))
        log.error("unexpected error:\n%s", traceback.format_exc())
        return _fail(run, f"unexpected error: {type(exc).__name__}: {exc} (details in train.log)")
    return state


def _train(run: RunDir, cfg: RunConfig, resume: bool) -> str:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.compute_dtype, device)
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    template = get_template(cfg.template, tokenizer)

    train_rows, eval_rows = _split(cfg)
    train_set = Dataset.from_list(_tokenise(train_rows, tokenizer, template, cfg, "training"))
    eval_set = Dataset.from_list(_tokenise(eval_rows, tokenizer, template, cfg, "eval")) if eval_rows else None

    model = load_quantized_model(source, cfg.quant_type, cfg.double_quant, dtype, device,
                                 cfg.trust_remote_code)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)

    optimizer = cfg.optimizer
    if optimizer == "auto":
        # Paged optimizers need CUDA unified memory; on CPU there is nothing to page to.
        optimizer = "paged_adamw_32bit" if device == "cuda" else "adamw_torch"
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
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if eval_set is not None else "no",
        eval_steps=max(1, cfg.save_steps // 2) if eval_set is not None else None,
        include_num_input_tokens_seen="non_padding",
        use_cpu=device == "cpu",
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
    )
    callback = StudioCallback(run, device)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # our callback already logs each step, readably
    run.write_status(message=f"training on {device} with {optimizer}, compute {str(dtype)[6:]}",
                     device=device, optimizer=optimizer)
    checkpoint = run.latest_checkpoint() if resume else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    model.save_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(run.adapter_dir)
    (run.adapter_dir / TEMPLATE_FILE).write_text(json.dumps(
        {"template": cfg.template, "base_model": cfg.model, "base_source": source}, indent=1))
    stopped = callback.stop_seen
    state = "stopped" if stopped else "finished"
    message = (f"stopped at step {trainer.state.global_step}; adapter saved" if stopped
               else f"finished {trainer.state.global_step} steps; adapter saved")
    run.write_status(state=state, message=message, step=trainer.state.global_step, eta_s=0)
    log.info(message)
    return state


def _split(cfg: RunConfig):
    rows = [row.messages for row in load_conversations(cfg.data_path).rows]
    if cfg.eval_data_path:
        return rows, [row.messages for row in load_conversations(cfg.eval_data_path).rows]
    if cfg.eval_share <= 0 or len(rows) < 10:
        return rows, []
    import random

    shuffled = rows[:]
    random.Random(cfg.seed).shuffle(shuffled)
    held = max(1, int(len(rows) * cfg.eval_share))
    return shuffled[held:], shuffled[:held]


def _tokenise(rows, tokenizer, template, cfg: RunConfig, split: str) -> list[dict]:
    examples, cut, empty = [], 0, 0
    for messages in rows:
        example = encode(tokenizer, template, messages, cfg.max_seq_len)
        cut += example.pop("length") > cfg.max_seq_len
        if all(label == IGNORE_INDEX for label in example["labels"]):
            empty += 1  # truncation removed every answer token: nothing to learn from this row
            continue
        examples.append(example)
    if cut:
        log.warning("%d %s rows are longer than max_seq_len=%d and were cut", cut, split, cfg.max_seq_len)
    if empty:
        log.warning("%d %s rows were skipped: no answer tokens left within max_seq_len", empty, split)
    if not examples:
        raise DataError(f"no {split} row has answer tokens within max_seq_len={cfg.max_seq_len}: "
                        "raise max_seq_len or shorten the prompts")
    return examples


def _fail(run: RunDir, message: str) -> str:
    log.error(message)
    run.write_status(state="failed", message=message, error=message)
    return "failed"


def _is_out_of_memory(exc: Exception) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _oom_message(run: RunDir) -> str:
    try:
        cfg = RunConfig.load(run.config_path)
        step = run.read_status().get("step", 0)
        return (f"GPU out of memory at step {step} with sequence length {cfg.max_seq_len} and "
                f"micro-batch {cfg.micro_batch_size}: lower max_seq_len to {cfg.max_seq_len // 2} "
                "or the micro-batch to 1 (raise gradient accumulation to keep the effective batch)")
    except ConfigError:
        return "out of memory: lower the sequence length or the micro-batch"


class StudioCallback(TrainerCallback):
    """Writes status.json and metrics.jsonl for the UI and turns stop requests into a clean stop."""

    def __init__(self, run: RunDir, device: str):
        self.run = run
        self.device = device
        self.stop_seen = False
        self.started = time.time()
        self.last_log = (self.started, 0)  # (time, tokens seen) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        self.last_log = (self.started, state.num_input_tokens_seen)
        self.run.write_status(step=state.global_step, total_steps=state.max_steps, elapsed_s=0)

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.time() - self.started
        done = max(state.global_step, 1)
        eta = elapsed / done * (state.max_steps - state.global_step)
        if self.run.stop_requested() and not self.stop_seen:
            self.stop_seen = True
            control.should_training_stop = True
            control.should_save = True  # Trainer writes a checkpoint before it returns
            self.run.write_status(state="stopping", message="stopping: saving the adapter")
        self.run.write_status(step=state.global_step, total_steps=state.max_steps,
                              epoch=state.epoch, elapsed_s=round(elapsed, 1),
                              eta_s=None if math.isnan(eta) else round(eta, 1))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary, not a step
        now = time.time()
        last_time, last_tokens = self.last_log
        tokens = state.num_input_tokens_seen
        self.last_log = (now, tokens)
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0, 4),
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_s": round((tokens - last_tokens) / max(now - last_time, 1e-6), 1)
            if "loss" in logs else None,
            "gpu_mem_gb": _gpu_memory_gb() if self.device == "cuda" else None,
            "ram_gb": round(psutil.Process().memory_info().rss / 1024**3, 2),
            "time": round(now, 2),
        }
        self.run.append_metric(record)
        log.info("step %s: %s", state.global_step,
                 ", ".join(f"{k}={v}" for k, v in record.items() if v is not None and k != "time"))


def _gpu_memory_gb() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1024**3, 2)
