"""Fault injection into the UI's handlers: each expected error (a full disk, a refused write, a
busy lock, every engine exception) becomes a sentence on the page, never Gradio's error popup.
Also: run choosers keep choices and value together, and the Data and Train tabs share one max
sequence length, whose change re-runs the Data tab's statistics."""

import errno

import gradio as gr
import pytest
from filelock import Timeout

from app import data_tab, hardware_tab, runs_tab, train_tab
from engine import compare, planner
from engine.catalog import CatalogError
from engine.config import ConfigError, RunConfig
from engine.data import DataError
from engine.models import ModelError
from engine.readers import UploadError
from engine.runner import RunnerError, create_run
from engine.templates import TemplateError

# (error, words the page must show for it)
ERRORS = {
    "disk full": (OSError(errno.ENOSPC, "No space left on device", "/data/runs/r1/status.json"),
                  "The disk is full: could not write /data/runs/r1/status.json"),
    "refused": (PermissionError(errno.EACCES, "Permission denied", "/data/uploads"),
                "No permission to change /data/uploads"),
    "lock busy": (Timeout("/data/runs/.queue.lock"), ".queue.lock stayed busy"),
    "runner": (RunnerError("run r1 is training: stop it before deleting it"), "run r1 is training"),
    "config": (ConfigError("max_seq_len 4 is too short: use at least 16"), "max_seq_len 4"),
    "data": (DataError("no usable rows: every row has a problem"), "no usable rows"),
    "template": (TemplateError("the model's chat template needs alternating turns"),
                 "alternating turns"),
    "model": (ModelError("model 'x/y' not found on the Hugging Face Hub"), "not found on the"),
    "catalog": (CatalogError("presets/models.yaml: entry 3 lacks 'layers'"), "lacks 'layers'"),
    "upload": (UploadError("'a.txt' is not a .jsonl, .json, .csv, .parquet file"), "is not a"),
}


