"""bench/gpu_check.py: without a GPU it refuses in one line (exit 2); its judging and reporting
are checked with made-up measurements (the children that measure are replaced by a fake); on a
CUDA machine the real --quick check runs (marked gpu, skipped elsewhere)."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.catalog import find
from engine.planner import plan, stack_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load(SCRIPT)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA GPU")
def test_without_cuda_it_exits_2_with_one_clear_line():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_check: no CUDA GPU visible to PyTorch (torch ")
    assert lines[0].endswith("run it on a machine with an NVIDIA GPU")


def test_a_point_passes_within_15_percent_either_way():
    assert gpu_check.deviation(6.0, 5.0) == pytest.approx(0.2)
    assert gpu_check.deviation(4.0, 5.0) == pytest.approx(-0.2)
    assert gpu_check.within_tolerance(5.75, 5.0)  # +15%: still in
    assert gpu_check.within_tolerance(4.25, 5.0)  # -15%
    assert not gpu_check.within_tolerance(5.8, 5.0)  # +16%
    assert not gpu_check.within_tolerance(4.2, 5.0)  # -16%
    assert not gpu_check.within_tolerance(1.0, 0.0)  # nothing measured is no pass


def test_markdown_table():
    table = gpu_check.markdown_table(["a", "b"], [[1, "x|y"], ["", 2.5]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | x\\|y |", "|  | 2.5 |"]


def test_results_file_names():
    assert gpu_check.results_name("NVIDIA GeForce RTX 3060", "2026-11-25") == \
        "gpu-check-nvidia-geforce-rtx-3060-2026-11-25"
    assert gpu_check.results_name("NVIDIA H100 80GB HBM3", "2026-11-25", quick=True) == \
        "gpu-check-nvidia-h100-80gb-hbm3-2026-11-25-quick"
    assert gpu_check.results_name("Tesla T4", "2026-11-25", only="memory").endswith("-memory")


def test_the_points_cover_shapes_lengths_batches_and_ranks():
    points = gpu_check.POINTS
    shapes = {model_id: gpu_check.truncated_shape(model_id) for model_id, *_ in points}
    assert len(points) >= 6 and len(shapes) >= 3
    assert any(shape.vocab >= 128_000 and shape.arch == "llama" for shape in shapes.values())
    assert any(shape.arch == "gptj" for shape in shapes.values())
    for column in (1, 2, 3):  # sequence length, micro-batch, LoRA rank all vary
        assert len({point[column] for point in points}) >= 2
    assert 0 < len(gpu_check.QUICK_POINTS) < len(points)
    assert set(gpu_check.QUICK_POINTS) <= set(points)
    for model_id, length, batch, rank in points:  # a 12 GB card (RTX 3060) runs every point
        assert plan(shapes[model_id], length, batch, rank).total_gb <= 12 * 0.9
    llama = gpu_check.truncated_shape("llama-3.1-8b")
    assert llama.layers == 4 and llama.vocab == find("llama-3.1-8b").vocab


def test_the_configs_built_have_the_planned_shapes():
    """The transformers model built from a shape has the shape's parameters (on the meta device:
    no memory, no time), so the planner plans what is measured."""
    import torch
    from transformers import AutoModelForCausalLM

    for model_id in gpu_check.SHAPES:
        shape = gpu_check.truncated_shape(model_id)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(gpu_check.hf_config(shape))
        built = sum(p.numel() for p in model.parameters())
        assert built == pytest.approx(shape.total_params, rel=0.01), model_id
        assert model.config.vocab_size == shape.vocab
        assert model.config.num_hidden_layers == shape.layers


def test_the_text_data_is_plain_text_rows(tmp_path):
    path = gpu_check.write_text_data(tmp_path / "text.jsonl", rows=5, words=10)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and all(set(row) == {"text"} and "###" not in row["text"] for row in rows)


# --- the whole parent with made-up measurements ------------------------------------------------

INFO = {"gpu": "NVIDIA GeForce RTX 3060", "capability": "8.6", "total_gb": 12.0, "free_gb": 11.4,
        "driver": "550.54.14", "driver_cuda": "12.4", "torch_cuda": "12.4", "bf16_native": True,
        "bf16_with_emulation": True, "versions": {"torch": "2.13.0", "bitsandbytes": "0.50.2"}}


def fake_child(off: dict | None = None, chat_ok: bool = True):
    """A stand-in for Check.child: measurements made up from the planner, each point `off[(id,
    length)]` away from it (default 5% under the plan's figure, i.e. the plan 5% over)."""
    off = off or {}

    def child(check, kind, spec, timeout_s):
        if kind == "info":
            return dict(INFO)
        if kind == "build":
            shapes = {model_id: gpu_check.truncated_shape(model_id) for model_id in spec["models"]}
            return {model_id: {"folder": folder, "params": shapes[model_id].total_params,
                               "attention": "eager" if shapes[model_id].arch == "gptj" else "sdpa",
                               "seconds": 1.0}
                    for model_id, folder in spec["models"].items()}
        if kind == "reference":
            return {"state": "finished", "tokens_per_s": 1000.0, "reserved_gb": 4.1,
                    "losses": [11.0, 10.9], "compute": "bfloat16",
                    "optimizer": {"class": "bitsandbytes.optim.adamw.AdamW"}}
        if kind == "oom":
            note = "GPU out of memory at step 0 with micro-batch 8: retrying with micro-batch 4"
            return {"state": "finished", "message": "finished 2 steps", "micro_batch_after": 4,
                    "grad_accum_after": 2, "notes": [note]}
        if kind == "chat":
            return {"steps": [{"check": "load_shared ...", "ok": True, "value": "0.2 GB"},
                              {"check": "GpuBusyError", "ok": chat_ok, "value": "refused"}]}
        assert kind == "train"
        o = spec["overrides"]
        base = {"state": "finished", "message": "finished", "notes": [], "device": "cuda",
                "status_optimizer": o.get("optimizer", "paged_adamw_32bit"), "compute": "bfloat16"}
        if spec["name"] == "paged":
            return {**base, "losses": [3.1, 2.9, 2.5, 2.0, 1.6],
                    "optimizer": {"class": "bitsandbytes.optim.adamw.AdamW", "is_paged": True,
                                  "optim_bits": 32, "state_tensors": 300,
                                  "paged_state_tensors": 60}}
        if spec["name"] == "speed":
            return {**base, "tokens_per_s": 1050.0, "reserved_gb": 3.9, "losses": [11.0, 10.8],
                    "optimizer": {"class": "bitsandbytes.optim.adamw.AdamW"}}
        model_id = Path(o["model"]).name
        length = o["max_seq_len"]
        planned = plan(gpu_check.truncated_shape(model_id), length, o["micro_batch_size"],
                       o["lora_r"], stack=stack_for("auto", "cuda")).torch_gb
        measured = planned / (1 + off.get((model_id, length), 0.05))
        return {**base, "reserved_gb": measured, "allocated_gb": measured - 0.3,
                "load_reserved_gb": measured - 0.5, "train_reserved_gb": measured,
                "nvml_used_gb": 7.0}

    return child


def _run_main(monkeypatch, tmp_path, args, **fake):
    monkeypatch.setattr(gpu_check, "no_cuda_line", lambda: None)
    monkeypatch.setattr(gpu_check.Check, "child", fake_child(**fake))
    import train_step  # section 6 runs bench/train_step.py's cases: their figures, faked

    monkeypatch.setattr(train_step, "measure", lambda case, *args, **kwargs: {
        "case": case, "ours_tokens_per_s": 1800.0, "reference_tokens_per_s": 1000.0,
        "speedup": 1.8, "ours_peak_gb": 9.0, "reference_peak_gb": 16.0, "max_loss_diff": 0.004,
        "ours_bf16_peak_fraction": 0.31})
    out = tmp_path / "results"
    code = gpu_check.main([*args, "--out", str(out)])
    return code, out


def test_everything_passing_exits_0_and_writes_the_report(monkeypatch, tmp_path, capsys):
    code, out = _run_main(monkeypatch, tmp_path, [])
    assert code == 0
    name = f"gpu-check-nvidia-geforce-rtx-3060-{gpu_check.time.strftime('%Y-%m-%d')}"
    report = (out / f"{name}.md").read_text()
    assert report in capsys.readouterr().out  # the same tables on stdout
    for text in ("# GPU check: NVIDIA GeForce RTX 3060", "driver: 550.54.14", "command: `python "
                 "bench/gpu_check.py --out", "PASS", "## 1. Peak VRAM against the planner",
                 "## 5. Chat and training share the GPU", "(4 of 32 layers)", "+5.0%", "1.05x",
                 "## 6. Our kernels", "llama-8b-8192"):
        assert text in report, text
    assert report.index("## 1.") < report.index("## 2.") < report.index("## 5.")
    data = json.loads((out / f"{name}.json").read_text())
    assert data["passed"] is True and data["info"]["gpu"] == INFO["gpu"]
    memory = next(s for s in data["sections"] if s["name"] == "memory")
    assert len([p for p in memory["data"] if "reserved_gb" in p]) == len(gpu_check.POINTS)


def test_a_point_off_by_more_than_15_percent_fails_the_check(monkeypatch, tmp_path):
    code, out = _run_main(monkeypatch, tmp_path, ["--only", "memory", "--quick"],
                          off={("gpt-j-6b", 2048): -0.2})
    assert code == 1
    report = next(out.glob("gpu-check-*-quick-memory.md")).read_text()
    assert "FAIL: 1. Peak VRAM against the planner" in report
    assert "-20.0%" in report and "OFF" in report
    assert "## 2." not in report  # --only: one section


def test_a_failed_check_fails_the_run(monkeypatch, tmp_path):
    code, out = _run_main(monkeypatch, tmp_path, ["--only", "chat"], chat_ok=False)
    assert code == 1
    data = json.loads(next(out.glob("*-chat.json")).read_text())
    assert data["passed"] is False and data["sections"][0]["rows"][1][2] == "FAILED"


def test_a_child_that_times_out_is_a_failed_check(monkeypatch, tmp_path):
    def child(check, kind, spec, timeout_s):
        return dict(INFO) if kind == "info" else {"error": f"timed out after {timeout_s:.0f} s"}

    monkeypatch.setattr(gpu_check, "no_cuda_line", lambda: None)
    monkeypatch.setattr(gpu_check.Check, "child", child)
    assert gpu_check.main(["--only", "oom", "--out", str(tmp_path)]) == 1
    assert "timed out after 240 s" in next(tmp_path.glob("*.md")).read_text()


def test_the_child_runner_bounds_time(tmp_path):
    """The real Check.child: a crash is an error line, a spent budget runs nothing."""
    check = gpu_check.Check(tmp_path, quick=True, budget_s=600)
    result = check.child("no-such-kind", {}, 60)
    assert "error" in result and "KeyError" in result["error"]
    check.deadline = gpu_check.time.time() + 5
    assert check.child("info", {}, 60) == {"error": "not run: the 10-minute budget was spent"}


@pytest.mark.gpu
@pytest.mark.slow
def test_the_quick_gpu_check_passes_on_this_gpu(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=660, cwd=ROOT)
    reports = list(tmp_path.glob("gpu-check-*-quick.md"))
    assert reports and reports[0].with_suffix(".json").is_file(), out.stderr[-3000:]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


def test_dataclass_replace_keeps_the_catalog_entry_intact():
    cut = gpu_check.truncated_shape("gpt-j-6b")
    assert cut == dataclasses.replace(find("gpt-j-6b"), layers=4, name=cut.name)
    assert find("gpt-j-6b").layers == 28
