"""Chat tab: one question to a tuned run and to its base model, both answers streaming side by
side (one base model in memory, the run's adapter switched off for the base's answer), or a talk
with one model alone: a run, or the bare base model."""

from __future__ import annotations

import logging
import threading
import traceback

import gradio as gr

from app.errors import EXPECTED, in_words
from app.export_tab import run_choices  # the runs that saved an adapter, as both tabs list them
from app.hardware_tab import selected_model
from engine.chat import GpuBusyError, load_shared, unload_shared_report  # torch loads with a model
from engine.runner import get_run

BASE = "__base__"
STOPPED = " ⏹ (stopped)"  # ends an answer cut short by Stop; the model never sees it
WARNING = "⚠️"  # starts every message that is not a model's answer (as in_words writes them);
# such a message is never sent back to a model
log = logging.getLogger(__name__)
# Each browser session's stop request for the answers it is streaming now.
_stops: dict[str, threading.Event] = {}


def target_choices() -> list[tuple[str, str]]:
    return [("Base model (chosen in the Hardware tab), not tuned", BASE), *run_choices()]


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


def converse(message, base_history, history, target, side_by_side, system, temperature, top_p,
             top_k, repetition_penalty, max_new_tokens, model_choice, custom_model,
             request: gr.Request | None = None):
    """Yield (input box, base column, tuned column) while the answers stream: the base model's
    first (the run's adapter switched off), then the tuned one's. Each column keeps its own
    conversation, so the base goes on from its own answers."""
    base_history, history = list(base_history or []), list(history or [])
    if not (message or "").strip():
        yield "", base_history, history
        return
    target = target or BASE
    stop = threading.Event()
    if request is not None:
        _stops[request.session_hash] = stop
    columns = [(base_history, False)] if side_by_side and target != BASE else []
    columns.append((history, True))
    for column, _ in columns:
        column.append({"role": "user", "content": message})
    try:
        model = get_model(target, selected_model(model_choice, custom_model))
    except Exception as exc:  # noqa: BLE001 - every failure is a sentence in the chat
        for column, _ in columns:
            column.append({"role": "assistant", "content": _in_words(exc)})
        yield "", base_history, history
        return
    settings = dict(temperature=temperature, top_p=top_p, top_k=int(top_k),
                    repetition_penalty=repetition_penalty, max_new_tokens=int(max_new_tokens))
    for column, tuned in columns:
        question = _messages(system, column)
        column.append({"role": "assistant", "content": ""})
        if stop.is_set():
            column[-1]["content"] = f"{WARNING} Stopped before this model answered."
            continue
        try:
            for partial in model.stream(question, tuned=tuned, stop=stop, **settings):
                column[-1]["content"] = partial
                yield "", base_history, history
            if stop.is_set():
                column[-1]["content"] += STOPPED
        except Exception as exc:  # noqa: BLE001 - every failure is a sentence in the chat
            column[-1]["content"] = _in_words(exc)
    yield "", base_history, history


def _in_words(exc: Exception) -> str:
    if isinstance(exc, GpuBusyError):
        return (f"{WARNING} Chat has to wait: {exc}. Stop that run in the Train tab, or ask again "
                "once it is done.")
    if isinstance(exc, EXPECTED):  # the engine's errors (ChatError too), the file system's
        return in_words(exc)
    # as text: a record holding the exception would keep its frames (and the model) alive
    log.error("chat failed: %s", "".join(traceback.format_exception(exc)))
    return (f"{WARNING} Something unexpected went wrong ({type(exc).__name__}: {exc}). The app's "
            "log has the details.")


def _messages(system: str, history: list) -> list[dict]:
    """The conversation as the model gets it: the system prompt first; a question answered by a
    warning is left out with its warning, so the model never sees either."""
    turns = []
    for message in history:
        content = _text(message["content"])
        if message["role"] == "assistant" and content.startswith(WARNING):
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        turns.append({"role": message["role"], "content": content.removesuffix(STOPPED)})
    if (system or "").strip():
        turns.insert(0, {"role": "system", "content": system.strip()})
    return turns


