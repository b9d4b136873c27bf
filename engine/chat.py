"""Chat with a tuned run beside its base model, from one base model in memory.

The base is loaded the way the run trained it (its config's 4-bit type, double quantization,
compute dtype and trust_remote_code) and the run's LoRA adapter goes on top (peft). The base
model's own answer comes from the same model with the adapter switched off, and another run on the
same base, loaded the same way, swaps only the adapter. Prompts are rendered by the template the
run trained with, read back from its adapter folder, so chat sees exactly the training format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import hardware
from engine.config import ConfigError, RunConfig
from engine.faults import is_out_of_memory
from engine.hardware import GIB, Gpu, cuda_index, pick_gpu, visible_gpus
from engine.models import (
    ModelError,
    compute_dtype,
    free_memory,
    load_quantized_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from engine.rundir import TEMPLATE_FILE, RunDir
from engine.templates import get_template

log = logging.getLogger(__name__)
# status.json's record of the dtype a run computed in, as a RunConfig compute_dtype value
TRAINED_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class GpuBusyError(ModelError):
    """Chat would load onto the GPU one of our runs trains on; it has to wait for that run."""


class ChatError(ModelError):
    """Generating an answer failed (out of memory, a bad setting); the message says what to do."""


@dataclass(frozen=True)
class BaseSettings:
    """How a base model is loaded. Runs share one loaded base only when all of these match."""
    model: str
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Target:
    """What chat answers with: a run's adapter on its base, or the bare base (run_dir None)."""
    base: BaseSettings
    run_dir: Path | None = None
    template: str | None = None  # None: the base's own chat template where it has one, else guanaco

    @property
    def label(self) -> str:
        return f"run {self.run_dir.name}" if self.run_dir else f"base model {self.base.model}"


def target_of(run_dir: str | Path | None = None, base_model: str = "embedded",
              template: str | None = None) -> Target:
    """The target for a run (its adapter, template and loading settings) or a bare base model;
    reads only small files, so it is cheap and loads nothing."""
    if run_dir is None:
        return Target(BaseSettings(base_model), None, template)
    run = RunDir(run_dir)
    info_path = run.adapter_dir / TEMPLATE_FILE
    if not info_path.is_file():
        raise ModelError(f"run {run.name} has no saved adapter yet: wait for it to finish or stop "
                         "it (stop saves the adapter)")
    try:
        info = json.loads(info_path.read_text())
        cfg = RunConfig.load(run.config_path) if run.config_path.is_file() else RunConfig()
    except (ValueError, ConfigError) as exc:
        raise ModelError(f"run {run.name}'s saved settings cannot be read ({exc}): "
                         "its folder is damaged, train it again") from None
    dtype = cfg.compute_dtype
    if dtype == "auto":  # what auto chose for the run: on a CPU a measurement, which can vary
        dtype = TRAINED_DTYPES.get(run.read_status().get("compute_dtype"), dtype)
    base = BaseSettings(info["base_model"], cfg.quant_type, cfg.double_quant, dtype,
                        cfg.trust_remote_code)
    return Target(base, Path(run_dir).resolve(), template or info["template"])


