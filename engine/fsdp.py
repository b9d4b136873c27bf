"""FSDP-QLoRA: a 4-bit model sharded over a run's processes, through Trainer and accelerate.

bitsandbytes stores the 4-bit codes in the compute dtype (`bnb_4bit_quant_storage`), so FSDP2
(`fully_shard`, accelerate's default) shards them like any other weight; transformers' Trainer
wraps the peft model, gathers what a step needs and writes sharded checkpoints (each process its
own part: a checkpoint of N processes resumes onto the same N). What is ours:

- which strategy a run on several processes takes (`choose`: the launcher decides once, from
  planner_multi, and hands the choice to every process in the environment);
- the Trainer arguments and the 4-bit storage dtype that go with it;
- the LoRA weights gathered whole at the end (`gathered_lora_weights`), so the main process saves
  a normal peft adapter that chat and export load on one GPU unchanged;
- FSDP on CPU processes (`allow_on_cpu`): accelerate turns FSDP on only for GPU backends and
  would silently train a CPU run as DDP instead, although FSDP2 itself runs on gloo. Trainer's
  evaluation is sound there only because train.keep_4bit_layout_for_training stops bitsandbytes
  from repacking the gathered 4-bit weights for its CPU inference kernel.
"""

from __future__ import annotations

import logging
import os

from engine.config import RunConfig

log = logging.getLogger("engine.train")
STRATEGY_ENV = "QLS_STRATEGY"  # the launcher's choice for every process: ddp, fsdp, fsdp-offload
OFFLOAD = "fsdp-offload"  # FSDP with its shards in CPU RAM


def choose(cfg: RunConfig, free_gbs: list[float]) -> tuple[str, str]:
    """(strategy, why) for a run on several processes: ddp, fsdp or fsdp-offload. free_gbs: the
    free GB of each of the run's GPUs ([] on the CPU). `auto` takes what
    planner_multi plans (run_layout, which the pre-flight check plans with too)."""
    from engine.planner_multi import run_layout

    if cfg.strategy != "auto":
        return cfg.strategy, f"{cfg.strategy} as asked"
    if not free_gbs:
        return "ddp", "CPU processes share one memory: sharding saves nothing there, so DDP"
    layout = run_layout(cfg, free_gbs)
    if layout is None:
        return "ddp", f"the size of {cfg.model} is unknown to the planner, so DDP"
    return (OFFLOAD if layout.cpu_offload else layout.strategy), layout.why


def strategy() -> str:
    """This process's share of the work: single (one process), ddp, fsdp or fsdp-offload."""
    from engine.distributed import world_size

    return os.environ.get(STRATEGY_ENV, "ddp") if world_size() > 1 else "single"


def sharded() -> bool:
    return strategy() in ("fsdp", OFFLOAD)


def quant_storage(dtype):
    """The dtype the 4-bit codes are stored in: the compute dtype when FSDP shards them (it
    flattens a unit's weights into one tensor of one dtype), else None (bitsandbytes' uint8)."""
    return dtype if sharded() else None


def trainer_arguments() -> dict:
    """TrainingArguments for this process's strategy (nothing unless sharded)."""
    if not sharded():
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2,
        # Each decoder layer is one unit (transformers' _no_split_modules names them; peft's
        # policy, applied by Trainer, adds the LoRA layers): gathered for its step, then freed.
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        "cpu_offload": strategy() == OFFLOAD,
        # Checkpoints: each process writes its own shards, in parallel, and reads them back.
        "state_dict_type": "SHARDED_STATE_DICT",
    }}


def allow_on_cpu(device: str) -> None:
    """Let accelerate shard a CPU run asked to: it sets up FSDP only for GPU backends and would
    otherwise train the processes as DDP without a word. Changes nothing but that case."""
    if device != "cpu" or not sharded():
        return
    from accelerate import state

    if getattr(state.AcceleratorState.__init__, "allows_fsdp_on_cpu", False):
        return
    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init.allows_fsdp_on_cpu = True
    state.AcceleratorState.__init__ = init


def gathered_lora_weights(model) -> dict | None:
    """The trained (LoRA) weights whole, in the main process, for peft's save_pretrained; every
    process must call it, as each holds a part. None when the model is not sharded."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Frozen weights stay where they are: gathering the 4-bit base would hold it whole in RAM.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
