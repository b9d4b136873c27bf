"""Runs compared: loss curves overlaid (smoothed, one series per run), configs side by side with
the differing settings first, a run's metrics as CSV, and choices that went stale (a run deleted
in another tab) answered in words, never with Gradio's "not in the list of choices" error."""

import csv
import io
import shutil
from pathlib import Path

import gradio as gr
import pytest

from app import runs_tab
from appserver import AppServer
from engine import compare
from engine.config import RunConfig
from engine.metrics import smooth
from engine.runner import create_run

LOSSES = [2.5, 2.0, None, 1.6, 1.2]  # step 3 logged only an eval loss


def make_run(name: str, losses=(), **settings):
    run = create_run(RunConfig(data_path="facts.jsonl", **settings), name)
    for step, loss in enumerate(losses, start=1):
        run.append_metric({"step": step, "epoch": step / 10, "loss": loss,
                           "eval_loss": 1.9 if loss is None else None, "lr": 2e-4 / step,
                           "grad_norm": 0.1 * step, "tokens_per_s": 250.5, "gpu_mem_gb": None,
                           "ram_gb": 1.234567891, "time": 1_700_000_000.123 + step})
    return run


@pytest.fixture
def three(data_dir):
    return [make_run("base", LOSSES), make_run("low-lr", [3.0, 2.9], lr=1e-4),
            make_run("small-r", lora_r=16)]


def test_config_diff_marks_exactly_the_settings_that_differ(three):
    configs, notes = compare.load_configs(three)
    assert notes == [] and list(configs) == [run.name for run in three]
    rows = compare.config_diff(configs)
    differ = {row["setting"]: row["values"] for row in rows if row["differs"]}
    assert differ == {"lr": [2e-4, 1e-4, 2e-4], "lora_r": [64, 64, 16]}
    assert [row["differs"] for row in rows[:2]] == [True, True]  # differences come first
    assert {row["setting"] for row in rows} == set(RunConfig().to_dict())  # nothing lost
    # Two runs that share lora_r: only lr differs between them.
    two = compare.config_diff(compare.load_configs(three[:2])[0])
    assert [row["setting"] for row in two if row["differs"]] == ["lr"]


def test_config_table_highlights_the_differences_and_folds_the_rest(three):
    page = runs_tab.configs_html([run.name for run in three])
    shown, folded = page.split("<details>")
    for run in three:
        assert run.name in shown  # one column per run
    assert "2 setting(s) differ" in shown
    assert "≠ lr" in shown and "≠ lora_r" in shown and runs_tab.HIGHLIGHT in shown
    assert "lora_alpha" in folded and "lora_alpha" not in shown
    assert "≠" not in folded


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_metrics_csv_has_every_field_and_round_trips(data_dir):
    run = make_run("csv", LOSSES)
    run.append_metric({"step": 6, "loss": 1.1, "util_pct": 97})  # a field beyond the standard ones
    text = compare.metrics_csv(run)
    assert text.splitlines()[0].split(",") == [*compare.FIELDS, "util_pct"]
    rows = read_csv(text)
    records = run.read_metrics()
    assert len(rows) == len(records) == 6
    for row, record in zip(rows, records):
        for field in row:
            value = record.get(field)
            if value is None:
                assert row[field] == ""  # missing or None: an empty cell
            else:
                assert type(value)(row[field]) == value  # the same number, to the last bit


def test_a_run_without_metrics_exports_a_header_and_says_so(data_dir):
    run = make_run("empty")
    assert compare.metrics_csv(run) == ",".join(compare.FIELDS) + "\n"
    path, message = runs_tab.export_csv(run.name)
    assert "no metrics yet" in message and "only the header" in message
    assert Path(path).read_text() == ",".join(compare.FIELDS) + "\n"


def test_export_writes_the_csv_under_the_data_dir_named_after_the_run(data_dir):
    run = make_run("export", LOSSES)
    path, message = runs_tab.export_csv(run.name)
    # The app serves files only from the data dir: the CSV must be there to be downloadable.
    assert path.startswith(str(data_dir)) and path.endswith(f"{run.name}-metrics.csv")
    assert Path(path).read_text() == compare.metrics_csv(run)
    assert "5 logged step(s)" in message


