"""Machines with several GPUs (a run is pinned to one) and a chat model that shares a GPU with
training honestly. No GPU here: NVML's GPU list, subprocess.Popen, the chat model class and
torch.cuda are stand-ins."""

import os
import subprocess
import sys
import types
import weakref

import pytest

from engine import chat, planner, runner
from engine.config import RunConfig
from engine.hardware import GIB, Gpu
from engine.rundir import process_created

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def card(index, free_gb, total_gb=24.0):
    return Gpu(index=index, name=f"RTX {index}", total_gb=total_gb, free_gb=free_gb,
               compute_capability="8.6", bf16=True)


@pytest.fixture
def clean_env(monkeypatch):
    """Undo what pinning writes into os.environ (setenv first, so the teardown restores it)."""
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def gpus(monkeypatch, clean_env):
    """GPU 0 has little free memory, GPU 1 the most, GPU 2 some."""
    cards = [card(0, 4.0), card(1, 20.0), card(2, 10.0)]
    monkeypatch.setattr("engine.hardware.detect_gpus", lambda: (cards, ""))
    return cards


@pytest.fixture
def popen(monkeypatch):
    """Capture what spawn would start; the 'child' is this process, so the run looks alive."""
    calls = []

    class FakePopen:
        def __init__(self, command, **kwargs):
            calls.append({"command": command, **kwargs})
            self.pid = os.getpid()

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    return calls


class FakeChatModel:
    """Stands in for engine.chat.ChatModel: records which instances are still alive at each load."""
    alive: list = []
    alive_at_load: list = []

    def __init__(self, run_dir=None, base_model="embedded"):
        FakeChatModel.alive_at_load.append(sum(ref() is not None for ref in FakeChatModel.alive))
        FakeChatModel.alive.append(weakref.ref(self))
        self.label = f"run {run_dir}" if run_dir else f"base model {base_model}"
        self.gpu_index, self.device = 1, "cuda:1"


@pytest.fixture
def fake_chat(monkeypatch):
    monkeypatch.setattr(chat, "ChatModel", FakeChatModel)
    monkeypatch.setattr(chat, "_shared", {})
    FakeChatModel.alive, FakeChatModel.alive_at_load = [], []
    return FakeChatModel


def config(tmp_path, **changes) -> RunConfig:
    return RunConfig(data_path=str(tmp_path / "train.jsonl"), **changes)


# --- a run is pinned to one GPU ---------------------------------------------------------------

def test_spawn_pins_the_run_to_the_gpu_with_the_most_free_memory(data_dir, tmp_path, gpus, popen):
    run = runner.start_run(config(tmp_path), name="auto")
    env = popen[0]["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    status = run.read_status()
    assert (status["state"], status["gpu"], status["gpu_name"]) == ("running", 1, "RTX 1")


def test_spawn_pins_the_gpu_the_config_names(data_dir, tmp_path, gpus, popen):
    runner.start_run(config(tmp_path, gpu=2), name="named")
    assert popen[0]["env"]["CUDA_VISIBLE_DEVICES"] == "2"


def test_a_cpu_run_is_not_pinned(data_dir, tmp_path, gpus, popen):
    run = runner.start_run(config(tmp_path, device="cpu"), name="cpu")
    assert "CUDA_VISIBLE_DEVICES" not in popen[0]["env"]
    assert run.read_status()["gpu"] is None  # chat knows this run holds no GPU


def test_a_gpu_that_does_not_exist_starts_nothing(data_dir, tmp_path, gpus, popen):
    with pytest.raises(runner.RunnerError, match="GPU 5 does not exist"):
        runner.start_run(config(tmp_path, gpu=5), name="missing")
    assert popen == [] and runner.list_runs() == []


def test_gpu_setting_is_validated():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="gpu -2"):
        RunConfig(data_path="x.jsonl", gpu=-2).validate()
    assert RunConfig.from_dict({"gpu": "1"}).gpu == 1  # YAML and forms may give text


def test_a_hand_started_training_process_pins_itself(tmp_path, gpus):
    from engine.cli import _pin_gpu
    from engine.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    cfg = config(tmp_path)
    cfg.save(run.config_path)
    _pin_gpu(run, cfg)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert run.read_status()["gpu"] == 1
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,2"  # the person's own choice narrows, we pick within
    _pin_gpu(run, cfg)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"


def test_train_command_takes_gpu(tmp_path):
    from engine.cli import FIELD_OF_FLAG, build_parser

    args = build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--gpu", "1"])
    assert args.gpu == 1 and FIELD_OF_FLAG.get("gpu", "gpu") == "gpu"


# --- the memory check looks at the run's GPU ---------------------------------------------------

def test_config_refusal_uses_the_chosen_gpus_free_memory(gpus):
    # GPT-J 6B at 512 tokens, r=64 needs about 6.9 GB: not in GPU 0's 4 GB, easily in GPU 1's 20
    refusal = planner.config_refusal(RunConfig(model="gpt-j-6b", gpu=0))
    assert refusal and "4.0 GB free" in refusal
    assert planner.config_refusal(RunConfig(model="gpt-j-6b", gpu=1)) is None
    assert planner.config_refusal(RunConfig(model="gpt-j-6b")) is None  # auto: GPU 1
    assert planner.detected_vram(0) == (4.0, 24.0) and planner.detected_vram() == (20.0, 24.0)


def test_config_refusal_counts_our_chat_models_memory_as_free(gpus, monkeypatch):
    monkeypatch.setattr(chat, "shared_gpu_gb", lambda: 4.0)
    monkeypatch.setattr(chat, "shared_gpu_index", lambda: 2)
    assert planner.config_refusal(RunConfig(model="gpt-j-6b", gpu=0))  # chat is on another GPU
    monkeypatch.setattr(chat, "shared_gpu_index", lambda: 0)
    assert planner.config_refusal(RunConfig(model="gpt-j-6b", gpu=0)) is None  # 4 + 4 GB


