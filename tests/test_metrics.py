"""The live charts' data (engine/metrics.py): smoothing and the series built from metrics.jsonl."""

from __future__ import annotations

import math

import pytest

from engine.metrics import chart_series, health_rows, loss_rows, smooth


def test_smoothing_is_debiased_so_the_first_point_is_the_first_value():
    # A plain EMA starting at 0 would give 0.1 * 4 = 0.4 for the first point.
    assert smooth([4.0, 2.0], 0.9)[0] == pytest.approx(4.0)
    # Second: (0.9 * 0.4 + 0.1 * 2) / (1 - 0.81) = 0.56 / 0.19
    assert smooth([4.0, 2.0], 0.9)[1] == pytest.approx(0.56 / 0.19)


def test_a_constant_series_stays_constant():
    assert smooth([3.0] * 50, 0.95) == pytest.approx([3.0] * 50)


def test_smoothing_keeps_none_and_skips_it():
    out = smooth([2.0, None, float("nan"), 4.0], 0.5)
    assert out[1] is None and out[2] is None
    # The gap leaves the average untouched: the last point is as if the gaps were not there.
    assert out[3] == pytest.approx(smooth([2.0, 4.0], 0.5)[1])
    assert smooth([None, None]) == [None, None]


def test_weight_zero_is_the_raw_series_and_a_bad_weight_is_refused():
    assert smooth([1.0, 5.0, 2.0], 0.0) == [1.0, 5.0, 2.0]
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


def records():
    """A run resumed at step 2 after a crash: steps 3 and 4 were logged twice (no drop_metrics_after
    ran), the second time with other values; an eval at step 4; a non-finite loss at step 5."""
    def train(step, loss):
        return {"step": step, "epoch": step / 10, "loss": loss, "eval_loss": None,
                "lr": 1e-4 * step, "grad_norm": 0.5, "tokens_per_s": 100.0 + step,
                "gpu_mem_gb": None, "ram_gb": 1.5, "time": step}

    return [train(1, 4.0), train(2, 3.0), train(3, 9.0), train(4, 9.0),
            train(3, 2.0), train(4, 1.0),
            {"step": 4, "epoch": 0.4, "loss": None, "eval_loss": 1.5, "time": 4.5},
            train(5, float("nan"))]


def test_a_resumed_runs_repeated_steps_appear_once_in_order_with_the_later_value():
    rows = loss_rows(records())
    train = [(r["step"], r["value"]) for r in rows if r["series"] == "train"]
    assert train == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]  # no NaN step 5, no 9.0s
    smoothed = [r["value"] for r in rows if r["series"] == "train (smoothed)"]
    assert smoothed == pytest.approx(smooth([4.0, 3.0, 2.0, 1.0]))
    assert [(r["step"], r["value"]) for r in rows if r["series"] == "eval"] == [(4, 1.5)]
    assert all(r["epoch"] is not None for r in rows)  # the tooltip shows it


def test_log_scale_plots_log10_and_keeps_the_real_loss_for_the_tooltip():
    rows = loss_rows(records() + [{"step": 6, "loss": 0.0}], log_scale=True)
    train = [r for r in rows if r["series"] == "train"]
    assert [r["value"] for r in train] == pytest.approx([math.log10(v) for v in (4, 3, 2, 1)])
    assert [r["loss"] for r in train] == [4.0, 3.0, 2.0, 1.0]  # a loss of 0 has no log: left out
    assert "loss" not in loss_rows(records())[0]


def test_every_chart_gets_its_series():
    charts = chart_series(records())
    assert set(charts) == {"loss", "lr", "grad_norm", "tokens_per_s", "memory"}
    assert [r["value"] for r in charts["lr"]] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 5e-4])
    assert [r["step"] for r in charts["tokens_per_s"]] == [1, 2, 3, 4, 5]
    assert {r["series"] for r in charts["memory"]} == {"RAM"}  # a CPU run: RAM


def test_a_gpu_run_charts_allocated_and_reserved_memory_not_ram():
    recs = [{"step": 1, "loss": 1.0, "gpu_mem_gb": 2.0, "gpu_reserved_gb": 3.0, "ram_gb": 5.0}]
    memory = chart_series(recs)["memory"]
    assert {(r["series"], r["value"]) for r in memory} == {("GPU allocated", 2.0),
                                                          ("GPU reserved", 3.0)}


def test_no_records_means_no_points():
    assert all(rows == [] for rows in chart_series([]).values())
    assert health_rows([]) == []


def test_health_rows_are_utilisation_and_temperature_over_minutes():
    rows = health_rows([{"time": 100.0, "util_pct": 90, "temp_c": 60},
                        {"time": 160.0, "util_pct": 95, "temp_c": None}])
    assert [(r["minute"], r["value"]) for r in rows if r["series"] == "utilisation %"] == \
        [(0.0, 90), (1.0, 95)]
    assert [r["value"] for r in rows if r["series"] == "temperature C"] == [60]


def test_the_train_tab_shows_gpu_health_only_when_the_run_has_samples(tmp_path):
    """The page side of GPU health, which the CPU-only browser test cannot reach."""
    import json

    from app import train_tab
    from engine.gpuhealth import health_path
    from engine.rundir import RunDir

    run = RunDir(tmp_path / "my run")
    run.path.mkdir()
    run.write_status(state="running", step=1, total_steps=9)
    run.append_metric({"step": 1, "epoch": 0.1, "loss": 2.0, "gpu_mem_gb": 1.0,
                       "gpu_reserved_gb": 1.5})
    status, *plots, state, command = train_tab.run_view(run)
    assert plots[-1]["visible"] is False and "GPU 0" not in status  # no samples: no health
    assert "reserved 1.5 GB" in status and state == "my run|running"
    assert command == (f'python -m engine train --config "{run.config_path}" '
                       f'--out "{tmp_path / "my run-again"}"')  # quoted: the name has a space

    sample = {"time": 1.0, "gpu": 0, "util_pct": 97, "mem_used_gb": 10.2, "mem_total_gb": 12.0,
              "temp_c": 71, "power_w": 280, "power_limit_w": 350, "throttle": []}
    health_path(run).write_text(json.dumps(sample) + "\n")
    status, *plots, _, _ = train_tab.run_view(run)
    assert "GPU 0: 97% busy" in status
    assert plots[-1]["visible"] is True and len(plots[-1]["value"]) == 2  # utilisation, temperature
