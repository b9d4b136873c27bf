"""The whole UI: the tabs in the order a user works through them (hardware, data, train, chat,
export), then the runs page."""

from __future__ import annotations

import gradio as gr

from app import chat_tab, data_tab, export_tab, hardware_tab, runs_tab, train_tab


def build_ui() -> gr.Blocks:
    with gr.Blocks(title="QLoRA Studio") as demo:
        gr.Markdown("# QLoRA Studio\nFine-tune a language model on your own data with QLoRA, "
                    "then chat with it and take it elsewhere.")
        with gr.Tab("Hardware & model", id="hardware"):
            hardware = hardware_tab.build()
        with gr.Tab("Data", id="data"):
            data = data_tab.build(hardware)
        with gr.Tab("Train", id="train"):
            train = train_tab.build(hardware, data)
        with gr.Tab("Chat", id="chat") as chat_page:
            chat = chat_tab.build(hardware)
        with gr.Tab("Export", id="export") as export_page:
            export = export_tab.build()
        with gr.Tab("Runs", id="runs") as runs_page:
            runs = runs_tab.build()
        # A reload (or a restarted UI) finds the running or latest run again from the run dirs.
        demo.load(train["on_load"], outputs=train["run"], api_name=False)
        demo.load(chat["refresh"], outputs=chat["target"], api_name=False)
        # A run that finished since the page loaded is offered as soon as the Chat tab opens.
        chat_page.select(chat["refresh"], outputs=chat["target"], api_name=False)
        runs_page.select(runs["refresh"], outputs=runs["views"], api_name=False)
        # Runs that finished since, the GGUF types this machine can write, the latest export.
        demo.load(export["on_load"], export["run"], export["load_outputs"], api_name=False) \
            .then(export["show"], export["run"], export["view"], api_name=False)
        export_page.select(export["refresh"], export["run"], export["run"], api_name=False)
        demo.load(runs["refresh"], outputs=runs["views"], api_name=False)
    return demo
