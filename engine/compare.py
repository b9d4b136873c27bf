"""Runs side by side: their loss curves on one chart, their configs with the differences first,
and a run's metrics as CSV. Pure Python on the run directories, so the UI only draws the result.

Runs are named as the UI names them; a name whose run is gone (deleted in another tab) is left
out with a sentence saying so, never an error: the comparison shows what still exists.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from engine.config import ConfigError, RunConfig
from engine.metrics import latest_per_step, smooth
from engine.paths import data_dir
from engine.rundir import RunDir, replace_atomically
from engine.runner import RunnerError, get_run

# The fields metrics.jsonl promises, in the CSV's column order; any others follow, as first seen.
FIELDS = ("step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gb",
          "ram_gb", "time")
OVERLAID = 8  # more curves than this on one chart are unreadable
# Vega's category10 (distinct hues on the light and the dark theme); set per run, so a run keeps
# its colour whether or not its raw curve is shown.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def find_runs(names: list[str]) -> tuple[list[RunDir], list[str]]:
    """The runs behind these names, in the order given, and a sentence for each one not found."""
    runs, notes = [], []
    for name in dict.fromkeys(names or []):  # a name chosen twice is one run
        try:
            runs.append(get_run(name))
        except RunnerError:
            notes.append(f"Run {name} no longer exists; it is left out.")
    return runs, notes


def overlay_rows(runs: list[RunDir], raw: bool = False, weight: float = 0.9) -> list[dict]:
    """Each run's training loss per step, smoothed (and raw too if asked): one series per run,
    named after it. A run deleted while it is read simply has no points."""
    rows = []
    for run in runs[:OVERLAID]:
        train = latest_per_step(run.read_metrics(), "loss")
        smoothed = smooth([r["loss"] for r in train], weight)
        rows += [{"step": r["step"], "loss": s, "series": run.name}
                 for r, s in zip(train, smoothed) if s is not None]
        if raw:
            rows += [{"step": r["step"], "loss": r["loss"], "series": f"{run.name} (raw)"}
                     for r in train]
    return rows


def series_colors(runs: list[RunDir]) -> dict[str, str]:
    """A colour per run; its raw curve gets a paler shade of the same colour, as in TensorBoard."""
    colors = {}
    for run, color in zip(runs[:OVERLAID], PALETTE):
        colors[run.name] = color
        colors[f"{run.name} (raw)"] = _paler(color)
    return colors


def _paler(color: str) -> str:
    channels = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{c + (255 - c) * 3 // 5:02x}" for c in channels)


def load_configs(runs: list[RunDir]) -> tuple[dict[str, dict], list[str]]:
    """{run name: its settings} for the runs whose config.yaml reads; a sentence per other run."""
    configs, notes = {}, []
    for run in runs:
        try:
            configs[run.name] = RunConfig.load(run.config_path).to_dict()
        except FileNotFoundError:
            notes.append(f"Run {run.name} no longer exists; it is left out.")
        except (OSError, ConfigError) as exc:
            notes.append(f"Run {run.name}'s config.yaml cannot be read ({exc}); it is left out.")
    return configs, notes


def config_diff(configs: dict[str, dict]) -> list[dict]:
    """One row per setting: {"setting", "values" (one per run, in the runs' order), "differs"}.
    The settings that differ come first, so what changed between runs is seen at once; within
    each group, the config's own order."""
    settings = list(dict.fromkeys(key for config in configs.values() for key in config))
    rows = []
    for setting in settings:
        values = [config.get(setting) for config in configs.values()]
        rows.append({"setting": setting, "values": values,
                     "differs": any(v != values[0] for v in values[1:])})
    return sorted(rows, key=lambda row: not row["differs"])  # stable: keeps the order in each group


def metrics_csv(run: RunDir) -> str:
    """metrics.jsonl as CSV: a header of every field (the standard ones first, even with no
    records, then any others), one row per record, an empty cell where a record lacks a field."""
    records = run.read_metrics()
    extra = [key for record in records for key in record if key not in FIELDS]
    header = list(FIELDS) + list(dict.fromkeys(extra))
    out = io.StringIO()
    # "\n": the text is written in text mode, which turns it into the platform's line ending.
    writer = csv.DictWriter(out, header, restval="", lineterminator="\n")
    writer.writeheader()
    for record in records:
        # str(float) is the shortest text that reads back as the same float; None is an empty cell.
        writer.writerow({key: json.dumps(value) if isinstance(value, (dict, list)) else value
                         for key, value in record.items()})
    return out.getvalue()


def export_metrics_csv(run: RunDir) -> Path:
    """Write the run's metrics CSV under the data dir (the only folder the app serves files from)
    and return its path; named after the run, so the downloaded file says which run it is."""
    folder = data_dir() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run.name}-metrics.csv"
    replace_atomically(path, metrics_csv(run))
    return path
