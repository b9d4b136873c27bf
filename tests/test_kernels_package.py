"""Our top-level `kernels` package neither hides nor breaks Hugging Face's `kernels` package, the
one bitsandbytes and transformers import (kernels/__init__.py says how). Each case runs in a fresh
process with the project folder first on sys.path, as the app runs."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every top-level module and package name in Hugging Face's kernels (src/kernels/), in every
# release from v0.2.0 to v0.16.0 and on main at 8ac69fc (0.17.0.dev0), read with git ls-tree.
HF_KERNELS_MODULES = {
    "_interval_tree", "_system", "_vendored", "_versions", "_windows", "backends", "benchmark",
    "benchmarks", "check", "cli", "compat", "deps", "doc", "hf_hub", "importer", "install",
    "layer", "load", "lockfile", "locking", "metadata", "resolver", "status", "upload", "utils",
    "variants", "verify", "versions_cli", "wheel",
}

# A stand-in for their distribution, laid out as theirs is (v0.12.0): __init__ takes its version
# from the distribution's metadata and imports its API from kernels.layer and kernels.utils.
THEIR_INIT = """
import importlib.metadata

__version__ = importlib.metadata.version("kernels")

from kernels.layer import LayerRepository, kernelize, use_kernel_forward_from_hub
from kernels.utils import get_kernel, has_kernel
"""
THEIR_LAYER = """
class LayerRepository:
    def __init__(self, repo_id, layer_name):
        self.repo_id, self.layer_name = repo_id, layer_name


def kernelize(model, **kwargs):
    return model


def use_kernel_forward_from_hub(layer_name):
    return lambda cls: cls
"""
THEIR_UTILS = """
calls = []


def get_kernel(repo_id, revision=None, version=None):
    calls.append(repo_id)
    raise FileNotFoundError(f"{repo_id}: no Hub here")


def has_kernel(repo_id, revision=None, version=None):
    return False
"""

CHECK = """
import importlib.metadata, inspect, json, sys
from pathlib import Path

import torch
import bitsandbytes.functional as bnb
from transformers.utils.import_utils import is_kernels_available

import kernels
import kernels.nf4

facts = {"ours": kernels.__file__, "nf4": kernels.nf4.__file__,
         "available": is_kernels_available(), "theirs": bool(kernels._THEIRS),
         "avx512bf16": bnb.has_avx512bf16()}
weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
ours = kernels.nf4.quantize_nf4(weight)
facts["bnb_works"] = torch.equal(bnb.dequantize_4bit(packed, state),
                                 kernels.nf4.dequantize_nf4(ours))
from kernels import get_kernel  # what bitsandbytes does on a CPU with AVX512-BF16
try:
    get_kernel("kernels-community/quantization-bitsandbytes", version=1)
except Exception as exc:  # bitsandbytes catches any exception there
    facts["get_kernel_error"] = f"{type(exc).__name__}: {exc}"
if facts["theirs"]:
    import kernels.layer
    import kernels.utils

    facts.update(get_kernel=inspect.getfile(get_kernel), layer=kernels.layer.__file__,
                 version=kernels.__version__,
                 metadata_version=importlib.metadata.version("kernels"),
                 bnb_asked=kernels.utils.calls)
print(json.dumps(facts))
"""


def run_check(tmp_path, *extra_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, extra_path)])}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(CHECK)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def their_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(their_kernels_installed(), reason="Hugging Face's kernels is installed here")
def test_without_their_package_ours_is_not_taken_for_it(tmp_path):
    facts = run_check(tmp_path)
    assert Path(facts["ours"]) == ROOT / "kernels" / "__init__.py"
    assert Path(facts["nf4"]) == ROOT / "kernels" / "nf4.py"
    assert facts["available"] is False  # transformers does not try to use ours as theirs
    # bitsandbytes' optional `get_kernel` fails with a message saying whose package this is
    assert facts["get_kernel_error"].startswith("ImportError: Hugging Face's `kernels` package is "
                                                "not installed")
    assert facts["bnb_works"]  # ... and it falls back to its own code


def test_with_their_package_both_work(tmp_path):
    from transformers.utils.import_utils import KERNELS_MIN_VERSION

    # A version transformers accepts (it wants 0.18.2 <= v < 0.19.0 today), so that it uses theirs.
    version = KERNELS_MIN_VERSION
    site = tmp_path / "site"
    (site / "kernels" / "layer").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(THEIR_INIT)
    (site / "kernels" / "layer" / "__init__.py").write_text(THEIR_LAYER)
    (site / "kernels" / "utils.py").write_text(THEIR_UTILS)
    dist_info = site / f"kernels-{version}.dist-info"
    dist_info.mkdir()
    metadata = f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n"
    (dist_info / "METADATA").write_text(metadata)
    (dist_info / "top_level.txt").write_text("kernels\n")

    facts = run_check(tmp_path, site)  # theirs after the project folder on sys.path
    assert Path(facts["ours"]) == ROOT / "kernels" / "__init__.py"
    assert Path(facts["nf4"]) == ROOT / "kernels" / "nf4.py"
    assert Path(facts["get_kernel"]) == site / "kernels" / "utils.py"
    assert Path(facts["layer"]) == site / "kernels" / "layer" / "__init__.py"
    assert facts["version"] == facts["metadata_version"] == version
    assert facts["available"] is True
    assert facts["bnb_works"]
    if facts["avx512bf16"]:  # bitsandbytes asks the Hub for its fused CPU kernel: it asked theirs
        # bitsandbytes asked their get_kernel (this check asked it once more)
        assert facts["bnb_asked"] == ["kernels-community/quantization-bitsandbytes"] * 2


def test_our_module_names_are_not_theirs():
    ours = {path.stem for path in (ROOT / "kernels").glob("*.py") if path.stem != "__init__"}
    ours |= {path.parent.name for path in (ROOT / "kernels").glob("*/__init__.py")}
    assert "nf4" in ours
    assert not ours & HF_KERNELS_MODULES, "rename them: Hugging Face's kernels has modules so named"
