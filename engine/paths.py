"""Where the app keeps its files. One data directory (runs, model cache, uploads), chosen by the
app's --data-dir flag and handed to training processes through QLS_DATA_DIR."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("QLS_DATA_DIR") or PROJECT_DIR / "data").resolve()


def models_dir() -> Path:
    # A separate override lets the test suite share one converted model across many data dirs.
    return Path(os.environ.get("QLS_MODEL_CACHE") or data_dir() / "models").resolve()


def runs_dir() -> Path:
    return data_dir() / "runs"


def uploads_dir() -> Path:
    return data_dir() / "uploads"
