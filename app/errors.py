"""Expected errors in words: what a UI handler shows instead of Gradio's error popup.

The engine's exceptions already say what went wrong and what to do. The file system's and the
file lock's do not ("[Errno 28] No space left on device", "The file lock '...' could not be
acquired"), so those get a sentence here.
"""

from __future__ import annotations

import errno
from pathlib import Path

from filelock import Timeout

from engine.catalog import CatalogError
from engine.config import ConfigError
from engine.data import DataError
from engine.models import ModelError
from engine.readers import UploadError
from engine.runner import RunnerError
from engine.templates import TemplateError

# filelock.Timeout is a TimeoutError, so an OSError too.
EXPECTED = (OSError, CatalogError, ConfigError, DataError, ModelError, RunnerError, TemplateError,
            UploadError)
FULL = (errno.ENOSPC, errno.EDQUOT)
REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


def in_words(exc: BaseException) -> str:
    """One sentence (with a warning sign) for an expected error."""
    return f"⚠️ {sentence(exc)}"


def sentence(exc: BaseException) -> str:
    if isinstance(exc, Timeout):
        return (f"Another window or command is changing the runs right now (the lock "
                f"{Path(exc.lock_file).name} stayed busy). Try again in a moment.")
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in FULL:
            return f"The disk is full: could not write{where}. Free some space, then try again."
        if exc.errno in REFUSED:
            return (f"No permission to change{where or ' a file'} ({exc.strerror}). Fix the "
                    "folder's permissions, or start the app with another --data-dir.")
        return f"Could not read or write{where or ' a file'}: {exc.strerror or exc}."
    text = str(exc).strip() or type(exc).__name__
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")
