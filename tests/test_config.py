"""The run configuration: YAML round trip, coercion of form strings, validation, recipes."""

import dataclasses
import inspect

import pytest

from engine.config import (
    ConfigError,
    RunConfig,
    load_recipe,
    recipe_description,
    recipe_names,
)


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(model="mistral-7b", data_path="/data/train.jsonl", eval_share=0.1,
                    template="alpaca", lr=1.5e-4, lora_r=8, group_by_length=False, epochs=2.5,
                    max_steps=100, compute_dtype="fp16")
    path = tmp_path / "config.yaml"
    cfg.save(path)
    loaded = RunConfig.load(path)
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded != RunConfig()  # the round trip kept the changes, not the defaults


def test_defaults_round_trip_with_exact_types(tmp_path):
    path = tmp_path / "config.yaml"
    RunConfig().save(path)
    loaded = RunConfig.load(path)
    assert loaded == RunConfig()
    for f in dataclasses.fields(RunConfig):
        assert type(getattr(loaded, f.name)).__name__ == f.type, f.name


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"lora_r": "3"}, {"lora_r": 3}),
        ({"lr": "2e-4"}, {"lr": 2e-4}),
        ({"lr": 1}, {"lr": 1.0}),
        ({"epochs": "3"}, {"epochs": 3.0}),
        ({"max_steps": 20.0}, {"max_steps": 20}),
        ({"group_by_length": "false", "double_quant": "yes"},
         {"group_by_length": False, "double_quant": True}),
        ({"seed": "7", "eval_share": "0.25"}, {"seed": 7, "eval_share": 0.25}),
    ],
)
def test_form_strings_are_coerced(values, expected):
    cfg = RunConfig.from_dict(values)
    for name, value in expected.items():
        assert getattr(cfg, name) == value
        assert type(getattr(cfg, name)) is type(value)


def test_yaml_without_a_dot_in_the_exponent_still_gives_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads `2e-4` as a string; the config must still get the number
    path = tmp_path / "config.yaml"
    path.write_text("lr: 2e-4\nlora_r: 32\n")
    cfg = RunConfig.load(path)
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    assert cfg.lora_r == 32


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lora_r", "three"),
        ("lora_r", 2.5),
        ("lora_r", True),
        ("lr", "fast"),
        ("lr", [0.1]),
        ("group_by_length", "maybe"),
        ("group_by_length", 2),
        ("micro_batch_size", None),
        ("model", None),
        ("data_path", ["a.jsonl"]),
    ],
)
def test_bad_values_are_rejected_naming_the_field(name, value):
    with pytest.raises(ConfigError, match=rf"^{name} must be a"):
        RunConfig.from_dict({name: value})


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        RunConfig.from_dict({"learning_rate": 1e-4, "lr": 1e-4})


@pytest.mark.parametrize("text", ["lr: [unclosed\n", "- just\n- a list\n"])
def test_a_file_that_is_not_settings_is_a_config_error(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        RunConfig.load(path)


def valid(**changes) -> RunConfig:
    return dataclasses.replace(RunConfig(data_path="train.jsonl"), **changes)


def test_a_complete_config_validates():
    cfg = valid()
    assert cfg.validate() is cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": ""}, "model is empty"),
        ({"data_path": ""}, "data_path is empty"),
        ({"template": "vicuna"}, "template 'vicuna' is unknown"),
        ({"max_seq_len": 8}, "max_seq_len 8 is too short"),
        ({"epochs": 0, "max_steps": -1}, "set epochs above 0 or max_steps above 0"),
        ({"lr": 0.0}, "lr 0.0 is out of range"),
        ({"lr": 2.0}, "lr 2.0 is out of range"),
        ({"micro_batch_size": 0}, "micro_batch_size must be at least 1"),
        ({"grad_accum_steps": 0}, "grad_accum_steps must be at least 1"),
        ({"lora_r": 0}, "lora_r must be at least 1"),
        ({"lora_alpha": 0}, "lora_alpha must be at least 1"),
        ({"save_steps": 0}, "save_steps must be at least 1"),
        ({"lora_dropout": 1.0}, "lora_dropout must be between 0 and 1"),
        ({"lora_dropout": -0.1}, "lora_dropout must be between 0 and 1"),
        ({"eval_share": 0.5}, "eval_share must be between 0 and 0.5"),
        ({"quant_type": "int8"}, "quant_type 'int8' is unknown"),
        ({"compute_dtype": "fp8"}, "compute_dtype 'fp8' is unknown"),
    ],
)
def test_validate_catches_each_problem(changes, message):
    with pytest.raises(ConfigError, match=message):
        valid(**changes).validate()