def raiser(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def assert_sentence(text, words):
    assert isinstance(text, str)
    assert words.lower() in text.lower(), text
    assert "Traceback" not in text and "Errno" not in text and "could not be acquired" not in text


def fake_run(name="r1"):
    return create_run(RunConfig(data_path="facts.jsonl"), name)


# Each case injects the error at one engine call a handler makes, calls the handler as Gradio
# would, and returns the text the page shows.

def _recipe(mp, exc):
    mp.setattr(train_tab, "load_recipe", raiser(exc))
    shown, *fields = train_tab.recipe_values("default")
    assert all(value == gr.skip() for value in fields)  # the form keeps what it had
    return shown


def _start(mp, exc):
    values = train_tab.recipe_values("quick-test")[1:]
    mp.setattr(train_tab, "start_run", raiser(exc))
    picker, message = train_tab.start("quick-test", "embedded", "", "facts.jsonl", "guanaco",
                                      *values)
    return message


def _stop(mp, exc):
    fake_run()
    mp.setattr(train_tab, "stop_run", raiser(exc))
    return train_tab.stop(train_tab.run_choices()[0])


def _resume(mp, exc):
    mp.setattr(train_tab, "get_run", raiser(exc))
    return train_tab.resume("r1")


def _live_view(mp, exc):
    fake_run()
    mp.setattr(train_tab, "read_health", raiser(exc))
    view = train_tab.live_view(train_tab.run_choices()[0])
    assert len(view) == len(train_tab.blank_view()) + 1
    return view[0]


def _memory_bar(mp, exc):
    mp.setattr(planner, "model_shape", raiser(exc))
    return train_tab.memory_bar("embedded", "", 256, 1, 16)


def _check_data_store(mp, exc, tmp_path):
    upload = tmp_path / "rows.jsonl"
    upload.write_text('{"prompt": "a", "completion": "b"}\n')
    mp.setattr(data_tab, "store_upload", raiser(exc))
    result = data_tab.check_data(str(upload), "", "auto", "", "guanaco", 256, False, "embedded", "",
                                 lambda *a, **k: None)
    assert result[0] == "" and result[5] == {}  # nothing to train on, no time estimate
    return result[1]


def _check_data_read(mp, exc, tmp_path):
    upload = tmp_path / "rows.jsonl"
    upload.write_text('{"prompt": "a", "completion": "b"}\n')
    mp.setattr(data_tab, "preview_template", raiser(exc))
    result = data_tab.check_data(str(upload), "", "auto", "", "guanaco", 256, False, "embedded", "",
                                 lambda *a, **k: None)
    return result[1]  # a template error only costs the preview: the rows are still checked


def _check_eval(mp, exc, tmp_path):
    upload = tmp_path / "eval.jsonl"
    upload.write_text('{"prompt": "a", "completion": "b"}\n')
    mp.setattr(data_tab, "read_dataset", raiser(exc))
    path, message = data_tab.check_eval(str(upload), "auto", "")
    assert path == ""
    return message


def _export(mp, exc):
    fake_run()
    mp.setattr(compare, "export_metrics_csv", raiser(exc))
    path, message = runs_tab.export_csv(train_tab.run_choices()[0])
    assert path is None
    return message


def _configs(mp, exc):
    mp.setattr(compare, "find_runs", raiser(exc))
    assert runs_tab.overlay(["r1"]) == gr.skip()  # the chart keeps what it drew
    assert runs_tab.drop_gone(["r1"]) == gr.skip()
    return runs_tab.configs_html(["r1"])


def _delete(mp, exc):
    fake_run()
    mp.setattr(runs_tab, "delete_run", raiser(exc))
    row, message, *views = runs_tab.confirm_delete(train_tab.run_choices()[0])
    assert len(views) == 6
    return message


def _queue(mp, exc):
    fake_run()
    mp.setattr(runs_tab, "move_queued", raiser(exc))
    return runs_tab.queue_action(train_tab.run_choices()[0], "up")


def _refresh_start_next(mp, exc):
    mp.setattr(runs_tab, "start_next", raiser(exc))
    table, queue, *choosers = runs_tab.refresh()
    assert len(choosers) == 4
    return queue


def _refresh_list(mp, exc):
    mp.setattr(runs_tab, "list_runs", raiser(exc))
    table, queue, *choosers = runs_tab.refresh()
    assert table == gr.skip() and all(update == gr.skip() for update in choosers)
    return queue


def _hardware(mp, exc):
    mp.setattr(hardware_tab, "detect", raiser(exc))
    return hardware_tab.hardware_markdown()


def _recommend(mp, exc):
    mp.setattr(planner, "recommend", raiser(exc))
    info, ranked, model = hardware_tab.refreshed("embedded")
    assert model == gr.skip()
    return ranked


CASES = {"train: recipe": _recipe, "train: start": _start, "train: stop": _stop,
         "train: resume": _resume, "train: live view": _live_view,
         "train: memory plan": _memory_bar, "runs: export": _export, "runs: compare": _configs,
         "runs: delete": _delete, "runs: queue": _queue, "runs: refresh": _refresh_start_next,
         "runs: list": _refresh_list, "hardware: machine": _hardware,
         "hardware: recommendations": _recommend}
DATA_CASES = {"data: upload": _check_data_store, "data: read": _check_data_read,
              "data: eval file": _check_eval}


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("case", CASES)
def test_every_expected_error_is_a_sentence(data_dir, monkeypatch, case, error):
    exc, words = ERRORS[error]
    assert_sentence(CASES[case](monkeypatch, exc), words)


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("case", DATA_CASES)
def test_every_expected_data_error_is_a_sentence(data_dir, tmp_path, monkeypatch, case, error):
    exc, words = ERRORS[error]
    assert_sentence(DATA_CASES[case](monkeypatch, exc, tmp_path), words)


def test_a_full_disk_and_a_busy_lock_read_as_advice(data_dir, monkeypatch):
    full, _ = ERRORS["disk full"]
    assert "Free some space" in _delete(monkeypatch, full)
    busy, _ = ERRORS["lock busy"]
    assert "Try again in a moment" in _queue(monkeypatch, busy)


def test_the_prompt_format_stays_when_the_catalog_cannot_be_read(monkeypatch):
    monkeypatch.setattr(data_tab, "default_template", raiser(ERRORS["catalog"][0]))
    assert data_tab.template_for("embedded", "") == gr.skip()


# --- run choosers: choices and value together -------------------------------------------------

def test_a_run_chooser_clears_a_run_deleted_meanwhile_and_keeps_the_rest(data_dir):
    kept = fake_run("kept").name
    assert "value" not in train_tab.run_picker(kept)  # not sent: it would undo a newer pick
    assert train_tab.run_picker(kept)["choices"] == [kept]
    gone = train_tab.run_picker("20240101-000000-gone")
    assert gone["value"] is None and gone["choices"] == [kept]
    table, queue, victim, queued, chosen, csv_choice = runs_tab.refresh("gone", "gone", kept)
    assert victim == {"__type__": "update", "choices": [kept], "value": None}
    assert queued == {"__type__": "update", "choices": [], "value": None}  # started or cancelled
    assert "value" not in csv_choice and csv_choice["choices"] == [kept]
    assert train_tab.live_view(None)[0] == "Choose a run to follow."  # a cleared picker
    views = runs_tab.confirm_delete(kept)[2:]
    assert views[2]["value"] is None  # the deleted run leaves the delete chooser
    assert train_tab.live_view(None)[0] == "No run yet: upload data, then press Start."


def test_the_train_tab_run_chooser_passes_a_stale_run_on_to_be_answered_in_words(data_dir):
    fake_run("kept")
    with gr.Blocks():
        hardware = hardware_tab.build()
        train = train_tab.build(hardware, data_tab.build(hardware))
    assert train["run"].preprocess("gone") == "gone"  # handed on, not refused by Gradio
    assert "not found" in train_tab.live_view("gone")[0]


def test_refreshing_the_hardware_keeps_the_chosen_model():
    info, ranked, model = hardware_tab.refreshed("gpt-j-6b")
    assert model["value"] == "gpt-j-6b" and "gpt-j-6b" in [v for _, v in model["choices"]]
    default = hardware_tab.model_choices(*hardware_tab.ranked_models())[1]
    assert hardware_tab.refreshed("no-longer-in-the-catalog")[2]["value"] == default


# --- one max sequence length ------------------------------------------------------------------

class Page:
    """A stand-in for the browser: component values, and events fired the way Gradio's frontend
    fires them (a handler's new value fires that component's change, never its input)."""

    def __init__(self, demo):
        self.fns = list(demo.fns.values())
        self.values = {block_id: getattr(block, "value", None)
                       for block_id, block in demo.blocks.items()}

    def fire(self, component, event: str):
        for fn in self.fns:
            if (component._id, event) in fn.targets and fn.trigger_after is None:
                self.run(fn)

    def type(self, component, value):
        self.values[component._id] = value
        self.fire(component, "input")
        self.fire(component, "change")

    def run(self, fn):
        if fn.fn is None:  # a browser-only (js) handler
            return
        result = fn.fn(*[self.values[block._id] for block in fn.inputs])
        results = [result] if len(fn.outputs) == 1 else list(result or [])
        for block, value in zip(fn.outputs, results):
            if isinstance(value, dict) and value.get("__type__") == "update":
                if "value" not in value:
                    continue
                value = value["value"]
            if value != self.values[block._id]:
                self.values[block._id] = value
                self.fire(block, "change")
        for then in self.fns:
            if then.trigger_after == fn._id:
                self.run(then)


@pytest.fixture
def page(data_dir, monkeypatch):
    """The Hardware, Data and Train tabs with the Data tab's check recording its max length."""
    checked = []

    def check_data(*inputs):
        checked.append(inputs[5])
        return "", "checked", [], "", None, {}

    monkeypatch.setattr(data_tab, "check_data", check_data)
    with gr.Blocks() as demo:
        hardware = hardware_tab.build()
        data = data_tab.build(hardware)
        train_tab.build(hardware, data)
    ids = {block.elem_id: block for block in demo.blocks.values()
           if getattr(block, "elem_id", None)}
    view = Page(demo)
    return view, ids, checked


def lengths(view, ids):
    return (view.values[ids["cfg-max_seq_len"]._id], view.values[ids["data-max-seq-len"]._id])


def test_the_data_tab_starts_with_the_recipes_max_seq_len(page):
    view, ids, _ = page
    recipe = train_tab.load_recipe(view.values[ids["recipe-choice"]._id])
    assert lengths(view, ids) == (recipe.max_seq_len, recipe.max_seq_len)


def test_typing_in_either_field_sets_both_and_reruns_the_statistics(page):
    view, ids, checked = page
    view.type(ids["cfg-max_seq_len"], 1024)
    assert lengths(view, ids) == (1024, 1024) and checked == [1024]
    view.type(ids["data-max-seq-len"], 300)
    assert lengths(view, ids) == (300, 300) and checked == [1024, 300]


def test_a_recipe_sets_both_fields_and_reruns_the_statistics(page):
    view, ids, checked = page
    recipe = ids["recipe-choice"]
    other = next(name for name in train_tab.recipe_names()
                 if train_tab.load_recipe(name).max_seq_len != lengths(view, ids)[0])
    view.values[recipe._id] = other
    view.fire(recipe, "change")
    wanted = train_tab.load_recipe(other).max_seq_len
    assert lengths(view, ids) == (wanted, wanted) and checked == [wanted]