def test_overlay_draws_each_chosen_run_smoothed(three):
    base, low_lr, small_r = three
    frame = runs_tab.overlay([base.name, low_lr.name, small_r.name])["value"]
    assert set(frame["series"]) == {base.name, low_lr.name}  # small-r has no loss yet: no curve
    mine = frame[frame["series"] == base.name]
    assert list(mine["step"]) == [1, 2, 4, 5]
    assert list(mine["loss"]) == pytest.approx(smooth([2.5, 2.0, 1.6, 1.2]))
    assert list(mine["loss"]) != [2.5, 2.0, 1.6, 1.2]  # really smoothed, not the raw values

    update = runs_tab.overlay([base.name], raw=True)
    frame = update["value"]
    raw = frame[frame["series"] == f"{base.name} (raw)"]
    assert list(raw["loss"]) == [2.5, 2.0, 1.6, 1.2]
    assert set(update["color_map"]) >= set(frame["series"])  # every curve has its colour
    assert update["colors_in_legend"] == list(dict.fromkeys(frame["series"]))  # and no others


def test_a_run_deleted_meanwhile_is_dropped_without_an_error(three):
    base, low_lr, _ = three
    shutil.rmtree(low_lr.path)
    frame = runs_tab.overlay([base.name, low_lr.name])["value"]
    assert set(frame["series"]) == {base.name}
    page = runs_tab.configs_html([base.name, low_lr.name])
    assert f"Run {low_lr.name} no longer exists" in page
    # Deleted between finding the runs and reading them: no points, no error.
    runs, _ = compare.find_runs([base.name])
    shutil.rmtree(base.path)
    assert compare.overlay_rows(runs) == []
    assert "no longer exists" in " ".join(compare.load_configs(runs)[1])


def test_the_next_refresh_takes_a_deleted_run_out_of_the_comparison(three):
    names = [run.name for run in three]
    assert runs_tab.drop_gone(names) == gr.skip()  # nothing gone: no update, so no redraw
    shutil.rmtree(three[1].path)
    assert runs_tab.drop_gone(names) == [names[0], names[2]]
    assert runs_tab.drop_gone(None) == gr.skip()


def test_handlers_answer_choices_that_no_longer_exist_in_words(data_dir):
    assert runs_tab.overlay(["gone"])["value"] is None  # an empty chart, not an error
    assert runs_tab.overlay(None)["value"] is None
    assert "Run gone no longer exists" in runs_tab.configs_html(["gone"])
    assert "Choose runs" in runs_tab.configs_html([])
    path, message = runs_tab.export_csv("gone")
    assert path is None and "not found" in message
    assert runs_tab.export_csv(None) == (None, "Choose a run to export.")
    _, message, *_ = runs_tab.confirm_delete("gone")
    assert "not found" in message
    assert "not found" in runs_tab.queue_action("gone", "up")


def test_run_choosers_accept_a_run_removed_from_their_choices(data_dir):
    """The page may still hold a run deleted in another tab: Gradio must pass it to the handler
    (which says it is gone) instead of refusing it with its own error."""
    make_run("kept")
    with gr.Blocks():
        views = runs_tab.build()["views"]
    choosers = [view for view in views if isinstance(view, gr.Dropdown)]
    assert len(choosers) == 4  # delete, queue, compare, export
    for chooser in choosers:
        stale = ["gone"] if chooser.multiselect else "gone"
        assert chooser.preprocess(stale) == stale  # handed on, not refused


def test_refresh_keeps_the_views_in_step_with_the_run_list(three):
    table, queue, *choosers = runs_tab.refresh()
    assert list(table["run"]) == sorted((run.name for run in three), reverse=True)
    assert len(choosers) == 4
    for update in choosers[:1] + choosers[2:]:
        assert update["choices"] == list(table["run"])
        assert "value" not in update  # what a person chose stays chosen


@pytest.mark.slow
def test_the_real_app_serves_the_csv_to_a_client(data_dir):
    from gradio_client import Client

    run = make_run("served", LOSSES)
    server = AppServer(data_dir).wait_ready()
    try:
        path, message = Client(server.url, verbose=False).predict(
            run.name, api_name="/export_metrics_csv")
        assert "5 logged step(s)" in message
        assert Path(path).read_text() == compare.metrics_csv(run)  # downloaded over HTTP
        assert Path(path).name == f"{run.name}-metrics.csv"
    finally:
        server.stop()
