"""Chat tab: talk to a finished or stopped run, or to the bare base model, with streaming replies."""

from __future__ import annotations

import gradio as gr

from app.hardware_tab import selected_model
from engine.chat import GpuBusyError, load_shared  # light: torch loads only when a model does
from engine.models import ModelError
from engine.runner import RunnerError, get_run, list_runs
from engine.templates import TemplateError

BASE = "__base__"


def target_choices() -> list[tuple[str, str]]:
    choices = [("Base model (chosen in the Hardware tab), not tuned", BASE)]
    for run in list_runs():
        status = run.read_status()
        if run.adapter_dir.joinpath("adapter_config.json").is_file():
            choices.append((f"{run.name} ({status.get('state')})", run.name))
    return choices


def default_target() -> str:
    choices = target_choices()
    return choices[1][1] if len(choices) > 1 else BASE


def refresh_targets():
    return gr.update(choices=target_choices(), value=default_target())


def get_model(target: str, base_model: str):
    """The engine's one shared chat model for this target (a start of training unloads it)."""
    if target == BASE:
        return load_shared(base_model=base_model)
    return load_shared(run_dir=get_run(target).path)


def respond(message, history, target, temperature, top_p, max_new_tokens, model_choice, custom_model):
    history = list(history or [])
    if not (message or "").strip():
        yield "", history
        return
    history.append({"role": "user", "content": message})
    try:
        model = get_model(target or BASE, selected_model(model_choice, custom_model))
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history
                    if not _text(m["content"]).startswith("⚠️")]
        for partial in model.stream(messages, temperature=temperature, top_p=top_p,
                                    max_new_tokens=int(max_new_tokens)):
            yield "", history + [{"role": "assistant", "content": partial}]
    except GpuBusyError as exc:
        text = (f"⚠️ Chat has to wait: {exc}. Stop that run in the Train tab, or ask again once "
                "it is done.")
        yield "", history + [{"role": "assistant", "content": text}]
    except (ModelError, RunnerError, TemplateError) as exc:
        yield "", history + [{"role": "assistant", "content": f"⚠️ {exc}"}]


def _text(content) -> str:
    """Gradio may hand message content back as a list of parts; chat needs the plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def build(hardware: dict) -> dict:
    with gr.Row():
        target = gr.Dropdown(choices=target_choices(), value=default_target(), label="Chat with", allow_custom_value=True,
                             elem_id="chat-target", scale=4)
        refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id="chat-refresh")
    chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chatbot")
    message = gr.Textbox(label="Message", placeholder="Ask something and press Enter",
                         elem_id="chat-input")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        clear = gr.Button("Clear")
    with gr.Accordion("Generation settings", open=False):
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
        max_new_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
    inputs = [message, chatbot, target, temperature, top_p, max_new_tokens,
              hardware["model"], hardware["custom_model"]]
    message.submit(respond, inputs, [message, chatbot], api_name="chat")
    send.click(respond, inputs, [message, chatbot], api_name=False)
    clear.click(lambda: [], outputs=chatbot, api_name=False)
    refresh.click(refresh_targets, outputs=target, api_name=False)
    return {"target": target, "refresh": refresh_targets}
