"""Chat with a tuned run (base model in 4-bit + its LoRA adapter) or with a bare base model.

The prompt is rendered by the same template object that rendered the training data, read back
from the run's adapter folder, so chat sees exactly the format the run trained with.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from engine import hardware
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


class GpuBusyError(ModelError):
    """Chat would load onto the GPU one of our runs trains on; it has to wait for that run."""


class ChatModel:
    def __init__(self, run_dir: str | Path | None = None, base_model: str = "embedded",
                 template: str | None = None, device: str = "auto"):
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
        with on_gpu:  # compute_dtype asks the current GPU whether it has bf16
            dtype, _ = compute_dtype("auto", self.device.split(":")[0])
        if run_dir is not None:
            adapter = RunDir(run_dir).adapter_dir
            info_path = adapter / TEMPLATE_FILE
            if not info_path.is_file():
                raise ModelError(f"run {Path(run_dir).name} has no saved adapter yet: "
                                 "wait for it to finish or stop it (stop saves the adapter)")
            info = json.loads(info_path.read_text())
            base_model, template = info["base_model"], template or info["template"]
            self.tokenizer = load_tokenizer(str(adapter))
        source = resolve_model(base_model)
        if run_dir is None:
            self.tokenizer = load_tokenizer(source)
            template = template or ("model" if self.tokenizer.chat_template else "guanaco")
        self.template = get_template(template, self.tokenizer)
        model = load_quantized_model(source, "nf4", True, dtype, self.device)
        if run_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()
        self.label = f"run {Path(run_dir).name}" if run_dir else f"base model {base_model}"
        self._torch = torch

    def stream(self, messages: list[dict], temperature: float = 0.7, top_p: float = 0.9,
               max_new_tokens: int = 256) -> Iterator[str]:
        """Yield the reply so far, growing, until the model stops or the token budget is spent."""
        from transformers import TextIteratorStreamer

        prompt = self.template.render(messages, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt",
                                add_special_tokens=self.template.add_special_tokens).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
            if temperature > 0 else {"do_sample": False}
        kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id, **sampling)
        if self.template.stop_strings:
            kwargs.update(stop_strings=self.template.stop_strings, tokenizer=self.tokenizer)
        errors = []

        def generate():
            try:
                with self._torch.inference_mode():
                    self.model.generate(**kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            visible, stopped = _cut_at_stop(text, self.template.stop_strings)
            yield visible.strip()
            if stopped:
                break
        worker.join()
        if errors:
            raise errors[0]

    def reply(self, messages: list[dict], **kwargs) -> str:
        answer = ""
        for answer in self.stream(messages, **kwargs):
            pass
        return answer


def _chat_gpu() -> Gpu | None:
    """Where chat loads: the GPU with the most free memory that none of our runs trains on."""
    from engine.runner import active_run

    gpus = visible_gpus(hardware.detect_gpus()[0])
    run = active_run()
    held = _gpus_of(run, gpus) if run is not None else set()
    free = [gpu for gpu in gpus if gpu.index not in held]
    if held and not free:
        where = f"GPU {min(held)}" if len(held) == 1 else "the GPU"
        raise GpuBusyError(f"run {run.name} is training on {where}, and a chat model next to it "
                           "could run it out of memory; chat loads once that run stops or finishes")
    return pick_gpu(free)


def _gpus_of(run: RunDir, gpus: list[Gpu]) -> set[int]:
    """The GPU indices an active run trains on: the one its status records; all of them when it
    recorded none (started by an older version); none when it trains on the CPU."""
    status = run.read_status()
    if status.get("device") == "cpu":
        return set()
    if status.get("gpu") is not None:
        return {status["gpu"]}
    if "gpu" in status:  # the runner recorded that it gave the run no GPU
        return set()
    return {gpu.index for gpu in gpus}


# --- the one chat model this process holds --------------------------------------------------------
# Held here rather than in the UI so that starting a run (engine.runner) can free its GPU memory,
# and the memory planner can count that memory as free.

_shared: dict = {}  # {"key": (run dir, base model), "model": ChatModel}
_shared_lock = threading.RLock()


def load_shared(run_dir: str | Path | None = None, base_model: str = "embedded") -> ChatModel:
    """The held chat model if it is this target; otherwise free the held one first, then load."""
    key = (str(Path(run_dir).resolve()), None) if run_dir is not None else (None, base_model)
    with _shared_lock:
        if _shared.get("key") != key:
            unload_shared()  # two models at once may not fit the card
            _shared.update(key=key, model=ChatModel(run_dir=run_dir, base_model=base_model))
        return _shared["model"]


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
