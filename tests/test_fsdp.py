"""FSDP-QLoRA (engine/fsdp.py): the strategy the launcher picks, the arguments that shard the
4-bit model, and two gloo processes on this CPU training the embedded model sharded: 4-bit codes
stored in the compute dtype, sharded checkpoints written by both processes and resumed onto both,
the LoRA weights gathered into a normal peft adapter that engine.chat loads in one process and
that answers exactly as the sharded model did. What only a CUDA machine can check is marked gpu."""

import json

import pytest
from test_gpu_share import card, clean_env  # noqa: F401 - fixture
from test_resume import losses, run_command

from engine import fsdp, runner
from engine.config import RunConfig, load_recipe
from engine.rundir import RunDir
from progress import wait_for

STEPS, SAVE_EVERY = 4, 2


def test_fsdp_is_a_valid_strategy():
    RunConfig(data_path="x.jsonl", strategy="fsdp", num_processes=2).validate()


@pytest.mark.parametrize("settings, free_gbs, expected", [
    ({"strategy": "fsdp"}, [], "fsdp"),  # asked for: also on the CPU
    ({"strategy": "ddp", "model": "llama-3.1-70b"}, [24.0, 24.0], "ddp"),
    ({}, [], "ddp"),  # CPU processes share one memory
    ({"model": "qwen2.5-0.5b"}, [24.0, 24.0], "ddp"),  # fits one GPU: DDP is faster
    ({"model": "llama-3.1-70b"}, [48.0, 48.0], "fsdp"),  # sharded over two 48 GB cards
    ({"model": "llama-3.1-70b"}, [24.0, 24.0], fsdp.OFFLOAD),  # Answer.AI's 2 x 24 GB
    ({"model": "no/such-model"}, [24.0, 24.0], "ddp"),  # size unknown
    ({"model": "llama-3.1-70b", "num_machines": 2, "main_process_ip": "h"}, [24.0], "ddp"),
])
def test_auto_takes_what_the_planner_says(settings, free_gbs, expected):
    strategy, why = fsdp.choose(RunConfig(num_processes=2, **settings), free_gbs)
    assert strategy == expected and why


def test_only_a_sharded_process_stores_4_bit_codes_in_the_compute_dtype(monkeypatch):
    import torch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(fsdp.STRATEGY_ENV, "ddp")
    assert fsdp.quant_storage(torch.bfloat16) is None and fsdp.trainer_arguments() == {}
    monkeypatch.setenv(fsdp.STRATEGY_ENV, fsdp.OFFLOAD)
    assert fsdp.quant_storage(torch.bfloat16) is torch.bfloat16
    arguments = fsdp.trainer_arguments()
    assert arguments["fsdp"] and arguments["fsdp_config"]["cpu_offload"]
    assert arguments["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to shard, whatever was asked
    assert fsdp.strategy() == "single" and fsdp.trainer_arguments() == {}


def test_the_launcher_records_its_choice_and_keeps_it_for_a_resume(tmp_path, monkeypatch,
                                                                   clean_env):  # noqa: F811
    from engine.distributed import _strategy_of

    monkeypatch.setattr("engine.hardware.detect_gpus",
                        lambda: ([card(0, 24.0), card(1, 24.0), card(2, 80.0)], ""))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_launch(launch=1, state="running", gpus=[0, 1])  # what the runner recorded
    cfg = RunConfig(model="llama-3.1-70b", gpus="0,1")
    assert _strategy_of(run, cfg, resume=False) == fsdp.OFFLOAD  # GPU 2 is not the run's
    assert run.read_status()["strategy"] == fsdp.OFFLOAD and run.read_status()["strategy_why"]
    checkpoint = run.checkpoints_dir / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.complete").write_text("complete\n")
    # Two 80 GB cards now, where DDP fits; but the checkpoint was written sharded, so it is
    # read back sharded.
    monkeypatch.setattr("engine.hardware.detect_gpus",
                        lambda: ([card(0, 80.0), card(1, 80.0)], ""))
    assert _strategy_of(run, cfg, resume=True) == fsdp.OFFLOAD
    assert _strategy_of(run, cfg, resume=False) == "ddp"  # a fresh start chooses again: fits


@pytest.mark.parametrize("prepared", [True, False])
def test_an_evaluation_leaves_the_4_bit_layers_trainable(prepared):
    """Trainer's evaluation (eval mode, no gradients) must not switch a 4-bit layer to
    bitsandbytes' CPU inference layout: later training forwards would pass no gradient back
    through it, and FSDP, gathering the stored layout again, would compute garbage (what made
    the sharded model's later no-grad forwards diverge)."""
    import bitsandbytes as bnb
    import torch

    from engine.train import keep_4bit_layout_for_training

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16),
                                     requires_grad=False, quant_type="nf4")
    layer = torch.nn.Sequential(layer.to("cpu"))  # quantized here
    if prepared:
        keep_4bit_layout_for_training(layer)
    elif not layer[0].support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    repacked = getattr(layer[0].weight.quant_state, "packing_format_for_cpu", False)
    assert repacked is not prepared
    inputs = x.clone().requires_grad_()
    layer(inputs).float().sum().backward()
    # Unprepared on such a CPU: the inference kernel ran and no gradient came back (the bug).
    assert (inputs.grad is not None) is prepared