class ChatModel:
    """One base model in memory, with at most one run's adapter on it."""

    def __init__(self, run_dir: str | Path | None = None, base_model: str = "embedded",
                 template: str | None = None, device: str = "auto"):
        target = target_of(run_dir, base_model, template)
        # Before CUDA starts in this process, so torch numbers GPUs as nvidia-smi (NVML) does.
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        self.device = pick_device(device)
        self.gpu_index = None  # nvidia-smi's index of the GPU this model is on
        gpu = _chat_gpu() if self.device == "cuda" else None  # GpuBusyError before anything loads
        import torch

        on_gpu = contextlib.nullcontext()
        if gpu is not None:
            self.gpu_index = gpu.index
            self.device = f"cuda:{cuda_index(gpu)}"
            on_gpu = torch.cuda.device(self.device)
        settings = self.settings = target.base
        with on_gpu:  # compute_dtype asks the current GPU whether it has bf16
            self.dtype, _ = compute_dtype(settings.compute_dtype, self.device.split(":")[0])
        self.source = resolve_model(settings.model)
        try:
            self.base = load_quantized_model(self.source, settings.quant_type,
                                             settings.double_quant, self.dtype, self.device,
                                             settings.trust_remote_code).eval()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            where = f"GPU {self.gpu_index}" if gpu is not None else "this computer"
            message = (f"{settings.model} does not fit into the free memory of {where}: close "
                       "other programs that use it, or chat with a smaller model")
        else:
            message = None
        if message:  # outside the except block, whose frames hold the half-loaded weights
            free_memory()
            raise ModelError(message)
        self.model = self.base  # a PeftModel around it once a run's adapter is loaded
        self.adapter_run: Path | None = None  # the run whose adapter is loaded
        self.adapters_loaded = 0
        self._generating = threading.Lock()  # one answer at a time: adapters switch model-wide
        self._torch = torch
        self.use(target)

    def use(self, target: Target) -> None:
        """Answer as this target from now on: the base stays, only the adapter is swapped."""
        if target.base != self.settings:
            raise ValueError(f"{target.label} needs its base loaded differently: load it anew")
        source = str(RunDir(target.run_dir).adapter_dir) if target.run_dir else self.source
        tokenizer = load_tokenizer(source, self.settings.trust_remote_code)
        name = target.template or ("model" if tokenizer.chat_template else "guanaco")
        template = get_template(name, tokenizer)  # a TemplateError before anything changes
        with self._generating:
            if target.run_dir is not None and target.run_dir != self.adapter_run:
                self._load_adapter(target.run_dir)
            self.tokenizer, self.template, self.run_dir = tokenizer, template, target.run_dir
            self.label = target.label

    def _load_adapter(self, run_dir: Path) -> None:
        """Put the run's adapter on the base in place of the one there; the base stays loaded."""
        from peft import PeftModel
        from safetensors import SafetensorError

        self.adapters_loaded += 1
        name = f"run{self.adapters_loaded}"  # peft names become module names: no dots allowed
        path = str(RunDir(run_dir).adapter_dir)
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                self.model.delete_adapter(name)  # half loaded: the one in use stays as it was
            raise ModelError(f"the adapter of run {run_dir.name} cannot be loaded ({exc}): it is "
                             "damaged or incomplete; train the run again") from None
        self.model.set_adapter(name, inference_mode=True)
        for old in [old for old in self.model.peft_config if old != name]:
            self.model.delete_adapter(old)  # one adapter in memory at a time
        self.adapter_run = run_dir

    def stream(self, messages: list[dict], temperature: float = 0.0, top_p: float = 0.9,
               max_new_tokens: int = 256, top_k: int = 0, repetition_penalty: float = 1.0,
               tuned: bool = True, stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply so far, growing, until the model ends it, the token budget is spent or
        `stop` is set. tuned=False: the base model's reply (the adapter switched off). Greedy at
        temperature 0, so the same question gets the same answer."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        torch, template = self._torch, self.template
        prompt = template.render(messages, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt",
                                add_special_tokens=template.add_special_tokens).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        halted = threading.Event()  # the caller stopped reading (or asked to stop)

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = halted.is_set() or (stop is not None and stop.is_set())
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                                  device=input_ids.device)

        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p,
                        "top_k": int(top_k)}
        kwargs = dict(**inputs, max_new_tokens=int(max_new_tokens), streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id,
                      repetition_penalty=repetition_penalty,
                      stopping_criteria=StoppingCriteriaList([Halt()]), **sampling)
        if template.stop_strings:
            kwargs.update(stop_strings=template.stop_strings, tokenizer=self.tokenizer)
        asked_run, errors = self.run_dir, []

        def generate():
            try:
                with self._generating, torch.inference_mode():
                    if self.run_dir != asked_run:  # another tab switched the model meanwhile
                        raise ChatError("the chat model was switched to another run while this "
                                        "answer waited: ask again")
                    with self._adapter_off(not tuned or asked_run is None):
                        self.model.generate(**kwargs)
            except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, name="chat-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                visible, ended = _cut_at_stop(text, template.stop_strings)
                yield visible.strip()
                if ended:
                    break
        finally:  # also when the caller stops reading: generate ends at its next token
            halted.set()
            worker.join()
        if errors:
            raise self._explained(errors.pop())

    def _adapter_off(self, off: bool):
        from peft import PeftModel

        if off and isinstance(self.model, PeftModel):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _explained(self, exc: Exception) -> Exception:
        """A generation error as a ChatError that says what to do."""
        if isinstance(exc, ModelError):
            return exc
        # Logged as text: a log record holding the exception would keep its frames, and with
        # them the model, alive after an unload.
        log.warning("generation failed: %s", "".join(traceback.format_exception(exc)))
        exc.__traceback__ = None  # its frames hold the tensors of the failed step
        if is_out_of_memory(exc):
            free_memory()
            where = "the GPU" if self.device.startswith("cuda") else "this computer"
            return ChatError(f"{where} ran out of memory while answering: lower the max new "
                             "tokens, start a new conversation (a long one makes every answer "
                             "bigger), or close other programs that use it")
        if isinstance(exc, (RuntimeError, ValueError, TypeError, IndexError)):
            return ChatError(f"the model could not answer ({type(exc).__name__}: {exc}): try "
                             "other generation settings or a new conversation")
        return exc

    def reply(self, messages: list[dict], **kwargs) -> str:
        answer = ""
        for answer in self.stream(messages, **kwargs):
            pass
        return answer


