"""`python -m engine data check` with the new options: format override, column mapping, token
statistics with a model's tokenizer, and skipping bad rows. Both commands run at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checks(tmp_path_factory, embedded_model):
    tmp = tmp_path_factory.mktemp("data-cli")
    csv = tmp / "qa.csv"
    csv.write_text("question,answer\nWhat is 2+2?,4\nTell me a long story.," + "Once upon a time " * 20
                   + "\nbroken,\nWhat is 2+2?,4\n")
    commands = {
        "stats": ["data", "check", str(csv), "--json", "--columns", "prompt=question,completion=answer",
                  "--model", "embedded", "--max-seq-len", "32", "--skip-bad-rows"],
        "override": ["data", "check", str(csv), "--json", "--format", "alpaca"],
    }
    env = dict(os.environ, QLS_DATA_DIR=str(tmp / "data"))
    processes = {name: subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, args in commands.items()}
    return {name: (p.wait(timeout=600), *p.communicate()) for name, p in processes.items()}


def test_check_with_token_statistics(checks):
    rc, out, err = checks["stats"]
    assert rc == 0, err  # one bad row, skipped as asked
    report = json.loads(out)
    assert (report["file"].endswith("qa.csv"), report["format"], report["rows"]) == (True, "completion", 3)
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(4, "completion")]
    assert report["errors"][0]["file"] == report["file"]
    stats = report["stats"]
    assert stats["truncated_count"] == 1 and stats["truncated"][0]["line"] == 3
    assert stats["truncated"][0]["cut"] == stats["truncated"][0]["tokens"] - 32
    assert stats["duplicate_count"] == 1 and stats["duplicates"] == [{"line": 5, "first_line": 2}]
    assert stats["tokens_per_epoch"] > 0 and stats["histogram"]


def test_check_with_a_format_override_names_every_missing_field(checks):
    rc, out, _ = checks["override"]
    assert rc == 1
    report = json.loads(out)
    assert report["format"] == "alpaca" and report["rows"] == 0
    assert (2, "instruction") in [(e["line"], e["field"]) for e in report["errors"]]