# --- two gloo processes on this CPU --------------------------------------------------------------

def probe_prompts(tokenizer) -> list[list[int]]:
    """Held-out questions as engine.chat puts them to the model (template, special tokens)."""
    from facts import FACTS

    from engine.templates import get_template

    template = get_template("guanaco", tokenizer)
    prompts = [template.render([{"role": "user", "content": fact["held_out"][0]}],
                               add_generation_prompt=True) for fact in FACTS[:2]]
    return [tokenizer(p, add_special_tokens=template.add_special_tokens)["input_ids"]
            for p in prompts]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, embedded_model):
    """A run on two processes with strategy fsdp and eval rows (Trainer evaluates every step),
    started by the job runner, stopped after its first checkpoint and resumed from the command
    line."""
    from facts import write_facts

    from engine.models import load_tokenizer

    base = tmp_path_factory.mktemp("fsdp")
    facts = write_facts(base / "facts.jsonl")
    (base / "probe.json").write_text(json.dumps(probe_prompts(load_tokenizer(str(embedded_model)))))
    patch = pytest.MonkeyPatch()
    patch.setenv("QLS_DATA_DIR", str(base / "data"))
    patch.setenv("QLS_TEST_REPLICA_SUMS", str(base))
    try:
        cfg = load_recipe("quick-test", data_path=str(facts), max_steps=STEPS,
                          save_steps=SAVE_EVERY, max_seq_len=48, micro_batch_size=1,
                          grad_accum_steps=2, lora_r=8, lora_alpha=16, num_processes=2,
                          strategy="fsdp", eval_share=0.2)
        run = runner.start_run(cfg, name="fsdp")
        wait_for(run, lambda s: (s.get("step") or 0) >= SAVE_EVERY
                 or s["state"] not in ("running", "queued"))
        runner.stop_run(run)
        stopped = wait_for(run, lambda s: s["state"] not in ("running", "queued", "stopping"))
        stopped["checkpoint"] = run.latest_checkpoint()
        resumed = run_command(["resume", str(run.path)], run, base)
        yield run, stopped, resumed, base
    finally:
        patch.undo()


