"""Stand-ins for the concurrency tests of tests/test_run_races.py, run in threads of the test and as
processes of their own:

    python tests/run_hammer.py train RUN_DIR [--background] [--resume]   a training process
    python tests/run_hammer.py hammer SECONDS SEED RUN_NAME...           one more impatient user

The stand-in training process trains nothing: it reports as engine/train.py does (claims the
launch it was started for, "running", then "stopped"), honours stop requests, appends the time it
held the GPU to runs/held.jsonl, and hands the GPU on through runner.after_training, as
`python -m engine train` does. Starting a real one costs seconds of imports and a model load.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import runner  # noqa: E402 - after the project is importable
from engine.rundir import RunDir, append_line, process_created  # noqa: E402

TRAIN_S = 0.4  # a stand-in run stops by itself after this long, unless asked sooner


def use_stand_in_trainer(popen=subprocess.Popen):
    """A Popen that starts this file wherever the runner starts `python -m engine train`."""
    def fake_popen(command, **kwargs):
        if command[1:4] == ["-m", "engine", "train"]:
            command = [command[0], __file__, "train", *command[4:]]
        return popen(command, **kwargs)

    return fake_popen


def held_path() -> Path:
    return Path(os.environ["QLS_DATA_DIR"]) / "runs" / "held.jsonl"


def train(run_dir: str) -> None:
    run = RunDir(run_dir)
    pid = os.getpid()
    run.write_status(state="running", launch=run.latest_launch(), pid=pid,
                     pid_created=process_created(pid), message="training")
    start = time.time()
    while time.time() - start < TRAIN_S and not run.stop_requested():
        time.sleep(0.01)
    append_line(held_path(), {"run": run.name, "pid": pid, "start": start, "end": time.time()})
    run.write_status(state="stopped", message="stopped; adapter saved")
    runner.after_training(run, "stopped")


def hammer(seconds: float, seed: int, names: list[str]) -> list[str]:
    """Resume, stop and start-the-queue the runs at random for `seconds`; what each answered."""
    rng = random.Random(seed)
    answers = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        run = runner.get_run(rng.choice(names))
        action = rng.choice([runner.resume_run, runner.resume_run, runner.stop_run,
                             lambda run: runner.start_next()])
        try:
            answers.append(str(action(run)))
        except runner.RunnerError as exc:
            answers.append(f"refused: {exc}")
        time.sleep(rng.uniform(0, 0.03))
    return answers


if __name__ == "__main__":
    subprocess.Popen = use_stand_in_trainer()  # the runs this process starts are stand-ins too
    if sys.argv[1] == "train":
        train(sys.argv[2])
    else:
        print("\n".join(hammer(float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])))