def test_max_steps_alone_is_enough():
    valid(epochs=0, max_steps=10).validate()


def test_validate_lists_all_problems_at_once():
    with pytest.raises(ConfigError) as info:
        valid(model="", lora_r=0, quant_type="int8").validate()
    assert all(part in str(info.value) for part in ("model is empty", "lora_r", "quant_type"))


def test_recipes_exist():
    assert {"default", "paper", "quick-test"} <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_validates(name):
    cfg = load_recipe(name, data_path="train.jsonl")
    assert cfg.validate() is cfg
    assert recipe_description(name)


def test_recipe_overrides_win_and_none_is_ignored():
    cfg = load_recipe("paper", data_path="x.jsonl", lora_r=8, lr=None)
    assert cfg.lora_r == 8
    assert cfg.lr == 2e-4


def test_unknown_recipe_is_a_config_error():
    with pytest.raises(ConfigError, match="recipe 'nope' not found.*paper"):
        load_recipe("nope")


def test_paper_recipe_has_the_papers_values():
    cfg = load_recipe("paper", data_path="x.jsonl")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (64, 16, 0.1)
    assert cfg.lr == 2e-4
    assert cfg.lr_scheduler == "constant"
    assert cfg.warmup_ratio == 0.03
    assert cfg.max_grad_norm == 0.3
    assert cfg.micro_batch_size * cfg.grad_accum_steps == 16
    assert cfg.lora_target == "all-linear"
    assert (cfg.quant_type, cfg.double_quant) == ("nf4", True)
    assert cfg.gradient_checkpointing and cfg.group_by_length
    assert cfg.template == "guanaco"


def test_quick_test_recipe_is_for_the_embedded_model_on_cpu():
    cfg = load_recipe("quick-test", data_path="x.jsonl")
    assert cfg.model == "embedded"
    assert cfg.lr == 1e-3


# --- the UI form is built from RunConfig's fields ------------------------------------------------

def test_every_field_says_why_and_every_form_field_has_a_label():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["help"], f.name
        assert f.metadata["label"] or not f.metadata["ui"], f.name


def test_every_form_setting_has_an_input_of_its_kind_in_the_start_call(data_dir):
    import gradio as gr

    from app.main import build_ui

    start = next(fn for fn in build_ui().fns.values() if fn.api_name == "start_training")
    inputs = dict(zip(inspect.signature(start.fn).parameters, start.inputs))
    kinds = {"bool": gr.Checkbox, "int": (gr.Number, gr.Slider, gr.Dropdown),
             "float": (gr.Number, gr.Slider), "str": (gr.Textbox, gr.Dropdown, gr.State)}
    for f in dataclasses.fields(RunConfig):
        if f.metadata["ui"]:
            assert isinstance(inputs[f.name], kinds[f.type]), f.name
            if f.metadata["choices"]:
                assert isinstance(inputs[f.name], gr.Dropdown), f.name


def test_every_form_value_reaches_the_run_config(data_dir, monkeypatch):
    from app import train_tab
    from engine.runner import RunnerError

    started = []

    def start_run(cfg, name):  # keep the config; start no process
        started.append(cfg)
        raise RunnerError("not started")

    monkeypatch.setattr(train_tab, "memory_refusal", lambda cfg: None)
    monkeypatch.setattr(train_tab, "start_run", start_run)
    changed = {}
    for name in train_tab.VALUES:  # a value unlike the recipe's for every form setting
        f = train_tab.SETTINGS[name]
        default = getattr(load_recipe("default"), name)
        if f.metadata["choices"]:
            changed[name] = next(c for c in f.metadata["choices"] if c != default)
        else:
            changed[name] = {"bool": lambda: not default, "str": lambda: "other",
                             "int": lambda: default + 2, "float": lambda: default / 2}[f.type]()
    train_tab.start("default", "embedded", "", "train.jsonl", "alpaca", *changed.values())
    cfg = started[0]
    assert {name: getattr(cfg, name) for name in changed} == changed
    assert (cfg.model, cfg.data_path, cfg.template) == ("embedded", "train.jsonl", "alpaca")
