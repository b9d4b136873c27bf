"""A run on several processes (DDP): one per GPU, on one machine or several.

We write no distributed engine of our own: torchrun (torch.distributed.run) starts the processes
and transformers' Trainer, through accelerate, makes them one data-parallel run (NCCL between GPUs,
gloo between CPU processes). What is ours is what keeps the run directory's contract:

- The process the job runner spawned is the *launcher*: it starts torchrun, waits for it, and
  tells the run's end when a process died without saying why (`launch_and_wait`).
- Only the main process (rank 0) writes the run directory; the others see it through a
  `ReplicaRunDir`, which reads like the run and writes nothing.
- A decision only the main process can take (a stop was asked for, a wall-clock checkpoint is
  due) is broadcast to all of them (`main_process_decides`): every process must stop and save
  at the same step, or the others wait forever in the next gradient exchange.
- The launcher picks the strategy once (engine/fsdp.py: DDP or FSDP-QLoRA), records it, and
  keeps it for every resume: a checkpoint written sharded is read back sharded.
- A GPU out-of-memory in a step of any process ends them all (torchrun stops the rest); the
  launcher then halves the micro-batch, as one process does, and the run goes on from its last
  checkpoint in a fresh launcher (`OOM_IN_STEP`, runner.after_training).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

from engine import fsdp
from engine.config import RunConfig
from engine.paths import PROJECT_DIR
from engine.rundir import RunDir, process_created

log = logging.getLogger("engine.train")
CHECKSUMS_ENV = "QLS_TEST_REPLICA_SUMS"  # a folder: each process writes its LoRA sums per step
GONE = "ended without saying why"  # RunDir.read_status's words for a process that died silently
REPLICA_FAILED = "this training process failed:"  # how a replica's failure reads in train.log
OOM_IN_STEP = "this training process ran out of GPU memory in a step:"  # any rank, in train.log


def rank() -> int:
    """This process's number among all of the run's processes (0: the main one, or the only)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_processes() -> int:
    """The run's processes on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


class ReplicaRunDir(RunDir):
    """The run directory as a process other than the main one sees it: it reads (config, stop,
    checkpoints) and writes nothing, so status.json and metrics.jsonl keep one writer."""

    def write_status(self, **changes) -> dict:
        if changes.get("state") == "failed":  # the launcher finds this in train.log
            log.error("%s %s", REPLICA_FAILED, changes.get("error") or changes.get("message"))
        return changes

    def write_launch(self, **changes) -> dict:
        return changes

    def append_metric(self, record: dict) -> None:
        pass

    def drop_metrics_after(self, step: int) -> int:
        return 0


def run_dir_for_this_process(path) -> RunDir:
    return RunDir(path) if is_main_process() else ReplicaRunDir(path)


def main_process_decides(*flags: bool) -> tuple[bool, ...]:
    """The main process's values of `flags` in every process (unchanged in a single process)."""
    import torch.distributed as dist

    if world_size() == 1 or not (dist.is_available() and dist.is_initialized()):
        return flags
    values = list(flags)
    dist.broadcast_object_list(values, src=0)
    return tuple(values)


# --- the launcher --------------------------------------------------------------------------------

def torchrun_command(cfg: RunConfig, run: RunDir, resume: bool, background: bool) -> list[str]:
    """torchrun starting `python -m engine train RUN_DIR --worker` once per process here."""
    command = [sys.executable, "-m", "torch.distributed.run",
               "--nproc-per-node", str(cfg.processes_here())]
    if cfg.num_machines == 1:
        command.append("--standalone")  # a free port on this machine: two runs never collide
    else:
        command += ["--nnodes", str(cfg.num_machines), "--node-rank", str(cfg.machine_rank),
                    "--master-addr", cfg.main_process_ip,
                    "--master-port", str(cfg.main_process_port)]
    command += ["-m", "engine", "train", str(run.path.resolve()), "--worker"]
    return command + (["--resume"] if resume else []) + (["--background"] if background else [])


def launch_and_wait(run: RunDir, cfg: RunConfig, resume: bool, background: bool) -> str:
    """Train the run in its processes and wait for them; the run's final state. A stop signal to
    this process (Stop's SIGTERM, Ctrl-C) becomes a stop request that every process honours."""
    for sig in [signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGBREAK", None)]:
        if sig is not None:
            signal.signal(sig, lambda *_: run.request_stop())
    command = torchrun_command(cfg, run, resume, background)
    strategy = _strategy_of(run, cfg, resume)
    log.info("starting %d training processes here (%s, %s): %s", cfg.processes_here(),
             f"machine {cfg.machine_rank} of {cfg.num_machines}", strategy, " ".join(command))
    log_start = run.log_path.stat().st_size if run.log_path.exists() else 0
    # A session of its own: Ctrl-C at a terminal reaches this process only, which turns it into a
    # stop request; torchrun itself would end the processes at once, losing the step's work.
    process = subprocess.Popen(command, cwd=PROJECT_DIR, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, **{fsdp.STRATEGY_ENV: strategy}),
                               start_new_session=sys.platform != "win32")
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:  # Windows has no sessions: Ctrl-C lands here as well
            run.request_stop()
    if code != 0 and OOM_IN_STEP in _log_since(run, log_start):
        from engine.train import _retry_with_half_batch

        log.warning("a training process ran out of GPU memory in a step: all of them stopped")
        pid = os.getpid()  # the run is this launcher's until the next one takes it over
        run.write_status(state="running", pid=pid, pid_created=process_created(pid))
        return _retry_with_half_batch(run, cfg)  # RETRYING: runner.after_training goes on
    return _outcome(run, code, cfg.processes_here())


