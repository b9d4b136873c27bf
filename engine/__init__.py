"""QLoRA Studio's engine: everything that computes, usable without the UI (`python -m engine`).

Importing the package is cheap: torch and transformers load only in the modules that need them.
"""