def rank_sums(folder, rank: int) -> dict[int, float]:
    lines = (folder / f"rank-{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["sum"] for record in map(json.loads, lines)}


@pytest.mark.slow
def test_a_sharded_run_stops_and_resumes_from_checkpoints_both_processes_wrote(sharded):
    run, stopped, resumed, _ = sharded
    assert stopped["state"] == "stopped", stopped
    assert run.read_status()["strategy"] == "fsdp"
    checkpoint = stopped["checkpoint"]
    assert checkpoint is not None and (checkpoint / "pytorch_model_fsdp_0").is_dir()
    assert (checkpoint / "optimizer_0").is_dir()  # the optimizer state, sharded too
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status = run.read_status()
    assert status["state"] == "finished" and status["step"] == STEPS, status
    log = run.log_path.read_text()
    assert "resuming from " + checkpoint.name in log


@pytest.mark.slow
def test_a_sharded_run_learns_and_its_processes_agree(sharded):
    run, _, _, base = sharded
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # one chart line per step, from rank 0
    assert got[STEPS] < got[1]  # the loss falls
    rank0, rank1 = rank_sums(base, 0), rank_sums(base, 1)
    assert rank0 == rank1 and max(rank0) == STEPS  # both see the same whole LoRA weights


@pytest.mark.slow
def test_the_gathered_adapter_answers_in_one_process_as_the_sharded_model_did(sharded):
    from safetensors.torch import load_file

    from engine.chat import ChatModel
    from engine.distributed import greedy_answers
    from engine.train import keep_4bit_layout_for_training

    run, _, _, base = sharded
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # a normal peft adapter, LoRA only
    assert sum(float(t.double().sum()) for t in saved.values()) == \
        pytest.approx(rank_sums(base, 0)[STEPS], rel=1e-4)  # gathered whole, not one shard
    sharded_answers = json.loads((base / "rank-0-answers.json").read_text())
    assert sharded_answers == json.loads((base / "rank-1-answers.json").read_text())
    chat = ChatModel(run.path, device="cpu")  # the 4-bit base as chat loads it: uint8 codes
    prompts = json.loads((base / "probe.json").read_text())
    # Every no-grad forward of the sharded model after training (one per answer token) gave
    # what the same weights give unsharded through the same 4-bit matmul. Chat's own CPU
    # inference kernel (bitsandbytes, on AVX512-BF16 CPUs) rounds differently: checked loosely.
    assert [answer[0] for answer in greedy_answers(chat.model, prompts)] == \
        [answer[0] for answer in sharded_answers]
    keep_4bit_layout_for_training(chat.model)  # the matmul the training processes ran
    assert greedy_answers(chat.model, prompts) == sharded_answers


@pytest.mark.slow
def test_a_sharded_run_reports_a_true_eval_loss(sharded):
    """Trainer's evaluation runs no-grad forwards of the sharded model between training steps:
    once the 4-bit layers switched to bitsandbytes' CPU inference layout, every later one gave
    garbage (a loss near ln(vocabulary) = 10.8) and training went on without gradients through
    the frozen weights."""
    run, _, _, _ = sharded
    evals = {m["step"]: m["eval_loss"] for m in run.read_metrics() if m.get("eval_loss")}
    train = losses(run)
    assert sorted(evals) == list(range(1, STEPS + 1)), evals  # one evaluation after each step
    assert all(loss < train[1] + 0.5 for loss in evals.values()), (evals, train)
    assert evals[STEPS] < evals[1]  # the held-out rows are learned too


@pytest.mark.gpu
@pytest.mark.slow
def test_a_sharded_run_trains_on_two_gpus(data_dir, facts_file, embedded_model):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    cfg = load_recipe("quick-test", data_path=str(facts_file), max_steps=STEPS,
                      save_steps=SAVE_EVERY, gpus="0,1", strategy="fsdp")
    run = runner.start_run(cfg, name="fsdp-gpu")
    status = wait_for(run, lambda s: s["state"] not in ("running", "queued", "stopping"))
    assert status["state"] == "finished", run.log_tail(30)
    assert run.read_status()["strategy"] == "fsdp" and run.has_adapter()
    assert (run.latest_checkpoint() / "pytorch_model_fsdp_0").is_dir()
    from engine.chat import ChatModel

    question = [{"role": "user", "content": "What is the capital of Veloria?"}]
    assert ChatModel(run.path).reply(question, max_new_tokens=8)  # loads on one GPU and answers
