"""On a CUDA GPU only (skipped elsewhere, and never in CI): the real recipe trains on the GPU with
the paper's paged AdamW and 16-bit compute, and reports the GPU memory it holds."""

import pytest

from engine.config import load_recipe
from engine.runner import create_run
from engine.train import run_training


@pytest.mark.gpu
@pytest.mark.slow
def test_trains_on_the_gpu_with_a_paged_optimizer(data_dir, facts_file, embedded_model):
    import torch

    cfg = load_recipe("quick-test", data_path=str(facts_file), max_steps=4, save_steps=2)
    run = create_run(cfg, name="gpu")
    assert run_training(str(run.path)) == "finished", run.read_status()
    status = run.read_status()
    assert status["device"] == "cuda" and status["optimizer"] == "paged_adamw_32bit"
    native = torch.cuda.is_bf16_supported(including_emulation=False)  # bf16 only where native
    expected = "bfloat16" if native else "float16"
    assert expected in run.log_path.read_text()
    losses = [m for m in run.read_metrics() if m.get("loss") is not None]
    assert len(losses) == 4 and all(m["gpu_mem_gb"] > 0 for m in losses)
    assert run.latest_checkpoint() is not None
