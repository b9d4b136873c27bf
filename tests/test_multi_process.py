"""A run on several processes (DDP, engine/distributed.py): the layout's settings, the torchrun
command, the GPUs a run holds, and two gloo processes on this CPU training the embedded model
through the job runner and the command line: identical replicas after every step, the loss curve
of one process with the same effective batch, one writer of the run directory, stop and resume."""

import json

import pytest
from test_gpu_share import clean_env, gpus  # noqa: F401 - fixtures: three fake GPUs
from test_resume import losses, run_command

from engine import runner
from engine.config import ConfigError, RunConfig, load_recipe
from engine.distributed import REPLICA_FAILED, _outcome, torchrun_command
from engine.rundir import RunDir
from progress import wait_for

STEPS, SAVE_EVERY = 6, 2


@pytest.mark.parametrize("settings, problem", [
    ({"gpus": "0,x"}, "not a list of GPU numbers"),
    ({"gpus": "0,0"}, "names a GPU twice"),
    ({"gpus": "0,1", "num_processes": 3}, "does not match the 2 GPUs"),
    ({"gpus": "0,1", "gpu": 1}, "either gpu"),
    ({"gpus": "0,1", "device": "cpu"}, "device is cpu"),
    ({"num_machines": 2, "main_process_ip": "10.0.0.1", "machine_rank": 2}, "machine_rank 2"),
    ({"num_machines": 2}, "needs main_process_ip"),
    ({"num_processes": 0}, "num_processes must be at least 1"),
])
def test_the_process_layout_is_validated(settings, problem):
    with pytest.raises(ConfigError, match=problem):
        RunConfig(data_path="x.jsonl", **settings).validate()


def test_processes_follow_gpus_or_num_processes():
    assert RunConfig(gpus="0,1").processes_here() == 2
    assert RunConfig(gpus="0,1", num_processes=2).several_processes()
    assert RunConfig(num_processes=3).processes_here() == 3
    assert not RunConfig(gpus="1").several_processes()  # one GPU named: one process, as gpu=1
    assert RunConfig(num_machines=2, main_process_ip="h").several_processes()


def test_train_command_takes_the_layout(tmp_path):
    from engine.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--data", "x.jsonl",
                                      "--gpus", "0,1", "--num-processes", "2",
                                      "--strategy", "ddp", "--main-process-port", "29600"])
    cfg = config_from_args(args)
    assert (cfg.gpus, cfg.num_processes, cfg.strategy, cfg.main_process_port) == \
        ("0,1", 2, "ddp", 29600)