def regenerate(base_history, history, target, side_by_side, system, temperature, top_p, top_k,
               repetition_penalty, max_new_tokens, model_choice, custom_model,
               request: gr.Request | None = None):
    """Ask the last question again, its old answers taken off both columns first."""
    history, base_history = list(history or []), list(base_history or [])
    last = _last_question(history)
    if last is None:
        yield base_history, history
        return
    message = _text(history[last]["content"])
    base_last = _last_question(base_history)
    if base_last is not None and _text(base_history[base_last]["content"]) == message:
        base_history = base_history[:base_last]
    settings = (target, side_by_side, system, temperature, top_p, top_k, repetition_penalty,
                max_new_tokens, model_choice, custom_model)
    for _, base_now, now in converse(message, base_history, history[:last], *settings, request):
        yield base_now, now


def _last_question(history: list) -> int | None:
    return next((i for i in range(len(history) - 1, -1, -1) if history[i]["role"] == "user"), None)


def stop_answers(request: gr.Request):
    event = _stops.get(request.session_hash)
    if event is not None:
        event.set()


def respond(message, history, target, temperature, top_p, max_new_tokens, model_choice,
            custom_model, request: gr.Request | None = None):
    """One model only (the API's "chat"): yield (input box, conversation)."""
    for box, _, now in converse(message, [], history, target, False, "", temperature, top_p, 0,
                                1.0, max_new_tokens, model_choice, custom_model, request):
        yield box, now


def _text(content) -> str:
    """Gradio may hand message content back as a list of parts; chat needs the plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _columns(target: str, side_by_side: bool):
    """Show the base column only beside a run, and name the other one after what answers in it."""
    alone = target == BASE or not target
    label = "Base model (not tuned)" if alone else f"Tuned: {target}"
    return gr.update(visible=bool(side_by_side) and not alone), gr.update(label=label)


def build(hardware: dict) -> dict:
    with gr.Row():
        target = gr.Dropdown(choices=target_choices(), value=default_target(), label="Chat with",
                             allow_custom_value=True, elem_id="chat-target", scale=4)
        refresh = gr.Button("Refresh list", size="sm", scale=1, elem_id="chat-refresh")
        unload = gr.Button("Unload", size="sm", scale=1, elem_id="chat-unload")
    side_by_side = gr.Checkbox(value=True, elem_id="chat-side-by-side",
                               label="Side by side with the base model (the same model with the "
                                     "run's adapter switched off)")
    system = gr.Textbox(label="System prompt (optional)", elem_id="chat-system")
    base_shown, tuned_label = _columns(default_target(), True)
    with gr.Row(equal_height=True):
        with gr.Column(visible=base_shown["visible"]) as base_column:
            base_chatbot = gr.Chatbot(label="Base model (adapter off)", height=380,
                                      elem_id="chatbot-base")
        chatbot = gr.Chatbot(label=tuned_label["label"], height=380, elem_id="chatbot")
    message = gr.Textbox(label="Message", placeholder="Ask something and press Enter",
                         elem_id="chat-input")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
        again = gr.Button("Regenerate", elem_id="chat-regenerate")
        clear = gr.Button("Clear", elem_id="chat-clear")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Accordion("Generation settings (temperature 0: greedy, the same answer each time)",
                      open=False):
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
        top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
        repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05,
                                       label="Repetition penalty (1 = off)")
        max_new_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")

    settings = [target, side_by_side, system, temperature, top_p, top_k, repetition_penalty,
                max_new_tokens, hardware["model"], hardware["custom_model"]]
    both = [base_chatbot, chatbot]
    message.submit(converse, [message, *both, *settings], [message, *both],
                   api_name="chat_side_by_side")
    send.click(converse, [message, *both, *settings], [message, *both], api_name=False)
    again.click(regenerate, [*both, *settings], both, api_name=False)
    stop.click(stop_answers, api_name=False)
    clear.click(lambda: ([], []), outputs=both, api_name=False)
    unload.click(unload_shared_report, outputs=status, api_name=False)
    for change in (target.change, side_by_side.change):
        change(_columns, [target, side_by_side], [base_column, chatbot], api_name=False)
    refresh.click(refresh_targets, outputs=target, api_name=False)
    # One model, one conversation, as before side by side existed: the API's "chat".
    single = gr.Button(visible=False)
    single.click(respond, [message, chatbot, target, temperature, top_p, max_new_tokens,
                           hardware["model"], hardware["custom_model"]], [message, chatbot],
                 api_name="chat")
    return {"target": target, "refresh": refresh_targets}
