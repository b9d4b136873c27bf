"""`python -m engine` as a person runs it: exit codes, JSON output, and one-line errors without a
traceback. All commands start at once in one fixture, since each process pays the import time."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.rundir import RunDir, process_created

ROOT = Path(__file__).resolve().parent.parent
GOOD_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
HELP = {
    "help": ["--help"],
    "help-hardware": ["hardware", "--help"],
    "help-data-check": ["data", "check", "--help"],
    "help-train": ["train", "--help"],
    "help-chat": ["chat", "--help"],
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    good = tmp / "good.jsonl"
    good.write_text((json.dumps(GOOD_ROW) + "\n") * 3)
    bad = tmp / "bad.jsonl"
    bad.write_text(json.dumps(GOOD_ROW) + "\n\nnot json\n" + json.dumps({"instruction": "x"}) + "\n")
    (tmp / "unfinished-run").mkdir()
    (tmp / "unfinished-run" / "config.yaml").write_text("model: embedded\n")
    busy = RunDir(tmp / "data" / "runs" / "20250101-000000-busy")  # a run of the app, training
    busy.path.mkdir(parents=True)
    busy.config_path.write_text("model: embedded\n")
    busy.write_status(state="running", pid=os.getpid(), pid_created=process_created(os.getpid()))
    commands = {
        "hardware": ["hardware", "--json"],
        "check-good": ["data", "check", str(good), "--json"],
        "check-bad": ["data", "check", str(bad), "--json"],
        "train-missing-data": ["train", "--out", str(tmp / "new-run"), "--data", str(tmp / "nope.jsonl")],
        "train-no-out": ["train", "--data", str(good)],
        "train-while-busy": ["train", "--out", str(tmp / "waits"), "--data", str(good),
                             "--model", "embedded", "--template", "guanaco", "--device", "cpu"],
        "chat-no-adapter": ["chat", str(tmp / "unfinished-run"), "--prompt", "Hi"],
        **HELP,
    }
    env = dict(os.environ, QLS_DATA_DIR=str(tmp / "data"))
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in commands.items()
    }
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)  # a hang guard only
        results[name] = SimpleNamespace(rc=process.returncode, out=out, err=err)
    results["tmp"] = tmp
    return results


def assert_one_line_error(result, *words):
    assert result.rc == 1, result.err
    assert "Traceback" not in result.err, result.err
    lines = result.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.err  # the reason is one last line
    for word in words:
        assert word in errors[0]


def test_hardware_json(cli):
    result = cli["hardware"]
    assert result.rc == 0, result.err
    found = json.loads(result.out)
    assert found["has_gpu"] is False and found["gpus"] == []
    assert found["gpu_note"]


def test_data_check_of_a_good_file(cli):
    result = cli["check-good"]
    assert result.rc == 0, result.err
    report = json.loads(result.out)
    assert (report["format"], report["rows"], report["errors"]) == ("chat", 3, [])


def test_data_check_of_a_bad_file_names_lines(cli):
    result = cli["check-bad"]
    assert result.rc == 1
    report = json.loads(result.out)
    assert report["format"] == "chat" and report["rows"] == 1
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(3, ""), (4, "output")]
    assert "invalid JSON" in report["errors"][0]["message"]


def test_train_with_a_missing_data_file_is_a_one_line_error(cli):
    assert_one_line_error(cli["train-missing-data"], "nope.jsonl", "not found")
    assert not (cli["tmp"] / "new-run").exists()  # nothing is created for a run that cannot start


def test_train_without_out_is_a_one_line_error(cli):
    assert_one_line_error(cli["train-no-out"], "--out")


def test_train_while_a_run_of_the_app_trains_is_refused_at_once(cli):
    # One run trains at a time: the foreground command goes through the runner's check, under
    # its lock, and neither trains beside the app's run nor leaves a folder behind.
    assert_one_line_error(cli["train-while-busy"], "20250101-000000-busy is training",
                          "one run trains at a time")
    assert not (cli["tmp"] / "waits").exists()


def test_chat_with_a_run_without_adapter_is_a_one_line_error(cli):
    assert_one_line_error(cli["chat-no-adapter"], "no saved adapter")


@pytest.mark.parametrize("name", HELP)
def test_help(cli, name):
    result = cli[name]
    assert result.rc == 0, result.err
    assert result.out.startswith("usage: python -m engine")
    assert result.err == ""


# --- every RunConfig field is a `train` flag ---------------------------------------------------

def other_value(setting):
    """A value of the field's type that is not its default, and the flag words that give it."""
    from engine.cli import flag_of

    flag, default = flag_of(setting), setting.default
    if setting.type == "bool":
        return not default, [flag if not default else "--no-" + flag[2:]]
    choices = setting.metadata["choices"]
    if choices:
        value = next(c for c in choices if c != default)
    else:
        value = {"str": lambda: "other", "int": lambda: default + 2,
                 "float": lambda: default + 0.25}[setting.type]()
    return value, [flag, str(value)]


def test_every_setting_has_a_train_flag_that_sets_it(tmp_path):
    from engine.cli import build_parser, config_from_args
    from engine.config import RunConfig

    for setting in dataclasses.fields(RunConfig):
        value, words = other_value(setting)
        # an explicit template keeps the default template's lookup of the model away from the Hub
        template = [] if setting.name == "template" else ["--template", "guanaco"]
        args = build_parser().parse_args(["train", "--out", str(tmp_path), *template, *words])
        got = getattr(config_from_args(args), setting.name)
        if setting.name in ("data_path", "eval_data_path"):  # local paths are made absolute
            got = Path(got).name
        assert got == value, (setting.name, words)
        assert setting.metadata["help"], setting.name  # the flag's help is the field's one line


def test_flags_apply_on_top_of_a_config_file_and_readme_flags_still_parse(tmp_path):
    from engine.cli import build_parser, config_from_args
    from engine.config import RunConfig

    config = tmp_path / "run.yaml"
    RunConfig(lora_r=8, double_quant=False, template="alpaca").save(config)
    args = build_parser().parse_args(["train", "--config", str(config), "--out", str(tmp_path / "r"),
                                      "--micro-batch", "2", "--grad-accum", "4", "--data", "x.jsonl",
                                      "--double-quant"])
    cfg = config_from_args(args)
    assert (cfg.lora_r, cfg.template) == (8, "alpaca")  # the file's values stay
    assert (cfg.micro_batch_size, cfg.grad_accum_steps, cfg.double_quant) == (2, 4, True)
    args = build_parser().parse_args(["train", "--model", "embedded", "--data", "facts.jsonl",
                                      "--out", "runs/facts", "--recipe", "quick-test"])
    cfg = config_from_args(args)
    assert cfg.model == "embedded" and Path(cfg.data_path).name == "facts.jsonl"
    assert cfg.double_quant is True  # a flag not given leaves the recipe's value