def _strategy_of(run: RunDir, cfg: RunConfig, resume: bool) -> str:
    """The strategy the run's processes take, recorded in launch.json: the one its checkpoints
    were written with on a resume (DDP and FSDP checkpoints differ), else chosen now."""
    recorded = run.read_status().get("strategy")
    if resume and recorded and run.latest_checkpoint() is not None:
        return recorded
    free_gbs = [gpu.free_gb for gpu in _run_gpus(run)] if cfg.device != "cpu" else []
    strategy, why = fsdp.choose(cfg, free_gbs)
    log.info("strategy %s: %s", strategy, why)
    # launch.json is the runner's record, and this launcher is the runner's side. Its one write
    # comes right after the runner spawned it, when the runner has done its own (the recipe,
    # which imports this module, must not import the job queue and its lock).
    run.write_launch(strategy=strategy, strategy_why=why)
    return strategy


def _run_gpus(run: RunDir) -> list:
    """The GPUs the runner recorded for the run, as NVML sees them now."""
    from engine.hardware import detect_gpus

    held = run.read_status().get("gpus") or []
    return [gpu for gpu in detect_gpus()[0] if gpu.index in held]


def _log_since(run: RunDir, offset: int) -> str:
    """train.log from `offset` on: what this launch's processes wrote."""
    try:
        with open(run.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _outcome(run: RunDir, exit_code: int, processes: int) -> str:
    """The state the main process reported for this launch; failed with the reason when another
    process failed (the main one then reports only its own symptom: a broken connection) or when
    the processes ended without an end state (killed, crashed, could not start)."""
    status = run.read_status()
    # A main process that died without an end state reads as failed "without saying why": that
    # is no reported end, and the reason may be another process's.
    said = status.get("launch") == run.latest_launch() and GONE not in status.get("message", "")
    state = status.get("state") if said else None
    if state in ("finished", "stopped") or (state == "failed" and exit_code == 0):
        return state  # the adapter is saved: a process failing after that changes nothing
    reason = _replica_failure(run)
    if state == "failed" and not reason:
        return state
    if not reason:
        reason = (f"a process ended without a word (exit code {exit_code}: killed, crashed "
                  "or out of memory)")
    message = f"one of the {processes} training processes failed: {reason}"
    log.error(message)
    run.write_status(state="failed", message=message,
                     error=f"{message}. Last log lines:\n{run.log_tail(8)}")
    return "failed"


def _replica_failure(run: RunDir) -> str:
    """The first failure a process other than the main one logged (ReplicaRunDir), with its rank."""
    for line in run.log_tail(400).splitlines():
        if REPLICA_FAILED in line and "[rank " in line:
            where = line[line.index("[rank "):].split("]", 1)[0] + "]"
            return f"{where.strip('[]')}: {line.split(REPLICA_FAILED, 1)[1].strip()}"
    return ""


def replica_checksums(folder: str):
    """Test and diagnosis only (QLS_TEST_REPLICA_SUMS=folder): a callback with which each process
    appends the sum of its LoRA weights (whole, also when sharded) after every step to
    rank-N.jsonl; in a healthy run all processes write the same numbers. With probe.json in the
    folder (lists of token ids), each process also writes the model's greedy continuations of
    them at the end of training to rank-N-answers.json: what the trained model answers there."""
    from transformers import TrainerCallback

    def whole(param):
        return param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP's shards

    class ReplicaChecksums(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            total = sum(float(whole(p.detach()).double().sum()) for p in model.parameters()
                        if p.requires_grad)
            with open(os.path.join(folder, f"rank-{rank()}.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, "sum": total}) + "\n")

        def on_train_end(self, args, state, control, model=None, **kwargs):
            probe = os.path.join(folder, "probe.json")
            if os.path.exists(probe):
                with open(probe, encoding="utf-8") as fh:
                    answers = greedy_answers(model, json.load(fh))
                with open(os.path.join(folder, f"rank-{rank()}-answers.json"), "w") as fh:
                    json.dump(answers, fh)

    return ReplicaChecksums()


def greedy_answers(model, prompts: list[list[int]], new_tokens: int = 12) -> list[list[int]]:
    """The token ids the model picks greedily after each prompt, one whole forward pass per token
    (no KV cache: the plainest computation, alike in every process and in one unsharded).
    Every process of a sharded model must call it alike: each pass gathers the weights."""
    import torch

    training = model.training
    model.eval()
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=next(model.parameters()).device)
            for _ in range(new_tokens):
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            answers.append(ids[0, len(prompt):].tolist())
    model.train(training)
    return answers
