"""Every long wait of a run shows progress with numbers in status.json (never a frozen "loading
the model"), at most about once a second, and each phase's duration goes to train.log once."""

import logging
import re

from engine import progress as progress_module
from engine.config import load_recipe
from engine.progress import Progress, transformers_bar
from engine.rundir import RunDir
from engine.runner import create_run
from engine.train import run_training


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Writes:
    """A stand-in run that keeps every status write."""

    def __init__(self):
        self.fields = []

    def write_status(self, **fields):
        self.fields.append(fields)

    @property
    def messages(self):
        return [f["message"] for f in self.fields]


def test_a_thousand_updates_in_half_a_second_write_once_or_twice_then_done_always():
    clock, run = FakeClock(), Writes()
    rows = Progress(run, "tokenising the training data", 30_000, clock=clock)
    for done in range(1, 1001):
        clock.now += 0.0005  # 1000 updates within 0.5 s
        rows.update(done)
    assert 1 <= len(run.fields) <= 2
    rows.done("tokenised 30,000 training rows")
    assert len(run.fields) <= 3
    last = run.fields[-1]
    assert last["message"] == "tokenising the training data: 30,000 of 30,000 rows"
    assert (last["progress_done"], last["progress_total"]) == (30_000, 30_000)
    assert last["progress_what"] == "tokenising the training data"
    assert last["progress_unit"] == "rows"


def test_it_writes_again_once_a_second_has_passed():
    clock, run = FakeClock(), Writes()
    rows = Progress(run, "tokenising the training data", 30_000, clock=clock)
    clock.now += 1.0
    rows.update(12_000)
    clock.now += 0.5
    rows.update(13_000)  # within the second: not written
    assert run.messages == ["tokenising the training data: 0 of 30,000 rows",
                            "tokenising the training data: 12,000 of 30,000 rows"]


def test_done_logs_the_duration_once(caplog):
    clock = FakeClock()
    rows = Progress(None, "tokenising the training data", 30, clock=clock)  # None: no status file
    for _ in rows.iterate(range(30)):
        clock.now += 0.01
    with caplog.at_level(logging.INFO, logger="engine.train"):
        assert abs(rows.done("tokenised 30 training rows") - 0.3) < 1e-9
    assert [r.getMessage() for r in caplog.records] == ["tokenised 30 training rows in 0.3 s"]


def test_a_total_known_later_and_a_transformers_bar(monkeypatch):
    """transformers' "Loading weights" bar, made through its public tqdm hook as
    core_model_loading does it, reports tensor counts; other bars are left alone; the hook goes."""
    from transformers.utils import logging as hf_logging

    clock, run = FakeClock(), Writes()
    loading = Progress(run, "loading m into 4-bit", unit="tensors", clock=clock, every_s=1.0)
    assert run.messages == ["loading m into 4-bit"]
    with transformers_bar("Loading weights", loading):
        for i, _ in enumerate(hf_logging.tqdm(dict.fromkeys(range(272)).items(),
                                              desc="Loading weights")):
            clock.now += 0.125  # 8 tensors a second
        other = hf_logging.tqdm(range(3), desc="Writing model shards", disable=True)
        assert list(other) == [0, 1, 2]
    loading.done()
    assert run.messages[1] == "loading m into 4-bit: 0 of 272 tensors"
    assert "loading m into 4-bit: 120 of 272 tensors" in run.messages  # every 8 tensors = 1 s
    assert run.messages[-1] == "loading m into 4-bit: 272 of 272 tensors"
    assert len(run.messages) < 40
    assert hf_logging.set_tqdm_hook(None) is None  # our hook is gone again


def test_a_real_run_shows_every_wait_in_order(data_dir, facts_file, embedded_model, monkeypatch,
                                              caplog):
    messages = []
    real_write = RunDir.write_status

    def write_status(self, **changes):
        if changes.get("message"):
            messages.append(changes["message"])
        return real_write(self, **changes)

    monkeypatch.setattr(RunDir, "write_status", write_status)
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)  # every count written: see them move
    cfg = load_recipe("quick-test", data_path=str(facts_file), max_steps=2, save_steps=1,
                      max_seq_len=48, micro_batch_size=2, lora_r=8, compute_dtype="fp32")
    run = create_run(cfg, name="progress")
    with caplog.at_level(logging.INFO, logger="engine.train"):
        assert run_training(str(run.path)) == "finished", run.read_status()

    def first(pattern):
        for i, message in enumerate(messages):
            if re.search(pattern, message):
                return i
        raise AssertionError(f"no message matches {pattern!r} in:\n" + "\n".join(messages))

    order = [
        first(r"^tokenising the training data: \d+ of \d+ rows$"),
        first(r"^loading SmolLM2-135M-Instruct into 4-bit: \d+ of 272 tensors$"),
        first(r"^preparing the model for training: LoRA r=8"),
        first(r"^first training step \(step 1 of 2\): warming up$"),
        first(r"^saving checkpoint-1$"),
        first(r"^training: step 1 of 2 \(saved checkpoint-1 in [\d.]+ s\)$"),
        first(r"^saving checkpoint-2$"),
        first(r"^finished 2 steps"),
    ]
    assert order == sorted(order), "\n".join(messages)
    # no frozen wait: the tensor count moves while the model loads (every_s=0 in this test)
    assert sum(bool(re.search(r"into 4-bit: \d+ of 272", m)) for m in messages) > 10
    assert "30 of 30 rows" in " ".join(messages)  # the facts file's 30 rows, all tokenised
    logged = [r.getMessage() for r in caplog.records]
    for pattern in (r"^tokenised 30 training rows in [\d.]+ s$",
                    r"^loaded SmolLM2-135M-Instruct into 4-bit \(272 tensors\) in [\d.]+ s$",
                    r"^prepared the model for LoRA training in [\d.]+ s$",
                    r"^first training step took [\d.]+ s$",
                    r"^saved checkpoint-1 in [\d.]+ s$"):
        assert sum(bool(re.search(pattern, line)) for line in logged) == 1, (pattern, logged)
    assert run.read_status()["progress_what"] is None  # no stale bar once training runs


def test_plain_text_rows_are_counted_as_they_are_packed(tmp_path, tokenizer, monkeypatch):
    import json

    from engine.config import RunConfig
    from engine.templates import get_template
    from engine.train import _split, _tokenise

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"Row {i} says hello. " * 5}) + "\n"
                            for i in range(50)))
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    cfg = RunConfig(data_path=str(path), max_seq_len=32)
    rows, _ = _split(cfg)
    run = Writes()
    blocks = _tokenise(rows, tokenizer, get_template("guanaco", tokenizer), cfg, "training", run)
    assert blocks
    assert run.messages[0] == "tokenising the training data: 0 of 50 rows"
    assert "tokenising the training data: 25 of 50 rows" in run.messages
    assert run.messages[-1] == "tokenising the training data: 50 of 50 rows"
    # without a run (as before): nothing written, same blocks
    assert _tokenise(rows, tokenizer, get_template("guanaco", tokenizer), cfg, "training") == blocks
