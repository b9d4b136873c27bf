"""Take a run's result out of the app: the adapter as a zip, a merged 16-bit model, GGUF.

Each export is a folder `RUN/exports/<kind>-<YYYYmmdd-HHMMSS>/`, complete or absent: it is written
as a hidden `.<name>.partial` folder beside it and renamed into place only when complete (like
checkpoints), so a crash or a full disk never leaves a folder that looks finished. One export per
run at a time (a lock file), which also makes a leftover `.partial` safe to delete.

    python -m engine export RUN_DIR --format adapter|merged|gguf   (background: engine.export_jobs)
"""

from __future__ import annotations

import json
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from engine.rundir import TEMPLATE_FILE, RunDir, replace_file

Progress = Callable[[float, str], None]  # progress(fraction done 0..1, what happens now)
KINDS = {
    "adapter": "the LoRA adapter as a zip (PEFT format: load it with peft on top of the base)",
    "merged": "the base model with the adapter merged in, 16-bit safetensors (plain transformers)",
    "gguf": "one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile",
}
# Bytes per weight of GGUF types (engine.gguf_export lists them), for the free-space check:
# Q8_0 stores 32 weights in 34 bytes; the K-quants' are averages over a whole model.
GGUF_BYTES_PER_WEIGHT = {"q8_0": 34 / 32, "q5_k_m": 0.71, "q4_k_m": 0.61}  # else 2 (16 bits)
MAX_SHARD_SIZE = "2GB"  # shards small enough for any file system and upload, few enough to list
GB = 1e9
_STAMP = re.compile(r"^(?P<kind>[a-z]+)-\d{8}-\d{6}(-\d+)?$")


class ExportError(RuntimeError):
    """An export cannot be made or pushed; the message says why and what to do."""


def exports_dir(run: RunDir) -> Path:
    return run.path / "exports"


def kind_of(export: Path) -> str | None:
    """The kind of a finished export folder from its name; None for anything else."""
    found = _STAMP.match(Path(export).name)
    return found["kind"] if found and found["kind"] in KINDS else None


def list_exports(run: RunDir) -> list[Path]:
    """The run's finished exports, newest first (a hidden .partial folder is never one)."""
    folder = exports_dir(run)
    found = [p for p in folder.iterdir() if p.is_dir() and kind_of(p)] if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name.split("-", 1)[1], reverse=True)


def new_name(run: RunDir, kind: str) -> str:
    """`<kind>-<YYYYmmdd-HHMMSS>`, with a suffix where an export of that second exists."""
    name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    taken = {p.name.removesuffix(".job.json") for p in exports_dir(run).glob(f"{name}*")}
    number = 1
    while (name if number == 1 else f"{name}-{number}") in taken:
        number += 1
    return name if number == 1 else f"{name}-{number}"


def check_request(run: RunDir, kind: str, gguf_type: str = "q8_0") -> None:
    """Raise ExportError unless this export can start now: a known kind, a saved adapter, no
    other export of the run under way, and enough free disk (once a crash's leftovers are gone)."""
    if kind not in KINDS:
        raise ExportError(f"unknown export format '{kind}': use {', '.join(KINDS)}")
    if kind == "gguf":
        with _gguf_errors():
            from engine.gguf_export import check_gguf_type  # here: it imports the gguf package

            check_gguf_type(gguf_type)
    if not run.has_adapter():
        raise ExportError(f"run {run.name} has no saved adapter yet, so there is nothing to "
                          "export: wait for it to finish, or stop it (stopping saves the adapter)")
    folder = exports_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    with _one_export_at_a_time(run):
        for stale in folder.glob(".*.partial"):  # left by a crash: no export is running now
            shutil.rmtree(stale, ignore_errors=True)
        check_free_space(folder, needed_bytes(run, kind, gguf_type))


def needed_bytes(run: RunDir, kind: str, gguf_type: str = "q8_0") -> int | None:
    """About how many bytes the export writes; None when the base model's size is unknown here
    (a Hub model outside the catalog: a full disk is then reported when it happens)."""
    adapter = sum(f.stat().st_size for f in run.adapter_dir.iterdir() if f.is_file())
    if kind == "adapter":
        return adapter + 10_000_000
    shape = base_shape(adapter_info(run))
    if shape is None:
        return None
    params = shape.total_params
    merged = params * 2  # 16 bits a weight
    if kind == "merged":
        return int(merged * 1.02)
    # GGUF is converted from a merged folder written first, so both are on disk for a while
    return int(merged + params * GGUF_BYTES_PER_WEIGHT.get(gguf_type, 2.0) * 1.02)


