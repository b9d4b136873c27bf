"""The bridge between transformers' Trainer and the UI: a TrainerCallback that writes status.json
and metrics.jsonl, turns a stop request into a clean stop, checkpoints by wall time as well as by
steps, marks each checkpoint complete (or discards a broken one), and stops on a NaN/inf loss."""

from __future__ import annotations

import logging
import math
import shutil
import time

import psutil
from transformers import TrainerCallback

from engine import checkpoints
from engine.distributed import main_process_decides
from engine.progress import NO_PROGRESS
from engine.rundir import RunDir

log = logging.getLogger("engine.train")


class StudioCallback(TrainerCallback):
    """Writes status.json and metrics.jsonl for the UI, turns stop requests into a clean stop,
    checkpoints by wall time as well as by steps, marks checkpoints complete, and stops on NaN."""

    def __init__(self, run: RunDir, device: str, save_every_s: float = 600):
        self.run = run
        self.device = device
        self.save_every_s = save_every_s
        self.stop_seen = False
        self.bad_loss = ""
        self.started = self.last_save = time.time()
        self.first_step = 0
        self.last_log = (self.started, 0)  # (time, tokens seen) at the previous log
        self.saving_since = None  # when Trainer began writing a checkpoint
        self.saved = "saved"  # or "evaluated and saved": what the time until on_save covers
        self.busy_message = False  # a message that must go once its wait is over (evaluating)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_save = time.time()
        self.first_step = state.global_step  # above 0 on resume: the ETA counts this session's pace
        self.last_log = (self.started, state.num_input_tokens_seen)
        self.saving_since, self.busy_message = None, False
        # Before step 1 ends there is nothing to count: say why nothing moves yet.
        self.run.write_status(step=state.global_step, total_steps=state.max_steps, elapsed_s=0,
                              message=f"first training step (step {state.global_step + 1} of "
                              f"{state.max_steps}): warming up", **NO_PROGRESS)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        elapsed = now - self.started
        done = max(state.global_step - self.first_step, 1)
        eta = elapsed / done * (state.max_steps - state.global_step)
        save_due = now - self.last_save >= self.save_every_s
        # On several processes the main one's clock and stop.request decide for all of them:
        # a process that stopped or saved a step before the others would leave them waiting.
        stop, save_due = main_process_decides(self.run.stop_requested(), save_due)
        if save_due:
            control.should_save = True  # a slow run still never loses more than save_minutes
        if stop and not self.stop_seen:
            self.stop_seen = True
            control.should_training_stop = True
            control.should_save = True  # Trainer writes a checkpoint before it returns
            self.run.write_status(state="stopping", message="stopping: saving the adapter")
        self.run.write_status(step=state.global_step, total_steps=state.max_steps,
                              epoch=state.epoch, elapsed_s=round(elapsed, 1),
                              eta_s=None if math.isnan(eta) else round(eta, 1),
                              **self._step_message(state, control, now))

    def _step_message(self, state, control, now) -> dict:
        """What the status message becomes at this step's end: the first step's time, a checkpoint
        or evaluation about to be written (Trainer does both right after this callback), or
        plain training once such a wait is over; nothing while stopping."""
        if self.stop_seen:
            return {}
        step, total = state.global_step, state.max_steps
        message = None
        if step == self.first_step + 1:
            took = now - self.started
            log.info("first training step took %.1f s", took)
            message = f"training: step {step} of {total} (the first step took {took:.1f} s)"
        elif self.busy_message:
            message = f"training: step {step} of {total}"
        self.busy_message = False
        if control.should_save:
            self.saving_since = now
            self.saved = "evaluated and saved" if control.should_evaluate else "saved"
            name = f"{checkpoints.PREFIX}{step}"
            message = (f"evaluating, then saving {name}" if control.should_evaluate
                       else f"saving {name}")
        elif control.should_evaluate:
            self.busy_message = True
            message = f"evaluating at step {step} of {total}"
        return {"message": message} if message else {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.last_save = time.time()
        path = self.run.checkpoints_dir / f"{checkpoints.PREFIX}{state.global_step}"
        took = self.last_save - (self.saving_since or self.last_save)
        self.saving_since = None
        params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        if not state.is_world_process_zero:
            # The main process wrote the checkpoint and judges it; NaN weights, the same in every
            # process, must stop each of them at this step as they stop the main one.
            if not all(bool(p.detach().isfinite().all()) for p in params) and not self.bad_loss:
                self.bad_loss = f"the adapter weights became NaN/inf at step {state.global_step}"
                control.should_training_stop = True
            return
        problem = checkpoints.problem(path, params)
        if problem:
            # Never leave a checkpoint a resume could pick up that is broken or holds NaN weights.
            shutil.rmtree(path, ignore_errors=True)
            log.error("checkpoint %s discarded: %s", path.name, problem)
            self.busy_message = True  # "saving checkpoint-N" goes at the next step's end
            if "finite" in problem and not self.bad_loss:
                self.bad_loss = f"the adapter weights became NaN/inf at step {state.global_step}"
                control.should_training_stop = True
            return
        checkpoints.mark_complete(path)
        log.info("%s %s in %.1f s", self.saved, path.name, took)
        if not self.stop_seen:  # written: "saving checkpoint-N" goes
            self.run.write_status(message=f"training: step {state.global_step} of "
                                  f"{state.max_steps} ({self.saved} {path.name} in {took:.1f} s)")
        self.saved = "saved"

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary, not a step
        loss = logs.get("loss")
        if not checkpoints.finite(loss) and not self.bad_loss:
            # Every later step would be NaN too, and a checkpoint now would keep broken weights.
            # (The logged loss is the mean over all processes: each of them stops here.)
            self.bad_loss = f"the training loss became {loss} at step {state.global_step}"
            control.should_training_stop = True
            control.should_save = False
        if not state.is_world_process_zero:
            return  # one chart line per step, from the main process
        now = time.time()
        last_time, last_tokens = self.last_log
        tokens = state.num_input_tokens_seen
        self.last_log = (now, tokens)
        gpu_memory = _gpu_memory_gb() if self.device == "cuda" else (None, None)
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0, 4),
            "loss": loss if checkpoints.finite(loss) else None,
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm") if checkpoints.finite(logs.get("grad_norm")) else None,
            "tokens_per_s": round((tokens - last_tokens) / max(now - last_time, 1e-6), 1)
            if "loss" in logs else None,
            # Peak since the run began: allocated is what tensors hold, reserved what PyTorch's
            # caching allocator keeps from the card (what nvidia-smi and an OOM see).
            "gpu_mem_gb": gpu_memory[0],
            "gpu_reserved_gb": gpu_memory[1],
            "ram_gb": round(psutil.Process().memory_info().rss / 1024**3, 2),
            "time": round(now, 2),
        }
        self.run.append_metric(record)
        log.info("step %s: %s", state.global_step,
                 ", ".join(f"{k}={v}" for k, v in record.items() if v is not None and k != "time"))


def _gpu_memory_gb() -> tuple[float, float]:
    """Peak GPU memory in GB: (allocated by tensors, reserved by PyTorch's allocator)."""
    import torch

    return (round(torch.cuda.max_memory_allocated() / 1024**3, 2),
            round(torch.cuda.max_memory_reserved() / 1024**3, 2))
