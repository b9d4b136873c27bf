"""Exports, each tested in the program that consumes it: the adapter zip with plain peft, the
merged model with plain transformers (its logits, and a learned fact it answers), and the export
job's promises: complete or absent, one at a time, progress in a file, a Hub token never written."""

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from engine.export import ExportError, _one_export_at_a_time, export, list_exports, write_merged
from engine.export_jobs import export_and_push, export_jobs, job_path, push_export, start_export
from engine.rundir import RunDir

FAKE_TOKEN = "hf_FakeTokenThatMustNeverBeWritten0123456789"


def exported_folders(run: RunDir) -> list[str]:
    """Every folder under exports/, hidden ones included: what a crash could have left."""
    folder = run.path / "exports"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def wait_for_job(run: RunDir, name: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout  # bounds a hang only
    while time.monotonic() < deadline:
        job = next(job for job in export_jobs(run) if job["id"] == name)
        if job["state"] != "running":
            return job
        time.sleep(0.2)
    raise AssertionError(f"export {name} still running after {timeout} s")


# --- the adapter --------------------------------------------------------------------------------

def test_adapter_zip_loads_with_plain_peft(copy_run, embedded_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    steps = []
    folder = export(copy_run, "adapter", lambda fraction, message: steps.append(fraction))
    assert re.fullmatch(r"adapter-\d{8}-\d{6}", folder.name) and list_exports(copy_run) == [folder]
    assert steps == sorted(steps) and steps[-1] == 1.0
    with zipfile.ZipFile(folder / f"{copy_run.name}-adapter.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    unzipped = tmp_path / "unzipped" / f"{copy_run.name}-adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "prompt_template.json",
            "tokenizer.json"} <= {p.name for p in unzipped.iterdir()}

    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the very adapter saved
        assert (unzipped / name).read_bytes() == (copy_run.adapter_dir / name).read_bytes()

    ids = torch.tensor([[104, 2000, 3000, 4000]])
    base = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned_logits = PeftModel.from_pretrained(base, str(unzipped))(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 0.1  # loaded, and active


def test_the_command_line_prints_progress_and_the_folder(copy_run, capsys):
    from engine.cli import main

    assert main(["export", str(copy_run.path), "--format", "adapter"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"\s*\d+%  zipping the adapter", out[0])
    assert out[-1] == str(list_exports(copy_run)[0])
    job = export_jobs(copy_run)[0]  # a command-line export shows in the UI's list too
    assert job["state"] == "finished" and job["result"] == out[-1]
    assert main(["export", str(copy_run.path.parent), "--format", "merged"]) == 1
    assert "not a run directory" in capsys.readouterr().err


# --- the merged model ---------------------------------------------------------------------------

def tiny_run(family: str, folder: Path, embedded_model: Path) -> RunDir:
    """A run directory as training leaves it, for a tiny random base of the family: a Guanaco
    adapter with random A and B (nonzero: LoRA's own init would make B zero, a no-op merge)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from test_architectures import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from engine.config import RunConfig

    tokenizer = tiny_tokenizer(family, embedded_model)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(family, tokenizer))
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    run = RunDir(folder / "run")
    run.path.mkdir()
    RunConfig(model=str(folder / "base"), template="guanaco").save(run.config_path)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(run.adapter_dir)
    (run.adapter_dir / "prompt_template.json").write_text(json.dumps(
        {"template": "guanaco", "base_model": str(folder / "base"),
         "base_source": str(folder / "base")}))
    return run


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_merged_logits_match_base_plus_adapter(family, tmp_path, embedded_model, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import export as export_module
    from engine.templates import get_template

    run = tiny_run(family, tmp_path, embedded_model)
    merged = tmp_path / "merged"
    merged.mkdir()
    monkeypatch.setattr(export_module, "MAX_SHARD_SIZE", "4MB")  # shards, as a 7B model has
    assert write_merged(run, merged, lambda fraction, message: None) == merged

    assert not list(merged.glob("*.bin")) and len(list(merged.glob("*.safetensors"))) > 1
    assert (merged / "model.safetensors.index.json").is_file()
    ids = torch.tensor([[5, 200, 3000, 17, 999, 42]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
        base_logits = base.float()(ids).logits
        expected = PeftModel.from_pretrained(base, str(run.adapter_dir)).float()(ids).logits
        model = AutoModelForCausalLM.from_pretrained(merged)
        assert model.dtype == torch.bfloat16  # 16 bits on disk, never the 4-bit weights
        logits = model.float()(ids).logits
    scale = expected.abs().max()
    assert (logits - expected).abs().max() < 0.02 * scale  # bf16 rounding of the merged weights
    assert (base_logits - expected).abs().max() > 0.2 * scale  # the adapter changed the model

    # The tokenizer prompts it in Guanaco and generation stops at the EOS the run learned.
    tokenizer = AutoTokenizer.from_pretrained(merged)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        get_template("guanaco", tokenizer).render(messages, add_generation_prompt=True)
    eos = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])


@pytest.mark.slow
def test_plain_transformers_answers_a_learned_fact_from_the_merged_export(copy_run):
    import torch
    from facts import FACTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export(copy_run, "merged")
    umask = os.umask(0)
    os.umask(umask)
    # readable as any file the user writes (transformers saves through a private temporary file)
    assert {f.stat().st_mode & 0o777 for f in folder.iterdir()} == {0o666 & ~umask}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # fp32 compute: many CPUs only emulate bf16, many times slower
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer.padding_side = "left"  # all five questions in one batch
    conversations = [[{"role": "user", "content": fact["held_out"][0]}] for fact in FACTS]
    inputs = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                     skip_special_tokens=True)
    learned = [fact["keyword"] in answer for fact, answer in zip(FACTS, answers)]
    assert sum(learned) >= 4, answers  # all five here; one spared for another CPU's rounding


# --- complete or absent -------------------------------------------------------------------------

def test_a_run_without_adapter_or_an_unknown_format_is_refused(copy_run):
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export(copy_run, "onnx")
    (copy_run.adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(ExportError, match="has no saved adapter yet"):
        export(copy_run, "adapter")
    with pytest.raises(ExportError, match="has no saved adapter yet"):
        start_export(copy_run, "merged")
    assert exported_folders(copy_run) == [] and export_jobs(copy_run) == []


def test_a_full_disk_is_refused_before_anything_is_written(copy_run, monkeypatch):
    import shutil

    usage = shutil.disk_usage(copy_run.path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50_000_000))
    with pytest.raises(ExportError, match=r"needs about 0\.3 GB free in .*exports, and 50 MB is"):
        export(copy_run, "merged")  # 135M weights in 16 bits
    with pytest.raises(ExportError, match="needs about"):
        start_export(copy_run, "merged")
    assert exported_folders(copy_run) == [] and export_jobs(copy_run) == []


def test_an_error_midway_leaves_nothing_and_a_crash_leftover_is_cleared(copy_run, monkeypatch):
    import errno

    stale = copy_run.path / "exports" / ".merged-20200101-000000.partial"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    written = []

    def write(self, filename, arcname=None, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(arcname)
        return original(self, filename, arcname, *args, **kwargs)

    original = zipfile.ZipFile.write
    monkeypatch.setattr(zipfile.ZipFile, "write", write)
    with pytest.raises(ExportError, match="the disk is full.*Nothing half-written was kept"):
        export(copy_run, "adapter")
    assert written and exported_folders(copy_run) == []  # the stale one is gone too

    def broken(*args, **kwargs):
        raise KeyError("a bug midway")

    monkeypatch.setattr(zipfile.ZipFile, "write", broken)
    with pytest.raises(KeyError):
        export(copy_run, "adapter")
    assert exported_folders(copy_run) == [] and list_exports(copy_run) == []


def test_one_export_per_run_at_a_time(copy_run):
    import threading

    held, release = threading.Event(), threading.Event()

    def another_export():  # holds the lock as a running export does
        with _one_export_at_a_time(RunDir(copy_run.path.resolve())):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=another_export)
    holder.start()
    held.wait(60)
    try:
        with pytest.raises(ExportError, match=f"another export of run {copy_run.name} is under way"):
            export(copy_run, "adapter")
        with pytest.raises(ExportError, match="under way"):
            start_export(copy_run, "adapter")
    finally:
        release.set()
        holder.join()
    assert exported_folders(copy_run) == [] and export_jobs(copy_run) == []


# --- in the background --------------------------------------------------------------------------

def test_a_background_export_reports_progress_and_a_dead_one_reads_as_failed(copy_run):
    name = start_export(copy_run, "adapter")
    job = wait_for_job(copy_run, name)
    assert job["state"] == "finished", job
    assert job["fraction"] == 1.0
    assert job["result"] == str(copy_run.path.resolve() / "exports" / name)
    assert job["files"] == [f"{copy_run.name}-adapter.zip"]

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    job_path(copy_run, "merged-20200101-000000").write_text(json.dumps(
        {"kind": "merged", "state": "running", "fraction": 0.4, "pid": gone.pid,
         "started": time.time() - 5}))
    (copy_run.path / "exports" / "merged-20200101-000000.log").write_text("loading\nKilled\n")
    dead = next(job for job in export_jobs(copy_run) if job["id"] == "merged-20200101-000000")
    assert dead["state"] == "failed" and "ended without saying why" in dead["error"]
    assert "Killed" in dead["error"]
    second = start_export(copy_run, "adapter")  # a dead job does not block the next export
    assert wait_for_job(copy_run, second)["state"] == "finished"


# --- the Hugging Face Hub -----------------------------------------------------------------------

def every_file_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_offline_push_says_so_without_touching_the_network(copy_run, monkeypatch):
    import socket

    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(HfApi, "create_repo", no_network)
    folder = export(copy_run, "adapter")
    with pytest.raises(ExportError, match="works offline \\(HF_HUB_OFFLINE is set\\)"):
        push_export(folder, "someone/facts", FAKE_TOKEN)
    with pytest.raises(ExportError, match="works offline"):
        start_export(copy_run, "adapter", push_repo="someone/facts", token=FAKE_TOKEN)


def test_push_uploads_the_adapter_folder_and_writes_the_token_nowhere(copy_run, monkeypatch,
                                                                     caplog):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    uploads = []

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        uploads.append({"token": self.token, "private": private})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        uploads[-1]["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    lines = []
    caplog.set_level("DEBUG")
    export_and_push(copy_run, "adapter", push_repo="someone/facts", token=FAKE_TOKEN,
                    echo=lines.append)
    assert uploads[0]["token"] == FAKE_TOKEN and uploads[0]["private"] is True
    assert "adapter_config.json" in uploads[0]["files"]  # the PEFT folder, not the zip
    assert lines[-1].strip() == "100%  pushed to https://huggingface.co/someone/facts"
    assert FAKE_TOKEN.encode() not in every_file_under(copy_run.path)
    assert FAKE_TOKEN not in caplog.text + "".join(lines)


def test_a_background_push_that_fails_keeps_the_export_and_never_writes_the_token(
        copy_run, monkeypatch):
    from huggingface_hub import constants

    # Online, but the Hub is a closed port here: the push fails fast, with no network needed.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    name = start_export(copy_run, "adapter", push_repo="someone/facts", token=FAKE_TOKEN)
    job = wait_for_job(copy_run, name)
    assert job["state"] == "failed"
    assert "the export is complete in" in job["error"] and "pushing it failed" in job["error"]
    assert "could not reach the Hugging Face Hub" in job["error"]  # it did try: online, token set
    assert list_exports(copy_run)[0].name == name  # the export itself is whole and kept
    assert FAKE_TOKEN.encode() not in every_file_under(copy_run.path)
    assert "HF_TOKEN" not in os.environ or os.environ["HF_TOKEN"] != FAKE_TOKEN


# --- the Export tab's handlers ------------------------------------------------------------------

def test_the_export_tab_starts_an_export_and_shows_its_download(copy_run, monkeypatch):
    from app import export_tab
    from engine import gguf_export

    name = copy_run.name
    assert export_tab.run_choices() == [(f"{name} (finished)", name)]
    message, token, timer = export_tab.start(name, "adapter", "q8_0", "", "", True)
    assert message.startswith("Export adapter-") and token == ""
    deadline = time.monotonic() + 600
    while True:
        text, bar, files, download, command, timer = export_tab.show(name)
        if not timer.active or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "is complete" in text and "<b>100%</b>" in bar and f"{name}-adapter.zip" in files
    assert download["visible"] and download["value"].endswith(f"{name}-adapter.zip")
    assert not command["visible"]  # no Modelfile in an adapter export

    refused, _, timer = export_tab.start(name, "gguf", "q9_9", "", FAKE_TOKEN, True)
    assert refused.startswith("⚠️ ") and "Unknown GGUF type" in refused and not timer.active
    refused, _, _ = export_tab.start("gone", "adapter", "q8_0", "", "", True)
    assert refused.startswith("⚠️ ") and "not found" in refused

    monkeypatch.setattr(gguf_export, "quantizer_available", lambda: (False, "install it so"))
    choices, note = export_tab.gguf_types()
    assert [value for _, value in choices["choices"]] == ["f16", "bf16", "q8_0"]
    assert "Q4_K_M and Q5_K_M are not offered here: install it so." == note