def base_shape(info: dict):
    """The base model's shape (a CatalogModel: its catalog entry, or its folder's config.json),
    known without loading it; None for a Hub model outside the catalog."""
    from engine.catalog import CatalogError
    from engine.planner import model_shape

    for name in (info.get("base_model"), info.get("base_source")):
        try:
            shape = model_shape(name or "")
        except CatalogError:
            continue
        if shape is not None:
            return shape
    return None


def check_free_space(folder: Path, needed: int | None) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(folder).free  # called through the module: tests fill the disk
    if free < needed:
        raise ExportError(f"this export needs about {_size(needed)} free in {folder}, and "
                          f"{_size(free)} is free: free some space and try again")


def _size(count: float) -> str:
    return f"{count / GB:.1f} GB" if count >= 0.1 * GB else f"{count / 1e6:.0f} MB"


def adapter_info(run: RunDir) -> dict:
    """What the run trained with (adapter/prompt_template.json): template, base_model, base_source."""
    try:
        return json.loads((run.adapter_dir / TEMPLATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"run {run.name}'s adapter folder lacks a readable {TEMPLATE_FILE} "
                          f"({exc}): it was not saved by this app, or it is damaged") from None


def export(run: RunDir, kind: str, progress: Progress | None = None, gguf_type: str = "q8_0",
           name: str | None = None, notes: list[str] | None = None) -> Path:
    """Write one export of the run and return its folder (complete, or nothing is left of it).
    notes, where given, receives what people should know about it (the GGUF's Ollama command)."""
    progress = progress or (lambda fraction, message: None)
    run = RunDir(Path(run.path).resolve())
    folder = exports_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    with _one_export_at_a_time(run):
        check_request(run, kind, gguf_type)
        name = name or new_name(run, kind)
        partial, final = folder / f".{name}.partial", folder / name
        partial.mkdir()
        try:
            if kind == "adapter":
                write_adapter_zip(run, partial, progress)
            elif kind == "merged":
                write_merged(run, partial, progress)
            else:
                with _gguf_errors():
                    from engine.gguf_export import export_gguf

                    (notes if notes is not None else []).extend(
                        export_gguf(run, partial, gguf_type, progress))
            _usual_permissions(partial)
            replace_file(partial, final)  # retried while Windows holds a file in it open
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            _raise_if_disk_full(exc, folder)
            raise
    progress(1.0, f"{kind} export written to {final}")
    return final


def _usual_permissions(folder: Path) -> None:
    """Files as readable as any other the user writes: transformers saves weights through a
    private temporary file (mode 0600), which Ollama's server, running as its own user, could
    not read."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


@contextmanager
def _one_export_at_a_time(run: RunDir):
    """Holds the run's export lock; the operating system frees it when the process dies."""
    # One instance per file, reentrant in its thread: export() holds it while it checks.
    lock = FileLock(str(exports_dir(run) / ".export.lock"), timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise ExportError(f"another export of run {run.name} is under way: wait for it to end, "
                          "then start this one") from None
    try:
        yield
    finally:
        lock.release()


def export_running(run: RunDir) -> bool:
    """Whether another process (or thread) holds the run's export lock right now."""
    try:
        with _one_export_at_a_time(run):
            return False
    except ExportError:
        return True


@contextmanager
def _gguf_errors():
    """engine.gguf_export's refusals (an architecture llama.cpp cannot run, no quantizer) as
    ExportError, which every caller of an export already turns into a sentence."""
    from engine.gguf_vocab import GgufError

    try:
        yield
    except GgufError as exc:
        raise ExportError(str(exc)) from exc


def _raise_if_disk_full(exc: BaseException, folder: Path) -> None:
    from engine.faults import is_disk_problem

    if isinstance(exc, Exception) and not isinstance(exc, ExportError) and is_disk_problem(exc):
        raise ExportError(f"could not write the export into {folder}: the disk is full or the "
                          f"folder is not writable ({exc}). Nothing half-written was kept; free "
                          "some space and try again") from exc


# --- the kinds ------------------------------------------------------------------------------------

def write_adapter_zip(run: RunDir, dest: Path, progress: Progress) -> Path:
    """`<run>-adapter.zip`: one folder `<run>-adapter/` that PeftModel.from_pretrained loads."""
    files = sorted(f for f in run.adapter_dir.iterdir() if f.is_file())
    total = sum(f.stat().st_size for f in files) or 1
    target, inner, done = dest / f"{run.name}-adapter.zip", f"{run.name}-adapter", 0
    # Deflate: the tokenizer files shrink a lot, the weights hardly, at little cost in time.
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            progress(0.95 * done / total, f"zipping the adapter: {file.name}")
            archive.write(file, f"{inner}/{file.name}")
            done += file.stat().st_size
    return target


def merge_dtype():
    """16 bits the exported model is stored in: bf16, or fp16 where the GPU here has no native
    bf16 (the card that will most likely run it). Decided from NVML, so no CUDA context is made."""
    import torch

    from engine.hardware import detect_gpus, visible_gpus

    gpus = visible_gpus(detect_gpus()[0])
    return torch.float16 if gpus and not all(gpu.bf16 for gpu in gpus) else torch.bfloat16


def write_merged(run: RunDir, dest: Path, progress: Progress) -> Path:
    """The base model reloaded in 16 bits with the run's adapter merged into it, saved in `dest`
    (an existing empty folder) as sharded safetensors with the tokenizer, the chat template the
    run trained with and a generation config that stops where the run learned to stop.

    Never merged into the 4-bit weights the run trained on: rounding the merged weights back to
    4 bits would lose most of what the adapter adds."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine import models
    from engine.config import RunConfig
    from engine.progress import transformers_bar

    info = adapter_info(run)
    trust = run.config_path.is_file() and RunConfig.load(run.config_path).trust_remote_code
    source = _base_source(info, progress)
    dtype = merge_dtype()
    label = str(dtype).removeprefix("torch.")
    progress(0.1, f"loading the base model {info.get('base_model')} in {label}")
    # On the CPU: the 16-bit model may not fit the GPU (a 7B one is 14 GB), the GPU may be busy
    # training, and merging is one small matrix product per layer.
    with models.explained(source), transformers_bar("Loading weights", _Span(progress, 0.1, 0.5,
                                                     f"loading the base model in {label}")):
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map={"": "cpu"}, trust_remote_code=trust,
            revision=models.hub_revision(source), use_safetensors=True)
    progress(0.5, "merging the adapter into the base model")
    with torch.no_grad():
        model = PeftModel.from_pretrained(model, str(run.adapter_dir)).merge_and_unload()
    tokenizer = models.load_tokenizer(str(run.adapter_dir), trust_remote_code=trust)
    set_chat_template(tokenizer, info.get("template", "model"))
    _stop_at_eos(model, tokenizer)
    progress(0.6, "saving the merged model (safetensors)")
    model.save_pretrained(dest, max_shard_size=MAX_SHARD_SIZE)  # transformers 5: always safetensors
    tokenizer.save_pretrained(dest)
    progress(0.95, "merged model saved")
    return dest


def _base_source(info: dict, progress: Progress) -> str:
    """Where the base model loads from: the folder it trained from where that still exists, else
    the model resolved (and downloaded, with byte progress) again."""
    from engine import models

    source = info.get("base_source") or ""
    if source and Path(source).is_dir():
        return source
    source = models.resolve_model(info["base_model"])

    def downloaded(done: int, total: int) -> None:
        progress(0.1 * done / max(total, 1), f"downloading the base model: {done / GB:.1f} of "
                 f"{total / GB:.1f} GB")

    models.download(source, downloaded)
    return models.resolve_model(info["base_model"])  # a converted copy, where download made one


def set_chat_template(tokenizer, template: str) -> None:
    """Give the tokenizer a Jinja chat template that renders the run's prompt format; a run that
    trained with the model's own template keeps it."""
    from engine.templates import TEMPLATES, jinja_chat_template

    if TEMPLATES[template].chat_template:
        return
    # Training tokenised text templates with the tokenizer's special tokens (a Llama tokenizer
    # adds BOS); apply_chat_template adds none, so the template must write BOS itself there.
    with_specials = tokenizer("x")["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and with_specials[:1] == [bos] \
        and with_specials != tokenizer("x", add_special_tokens=False)["input_ids"]
    tokenizer.chat_template = jinja_chat_template(template, bos_token=adds_bos)


def _stop_at_eos(model, tokenizer) -> None:
    """Generation stops at the EOS the run learned to write after each answer (every template
    puts it there), whatever the base model's generation config said. Stop strings are not set:
    transformers refuses to generate with them unless each caller passes the tokenizer too."""
    config = model.generation_config
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else \
        [config.eos_token_id] if config.eos_token_id is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops = [tokenizer.eos_token_id, *stops]
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    config.pad_token_id = tokenizer.pad_token_id


class _Span:
    """Counts from a transformers progress bar, shown as fractions start..end of the export."""

    def __init__(self, progress: Progress, start: float, end: float, what: str):
        self.progress, self.start_at, self.end_at, self.what = progress, start, end, what
        self.total = None

    def start(self, total):
        self.total = total
        self.update(0)

    def update(self, done, total=None):
        self.total = total or self.total
        if self.total:
            share = min(done / self.total, 1.0)
            self.progress(self.start_at + share * (self.end_at - self.start_at),
                          f"{self.what}: {done} of {self.total} tensors")
