"""QLoRA Studio's own 4-bit training path: an NF4 reference bit-compatible with bitsandbytes, a
fused frozen-4-bit + LoRA layer, a chunked cross-entropy, padding-free batches, and Triton kernels
for the GPU's hot paths, each beside a plain-PyTorch reference that tests hold it to.

Hugging Face publishes a package with the same import name, `kernels` (kernels from the Hub), and
bitsandbytes and transformers import it where it is installed. This folder comes first on sys.path
when the app runs from the project folder, so it would hide theirs. Where theirs is installed, this
package therefore runs their __init__ here and adds their folder to __path__: `from kernels import
get_kernel` and their submodules keep working, and ours, named apart from theirs, sit beside them.
Kept free of heavy imports: transformers imports this package just to ask for a version.
"""

from __future__ import annotations

import importlib.metadata
import os


def _their_init() -> str | None:
    """The __init__.py of Hugging Face's `kernels` distribution, where one is installed."""
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = str(distribution.locate_file("kernels/__init__.py"))
    if not os.path.isfile(init) or os.path.samefile(init, __file__):
        return None
    return init


_THEIRS = _their_init()
if _THEIRS:
    __path__.append(os.path.dirname(_THEIRS))
    with open(_THEIRS, encoding="utf-8") as _source:
        exec(compile(_source.read(), _THEIRS, "exec"))  # noqa: S102 - their module, run as ours
else:
    def get_kernel(*args, **kwargs):
        """Where Hugging Face's `kernels` is not installed, bitsandbytes' optional `from kernels
        import get_kernel` lands here: it gets an error that says whose package this is, and
        goes on without the Hub kernel as it would without either package."""
        raise ImportError("Hugging Face's `kernels` package is not installed (the `kernels` "
                          "package found is QLoRA Studio's own)")
