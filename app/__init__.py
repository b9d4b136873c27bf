"""QLoRA Studio's web UI (Gradio). It calls the engine's Python API and never imports torch."""