def _chat_gpu() -> Gpu | None:
    """Where chat loads: the GPU with the most free memory that none of our runs trains on."""
    from engine.runs import gpu_holder

    gpus = visible_gpus(hardware.detect_gpus()[0])
    run = gpu_holder()  # a run of the app's, or one trained from the command line
    held = _gpus_of(run, gpus) if run is not None else set()
    free = [gpu for gpu in gpus if gpu.index not in held]
    if held and not free:
        where = f"GPU {min(held)}" if len(held) == 1 else "the GPU"
        raise GpuBusyError(f"run {run.name} is training on {where}, and a chat model next to it "
                           "could run it out of memory; chat loads once that run stops or finishes")
    return pick_gpu(free)


def _gpus_of(run: RunDir, gpus: list[Gpu]) -> set[int]:
    """The GPU indices an active run trains on: the ones its status records (several for a run on
    several processes); all of them when it recorded none (started by an older version); none
    when it trains on the CPU."""
    status = run.read_status()
    if status.get("device") == "cpu":
        return set()
    if status.get("gpus"):
        return set(status["gpus"])
    if status.get("gpu") is not None:
        return {status["gpu"]}
    if "gpu" in status:  # the runner recorded that it gave the run no GPU
        return set()
    return {gpu.index for gpu in gpus}


# --- the one chat model this process holds --------------------------------------------------------
# Held here rather than in the UI so that starting a run (engine.runner) can free its GPU memory,
# and the memory planner can count that memory as free.

_shared: dict = {}  # {"target": Target, "model": ChatModel}
_shared_lock = threading.RLock()


def load_shared(run_dir: str | Path | None = None, base_model: str = "embedded") -> ChatModel:
    """The held chat model, switched to this target: the held base with another adapter where
    the target's base is loaded the same way; otherwise the held one is freed first, then loaded."""
    target = target_of(run_dir, base_model)
    with _shared_lock:
        held = _shared.get("model")
        settings = getattr(held, "settings", None)
        if run_dir is None and settings is not None and settings.model == base_model:
            target = Target(settings)  # the bare base answers from the held one, however loaded
        if held is not None and _shared.get("target") == target:
            return held
        if held is not None and settings == target.base:
            held.use(target)
        else:
            del held
            unload_shared()  # two models at once may not fit the card
            held = ChatModel(run_dir=run_dir, base_model=base_model)
        _shared.update(target=target, model=held)
        return held


def unload_shared() -> str | None:
    """Free the held chat model; its label, or None when none was loaded. A reply still streaming
    keeps the model alive until it ends."""
    with _shared_lock:
        model = _shared.pop("model", None)
        _shared.clear()
        if model is None:
            return None
        label = model.label
        del model
        free_memory()
        return label


def unload_shared_report() -> str:
    """Free the held chat model and say how much memory that gave back: GPU memory on a GPU, this
    process's memory on the CPU."""
    import psutil

    device = str(getattr(_shared.get("model"), "device", "cpu"))
    on_gpu = device.startswith("cuda")

    def in_use() -> int:
        return (sys.modules["torch"].cuda.memory_allocated(device) if on_gpu
                else psutil.Process().memory_info().rss)

    before = in_use()
    label = unload_shared()
    if label is None:
        return "No chat model was loaded."
    freed_gb = (before - in_use()) / GIB
    if on_gpu:
        return f"Unloaded {label}: {freed_gb:.2f} GB of GPU memory freed."
    if freed_gb >= 0.01:
        return f"Unloaded {label}: this process uses {freed_gb:.2f} GB less memory."
    return (f"Unloaded {label}. The operating system has not taken the memory back yet (an answer "
            "still streaming keeps the model until it ends).")


def shared_gpu_index() -> int | None:
    """nvidia-smi's index of the GPU the held chat model is on; None without one, or on the CPU."""
    return getattr(_shared.get("model"), "gpu_index", None)


def shared_gpu_gb() -> float:
    """GPU memory (GB) this process holds for its chat model; 0.0 without one or without CUDA."""
    torch = sys.modules.get("torch")  # not imported: nothing was ever loaded here
    model = _shared.get("model")
    if model is None or torch is None or not torch.cuda.is_available():
        return 0.0
    device = str(getattr(model, "device", "cuda"))
    return torch.cuda.memory_reserved(device) / GIB if device.startswith("cuda") else 0.0


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string; a trailing partial stop string is held back, not shown."""
    for stop in stops:
        if stop in text:
            return text[: text.index(stop)], True
    for stop in stops:
        for size in range(len(stop) - 1, 0, -1):
            if text.endswith(stop[:size]):
                return text[:-size], False
    return text, False