def test_torchrun_starts_one_worker_per_process(tmp_path):
    run = RunDir(tmp_path / "run")
    here = torchrun_command(RunConfig(num_processes=2), run, resume=True, background=True)
    assert here[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in here
    assert here[here.index("--nproc-per-node") + 1] == "2"
    assert here[here.index("engine") - 1:] == ["-m", "engine", "train", str(run.path.resolve()),
                                                "--worker", "--resume", "--background"]
    two = RunConfig(gpus="0,1", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    several = torchrun_command(two, run, resume=False, background=False)
    assert "--standalone" not in several and "--resume" not in several
    for flag, value in [("--nnodes", "2"), ("--node-rank", "1"), ("--master-addr", "10.0.0.1"),
                        ("--master-port", "29500"), ("--nproc-per-node", "2")]:
        assert several[several.index(flag) + 1] == value


def test_a_run_on_several_gpus_gets_them_all(gpus):  # noqa: F811
    assert [g.index for g in runner.run_gpus(RunConfig(gpus="0,2"))] == [0, 2]
    # No GPUs named: the ones with the most free memory (1 and 2), in nvidia-smi's order.
    chosen = runner.run_gpus(RunConfig(num_processes=2))
    assert [g.index for g in chosen] == [1, 2]
    assert runner.pin_env_for(chosen)["CUDA_VISIBLE_DEVICES"] == "1,2"
    with pytest.raises(ConfigError, match="4 processes need 4 GPUs.*has 3"):
        runner.run_gpus(RunConfig(num_processes=4))
    with pytest.raises(ConfigError, match="GPU 7 does not exist"):
        runner.run_gpus(RunConfig(gpus="0,7"))
    assert runner.run_gpus(RunConfig(num_processes=2, device="cpu")) == []


def test_a_failed_process_fails_the_run_with_its_reason(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_launch(launch=1, state="running")
    run.write_status(launch=1, state="running", pid=None)
    run.log_path.write_text(f"12:00:00 [rank 1] ERROR {REPLICA_FAILED} no space left on device\n")
    assert _outcome(run, 1, 2) == "failed"
    assert run.read_status()["message"] == \
        "one of the 2 training processes failed: rank 1: no space left on device"
    run.write_status(state="running")
    run.log_path.write_text("")  # killed without a word: the exit code says so
    _outcome(run, -9, 2)
    assert "ended without a word (exit code -9" in run.read_status()["message"]


# --- two gloo processes on this CPU --------------------------------------------------------------

def layout(facts, **settings):
    values = dict(data_path=str(facts), max_steps=STEPS, save_steps=SAVE_EVERY, max_seq_len=48,
                  micro_batch_size=1, lora_r=8, lora_alpha=16)
    return load_recipe("quick-test", **{**values, **settings})


def sums(folder, rank: int) -> dict[int, float]:
    lines = (folder / f"rank-{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["sum"] for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_model):
    """One process with gradient accumulation 4, and two processes with 2 each (the same effective
    batch) started by the job runner, stopped, and resumed from the command line."""
    from facts import write_facts

    base = tmp_path_factory.mktemp("ddp")
    facts = write_facts(base / "facts.jsonl")
    patch = pytest.MonkeyPatch()
    patch.setenv("QLS_DATA_DIR", str(base / "data"))
    patch.setenv("QLS_TEST_REPLICA_SUMS", str(base))
    try:
        reference = runner.create_run(layout(facts, grad_accum_steps=4), name="one process")
        # In its own process, as a person runs it: its threads follow the idle cores (in this
        # process two threads beside the other tests' work took minutes).
        trained = run_command(["train", str(reference.path)], reference, base)
        assert trained.returncode == 0, trained.stderr[-3000:]
        for rank_file in base.glob("rank-*.jsonl"):
            rank_file.unlink()  # the reference's own sums

        ddp = runner.start_run(layout(facts, grad_accum_steps=2, num_processes=2), name="ddp")
        wait_for(ddp, lambda s: (s.get("step") or 0) >= 2 or s["state"] not in ("running", "queued"))
        runner.stop_run(ddp)
        stopped = wait_for(ddp, lambda s: s["state"] not in ("running", "queued", "stopping"))
        sums_at_stop = (sums(base, 0), sums(base, 1))
        stopped["checkpoint_step"] = checkpoint_step(ddp)  # what the resume starts from
        resumed = run_command(["resume", str(ddp.path)], ddp, base)
        yield reference, ddp, stopped, sums_at_stop, resumed, base
    finally:
        patch.undo()


@pytest.mark.slow
def test_every_process_stops_at_the_same_step(runs):
    _, _, stopped, (rank0, rank1), _, _ = runs
    assert stopped["state"] == "stopped", stopped
    assert 2 <= stopped["step"] < STEPS
    assert rank0 == rank1 and max(rank0) == stopped["step"]  # neither went on alone
    assert stopped["checkpoint_step"] == stopped["step"]


def checkpoint_step(run):
    from engine import checkpoints

    return checkpoints.step_of(run.latest_checkpoint())


@pytest.mark.slow
def test_resume_onto_two_processes_finishes_with_identical_replicas(runs):
    _, ddp, _, _, resumed, base = runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status = ddp.read_status()
    assert status["state"] == "finished" and status["step"] == STEPS, status
    rank0, rank1 = sums(base, 0), sums(base, 1)
    assert sorted(rank0) == list(range(1, STEPS + 1))
    assert rank0 == rank1  # DDP kept the replicas identical after every step, across the resume
    from safetensors.torch import load_file

    saved = load_file(ddp.adapter_dir / "adapter_model.safetensors")
    assert sum(float(t.double().sum()) for t in saved.values()) == \
        pytest.approx(rank0[STEPS], rel=1e-4)  # the main process saved what both held


@pytest.mark.slow
def test_the_main_process_alone_writes_the_run(runs):
    _, ddp, _, _, _, _ = runs
    steps = [m["step"] for m in ddp.read_metrics() if m.get("loss") is not None]
    assert steps == list(range(1, STEPS + 1))  # one chart line per step, not one per process
    log = ddp.log_path.read_text()
    assert "[rank 0]" in log and "[rank 1]" in log
    assert "step 1:" in log and "[rank 1] INFO step 1:" not in log


@pytest.mark.slow
def test_loss_curve_matches_one_process_with_the_same_effective_batch(runs):
    reference, ddp, _, _, _, _ = runs
    expected, got = losses(reference), losses(ddp)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        # The same rows in each step (1 x 2 x 2 processes = 1 x 4), gradients averaged over the
        # processes: equal up to float noise. A replica training on other rows, or gradients not
        # exchanged, differ by far more (the loss falls by half in two steps here).
        assert got[step] == pytest.approx(expected[step], rel=0.02, abs=0.02), (step, expected, got)


@pytest.mark.slow
def test_out_of_memory_in_one_process_retries_all_with_half_the_micro_batch(data_dir, facts_file,
                                                                          embedded_model,
                                                                          monkeypatch):
    """Step 2 of a two-process run raises a GPU out-of-memory (engine/faults.py): the launcher
    ends them all, halves the micro-batch, and a fresh launcher finishes from checkpoint-1."""
    monkeypatch.setenv("QLS_TEST_FAIL_AT", "oom:2")
    cfg = layout(facts_file, max_steps=3, save_steps=1, micro_batch_size=2, grad_accum_steps=1,
                 num_processes=2, strategy="ddp")
    run = runner.start_run(cfg, name="oom")
    first = json.loads((run.path / "launch.json").read_text())["pid"]  # the first launcher
    status = wait_for(run, lambda s: s["state"] not in ("running", "queued", "stopping")
                      and s.get("launch", 0) > 1)
    assert status["state"] == "finished", (status, run.log_tail(40))
    assert "after 1 out-of-memory retry" in status["message"]
    assert len(status["notes"]) == 1, status["notes"]
    note = status["notes"][0]
    assert "micro-batch 2" in note and "from checkpoint-1" in note
    assert "micro-batch 1 and gradient accumulation 2" in note  # the effective batch kept
    saved = RunConfig.load(run.config_path)
    assert (saved.micro_batch_size, saved.grad_accum_steps) == (1, 2)
    launch = json.loads((run.path / "launch.json").read_text())
    assert launch["launch"] == 2 and launch["predecessor_pid"] == first  # a fresh launcher
    assert launch["strategy"] == "ddp"  # the checkpoint's strategy, kept for the retry
    log = run.log_path.read_text()
    assert "ran out of GPU memory in a step" in log and "resuming from checkpoint-1" in log
    assert [m["step"] for m in run.read_metrics() if m.get("loss") is not None] == [1, 2, 3]
