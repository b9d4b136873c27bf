"""Chat with a tuned run (base model in 4-bit + its LoRA adapter) or with a bare base model.

The prompt is rendered by the same template object that rendered the training data, read back
from the run's adapter folder, so chat sees exactly the format the run trained with.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

from engine.models import (
    ModelError,
    compute_dtype,
    load_quantized_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from engine.rundir import RunDir
from engine.templates import get_template
from engine.train import TEMPLATE_FILE


class ChatModel:
    def __init__(self, run_dir: str | Path | None = None, base_model: str = "embedded",
                 template: str | None = None, device: str = "auto"):
        import torch

        self.device = pick_device(device)
        dtype, _ = compute_dtype("auto", self.device)
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