# --- the one shared chat model -----------------------------------------------------------------

def test_load_shared_keeps_one_model_and_frees_the_first_before_the_second(fake_chat):
    first = chat.load_shared(base_model="a")
    assert chat.load_shared(base_model="a") is first  # same target: no second load
    del first
    second = chat.load_shared(base_model="b")
    assert fake_chat.alive_at_load == [0, 0]  # the first was gone before the second loaded
    assert chat.shared_gpu_index() == 1
    del second
    assert chat.unload_shared() == "base model b"
    assert all(ref() is None for ref in fake_chat.alive)
    assert chat.unload_shared() is None and chat.shared_gpu_index() is None


def test_shared_gpu_gb_reads_torch_reserved_memory_of_the_chat_device(fake_chat, monkeypatch):
    assert chat.shared_gpu_gb() == 0.0  # nothing loaded
    chat.load_shared(base_model="a")
    asked = []
    cuda = types.SimpleNamespace(is_available=lambda: True, empty_cache=lambda: None,
                                 memory_reserved=lambda device: asked.append(device) or 3 * GIB)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert chat.shared_gpu_gb() == 3.0 and asked == ["cuda:1"]
    chat.unload_shared()
    assert chat.shared_gpu_gb() == 0.0


def test_asking_for_chat_memory_never_imports_torch():
    code = ("import sys, engine.chat, engine.planner, engine.runner, app.chat_tab\n"
            "assert engine.chat.shared_gpu_gb() == 0.0 and engine.chat.unload_shared() is None\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_start_run_unloads_the_chat_model_on_its_gpu_and_says_so(data_dir, tmp_path, gpus, popen,
                                                                  fake_chat):
    from app.train_tab import started_message

    chat.load_shared(base_model="embedded")  # on GPU 1, where the run will train
    run = runner.start_run(config(tmp_path), name="frees")
    assert chat.shared_gpu_index() is None and all(ref() is None for ref in fake_chat.alive)
    note = run.read_status()["chat_unloaded"]
    assert "base model embedded" in note and "GPU 1" in note
    assert note in started_message(run)


def test_start_run_leaves_a_chat_model_on_another_gpu(data_dir, tmp_path, gpus, popen, fake_chat):
    chat.load_shared(base_model="embedded")  # on GPU 1
    run = runner.start_run(config(tmp_path, gpu=2), name="elsewhere")
    assert chat.shared_gpu_index() == 1 and "chat_unloaded" not in run.read_status()


def test_resume_run_unloads_the_chat_model_too(data_dir, tmp_path, gpus, popen, fake_chat):
    run = runner.create_run(config(tmp_path), name="again")
    run.write_status(state="stopped")
    chat.load_shared(base_model="embedded")
    message = runner.resume_run(run)
    assert "unloaded" in message and chat.shared_gpu_index() is None


# --- chat does not load onto the GPU a run trains on -------------------------------------------

def training_run(tmp_path, **status):
    run = runner.create_run(config(tmp_path), name="training")
    run.write_status(state="running", pid=os.getpid(), pid_created=process_created(os.getpid()),
                     **status)
    return run


@pytest.fixture
def cuda_chat(monkeypatch, clean_env):
    """ChatModel would load onto CUDA; the test ends before anything real loads."""
    monkeypatch.setattr(chat, "pick_device", lambda requested: "cuda")
    monkeypatch.setattr(chat, "_shared", {})


def test_chat_waits_while_a_run_trains_on_its_only_gpu(data_dir, tmp_path, monkeypatch, cuda_chat):
    monkeypatch.setattr("engine.hardware.detect_gpus", lambda: ([card(0, 20.0)], ""))
    training_run(tmp_path, gpu=0, gpu_name="RTX 0")
    with pytest.raises(chat.GpuBusyError) as error:
        chat.load_shared(base_model="embedded")
    text = str(error.value)
    assert "training" in text and "GPU 0" in text and "stops or finishes" in text
    assert isinstance(error.value, chat.ModelError)  # callers that catch ModelError still do
    assert chat.shared_gpu_index() is None


def test_chat_takes_another_gpu_than_the_training_run(data_dir, tmp_path, gpus, cuda_chat):
    training_run(tmp_path, gpu=1, gpu_name="RTX 1")
    assert chat._chat_gpu().index == 2  # the most free one the run does not use


def test_chat_keeps_off_every_gpu_of_a_run_on_several(data_dir, tmp_path, gpus, cuda_chat):
    training_run(tmp_path, gpu=1, gpu_name="RTX 1", gpus=[1, 2])  # DDP on GPUs 1 and 2
    assert chat._chat_gpu().index == 0  # not 2, the most free one after 1


def test_a_cpu_run_or_no_run_leaves_the_gpu_to_chat(data_dir, tmp_path, gpus, cuda_chat):
    assert chat._chat_gpu().index == 1
    training_run(tmp_path, gpu=None, device="cpu")
    assert chat._chat_gpu().index == 1


def test_chat_tab_says_why_chat_waits(monkeypatch):
    from app import chat_tab

    def busy(**_):
        raise chat.GpuBusyError("run r1 is training on GPU 0; chat loads once it stops or finishes")

    monkeypatch.setattr(chat_tab, "load_shared", busy)
    *_, (message, history) = chat_tab.respond("hi", [], chat_tab.BASE, 0.0, 0.9, 16, "embedded", "")
    reply = history[-1]["content"]
    assert reply.startswith("⚠️ Chat has to wait") and "run r1" in reply and "Train tab" in reply
