"""What the live charts draw, computed from a run's metrics.jsonl records (pure Python, no UI).

The UI turns each series into a plot; the Runs tab's comparison reuses `smooth`. Everything is
derived from the run directory's records, so a reload or a restarted UI draws the same charts.
"""

from __future__ import annotations

import math

# The charts the Train tab draws, each with the record fields it plots: (series name, field).
MEMORY_GPU = (("GPU allocated", "gpu_mem_gb"), ("GPU reserved", "gpu_reserved_gb"))
MEMORY_CPU = (("RAM", "ram_gb"),)
SINGLE = {"lr": ("learning rate", "lr"), "grad_norm": ("gradient norm", "grad_norm"),
          "tokens_per_s": ("tokens/s", "tokens_per_s")}
CHARTS = ("loss", "lr", "grad_norm", "tokens_per_s", "memory")


def smooth(values: list[float | None], weight: float = 0.9) -> list[float | None]:
    """Exponential moving average as TensorBoard draws it: debiased, so the first points are not
    pulled toward the 0 the average starts from. None (and NaN/inf) stay None and leave the
    average untouched, so a missing point neither breaks nor drags the line."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out: list[float | None] = []
    average, count = 0.0, 0
    for value in values:
        if not _finite(value):
            out.append(None)
            continue
        average = average * weight + (1 - weight) * value
        count += 1
        # After n points the weights sum to 1 - weight**n, not 1: divide it back out.
        out.append(average / (1 - weight ** count))
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def latest_per_step(records: list[dict], field: str) -> list[dict]:
    """The records that carry `field`, one per step, in step order. A resumed run may repeat steps
    (rundir.drop_metrics_after normally removes them; a crash before it may not): the later record
    wins, because it is the work the run kept."""
    by_step: dict[int, dict] = {}
    for record in records:
        step = record.get("step")
        if isinstance(step, int) and _finite(record.get(field)):
            by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def _row(record: dict, value: float, series: str) -> dict:
    return {"step": record["step"], "epoch": record.get("epoch"), "value": value, "series": series}


def loss_rows(records: list[dict], log_scale: bool = False, weight: float = 0.9) -> list[dict]:
    """Training loss (raw, and smoothed), and eval loss, on one axis. On a log scale the plotted
    value is log10(loss), and `loss` keeps the real value for the tooltip; a loss of 0 or below
    has no logarithm and is left out."""
    train = latest_per_step(records, "loss")
    evals = latest_per_step(records, "eval_loss")
    smoothed = smooth([r["loss"] for r in train], weight)
    points = [(r, r["loss"], "train") for r in train]
    points += [(r, s, "train (smoothed)") for r, s in zip(train, smoothed) if s is not None]
    points += [(r, r["eval_loss"], "eval") for r in evals]
    rows = []
    for record, loss, series in points:
        if not log_scale:
            rows.append(_row(record, loss, series))
        elif loss > 0:
            rows.append(dict(_row(record, math.log10(loss), series), loss=loss))
    return rows


def field_rows(records: list[dict], fields: tuple[tuple[str, str], ...]) -> list[dict]:
    """One series per (name, field), each point at its step, for the small charts."""
    return [_row(r, r[field], name) for name, field in fields
            for r in latest_per_step(records, field)]


def chart_series(records: list[dict], log_scale: bool = False, weight: float = 0.9) -> dict:
    """Every chart's rows from a run's records: {chart name: [row, ...]}; a chart with no data has
    an empty list (the UI then shows no plot rather than an empty one). Memory is the GPU's
    allocated and reserved memory on a GPU run, else the process's RAM."""
    gpu = any(_finite(r.get("gpu_mem_gb")) for r in records)
    series = {"loss": loss_rows(records, log_scale, weight),
              "memory": field_rows(records, MEMORY_GPU if gpu else MEMORY_CPU)}
    for chart, name_field in SINGLE.items():
        series[chart] = field_rows(records, (name_field,))
    return {chart: series[chart] for chart in CHARTS}


def health_rows(records: list[dict]) -> list[dict]:
    """GPU utilisation (%) and temperature (C) over the minutes since the first sample: both live
    in 0..100, so one small chart holds them."""
    samples = sorted((r for r in records if _finite(r.get("time"))), key=lambda r: r["time"])
    if not samples:
        return []
    start = min(r["time"] for r in samples)
    several = len({r.get("gpu") for r in samples}) > 1  # a run on several GPUs: a line per GPU
    rows = []
    for name, field in (("utilisation %", "util_pct"), ("temperature C", "temp_c")):
        for r in samples:
            if _finite(r.get(field)):
                rows.append({"minute": round((r["time"] - start) / 60, 3), "value": r[field],
                             "series": f"GPU {r.get('gpu')} {name}" if several else name})
    return rows
