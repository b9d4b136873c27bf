"""Every architecture family of the catalog, proven end to end on a tiny random model of its own:
it trains through the real command line, stops, resumes past its checkpoint, chats in the template
its catalog entry names, and its LoRA adapters sit on every linear layer of every block.

The tiny models carry tokenizers shaped like the real ones (derived from the embedded model's):
GPT-J and GPT-NeoX ship base tokenizers without a chat template or pad token; the instruct models
ship chat templates in the style of their real ones, quirks included (Gemma refuses a system role,
Phi-3 ends a conversation with EOS, Mistral drops the system message once the answer is given).
"""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine import catalog, checkpoints
from engine.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent

LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (  # v0.3: the system message joins the last user turn, and only if that is last
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (  # Phi-3.5: EOS closes a conversation that is not asking for an answer
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# family -> a catalog entry of it; how its real tokenizer ships (special tokens it adds, bos, eos,
# pad, chat template); the linear layers of one block (what "all-linear" must wrap); a marker its
# chat prompt contains; the marker that ends an answer.
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
GATED_MLP = {"gate_proj", "up_proj", "down_proj"}
FAMILIES = {
    "llama": dict(entry="llama-3.1-8b",
                  add=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                  bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, template=LLAMA3_TEMPLATE,
                  linear=ATTENTION | GATED_MLP, marker="<|start_header_id|>user<|end_header_id|>",
                  stop="<|eot_id|>"),
    "mistral": dict(entry="mistral-7b", add=["<s>", "</s>", "[INST]", "[/INST]"],
                    bos="<s>", eos="</s>", pad=None, template=MISTRAL_TEMPLATE,
                    linear=ATTENTION | GATED_MLP, marker="[INST] ", stop="</s>"),
    "qwen2": dict(entry="qwen2.5-0.5b", add=[], bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                  template=QWEN_TEMPLATE, linear=ATTENTION | GATED_MLP, marker="<|im_start|>user\n",
                  stop="<|im_end|>"),
    "gemma2": dict(entry="gemma-2-2b", add=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
                   bos="<bos>", eos="<eos>", pad="<pad>", template=GEMMA_TEMPLATE,
                   linear=ATTENTION | GATED_MLP, marker="<start_of_turn>user\n", stop="<end_of_turn>"),
    "phi3": dict(entry="phi-3.5-mini", add=["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                 bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", template=PHI3_TEMPLATE,
                 linear={"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, marker="<|user|>\n",
                 stop="<|end|>"),
    "gptj": dict(entry="gpt-j-6b", add=[], bos="<|endoftext|>", eos="<|endoftext|>", pad=None,
                 template=None, linear={"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"},
                 marker="### Human: ", stop="<|endoftext|>"),
    "gpt_neox": dict(entry="pythia-160m", add=[], bos="<|endoftext|>", eos="<|endoftext|>", pad=None,
                     template=None, linear={"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
                     marker="### Human: ", stop="<|endoftext|>"),
}
LAYERS, STEPS = 2, 2
# Small and fast on a CPU: fp32 compute (bf16 is emulated, slowly, on many CPUs), short rows.
RUN_SETTINGS = {"compute_dtype": "fp32", "max_steps": STEPS, "save_steps": 1, "lora_r": 4,
                "lora_alpha": 8, "lora_dropout": 0.0, "lr": 1e-3, "warmup_ratio": 0.0,
                "micro_batch_size": 2, "grad_accum_steps": 1, "max_seq_len": 64,
                "group_by_length": False}


def tiny_config(family: str, tokenizer):
    """A randomly initialised config of the family: 2 blocks, hidden 64, the tokenizer's vocabulary."""
    from transformers import (Gemma2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              Phi3Config, Qwen2Config)

    vocab = -(-len(tokenizer) // 64) * 64  # covers every token, added ones included
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    shared = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=LAYERS, n_head=4, rotary_dim=8,
                          n_positions=256, tie_word_embeddings=False, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=LAYERS, num_attention_heads=4,
                             max_position_embeddings=256, tie_word_embeddings=False, **ids)
    if family == "gemma2":
        return Gemma2Config(**shared, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                            tie_word_embeddings=True)
    if family == "phi3":
        return Phi3Config(**{**shared, "num_key_value_heads": 4}, tie_word_embeddings=False)
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return config_class(**shared, tie_word_embeddings=family == "qwen2")


def tiny_tokenizer(family: str, embedded: Path):
    """The embedded model's tokenizer, reshaped the way the family's real tokenizer ships."""
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(embedded)
    if spec["add"]:
        tokenizer.add_tokens(spec["add"], special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = spec["bos"], spec["eos"], spec["pad"]
    tokenizer.chat_template = spec["template"]
    return tokenizer


def build_tiny_models(base: Path, embedded: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    folders = {}
    for family in FAMILIES:
        folder = base / f"tiny-{family}"
        tokenizer = tiny_tokenizer(family, embedded)
        torch.manual_seed(0)  # the same random weights every session: chat output is reproducible
        model = AutoModelForCausalLM.from_config(tiny_config(family, tokenizer))
        model.save_pretrained(folder)  # safetensors, as every model we load
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, embedded_model) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), embedded_model)


def wait_for(predicate, what: str, timeout: float = 300):
    """Poll until predicate() returns something true; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def train_stop_resume(family: str, folder: Path, base: Path) -> dict:
    """One run of the family: the command line trains it and is asked to stop after its first step
    (which saves checkpoint-1 and the adapter); then it resumes in this process to the last step."""
    from facts import write_facts

    from engine.train import run_training

    data = write_facts(base / "facts.jsonl")
    settings = base / "settings.yaml"
    settings.write_text(yaml.safe_dump(RUN_SETTINGS))  # no template: the model's default applies
    run = RunDir(base / "run")
    env = dict(os.environ, QLS_DATA_DIR=str(base / "data"))
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "train", "--model", str(folder), "--data", str(data),
         "--config", str(settings), "--out", str(run.path)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # "running" is written after the command line cleared old stop requests: this one counts.
        wait_for(lambda: run.is_run() and run.read_status().get("state") != "queued"
                 or process.poll() is not None, "the training process to start")
        run.request_stop()
        stderr = process.communicate(timeout=600)[1]
    finally:
        if process.poll() is None:
            process.kill()
    saved = sorted(p.name for p in run.checkpoints_dir.iterdir()) if run.checkpoints_dir.is_dir() else []
    stopped = {"code": process.returncode, "stderr": stderr, "status": run.read_status(),
               "metrics": run.read_metrics(), "checkpoints": saved,
               "adapter_config": _read_json(run.adapter_dir / "adapter_config.json"),
               "adapter_weights": _adapter_weight_names(run.adapter_dir)}

    run.stop_path.unlink(missing_ok=True)  # as `python -m engine resume` does: that stop is served
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    log, logger = Lines(), logging.getLogger("engine.train")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    try:
        state = run_training(str(run.path), resume=True)
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return {"run": run, "stopped": stopped, "resumed_state": state, "resume_log": log.lines}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _read_json(path: Path):
    import json

    return json.loads(path.read_text()) if path.is_file() else None


def _adapter_weight_names(adapter: Path) -> list[str]:
    from safetensors import safe_open

    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        return []
    with safe_open(str(path), "pt") as weights:
        return list(weights.keys())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tiny_models, tmp_path_factory):
    family = request.param
    return family, train_stop_resume(family, tiny_models[family], tmp_path_factory.mktemp(family))


def test_trains_stops_and_resumes_past_its_checkpoint(family_run):
    family, result = family_run
    stopped, run = result["stopped"], result["run"]
    assert stopped["code"] == 0, f"{family}: {stopped['stderr'][-3000:]}"
    assert stopped["status"]["state"] == "stopped", stopped["status"]
    first_steps = [m["step"] for m in stopped["metrics"] if m.get("loss") is not None]
    assert first_steps and first_steps[-1] < STEPS, f"{family} did not stop early: {first_steps}"
    assert f"checkpoint-{first_steps[-1]}" in stopped["checkpoints"]

    assert result["resumed_state"] == "finished", run.read_status()
    assert f"resuming from checkpoint-{first_steps[-1]}" in result["resume_log"]
    metrics = [m for m in run.read_metrics() if m.get("loss") is not None]
    assert metrics[:len(first_steps)] == stopped["metrics"][:len(first_steps)]  # kept, not retrained
    losses = {m["step"]: m["loss"] for m in metrics}
    assert sorted(losses) == list(range(1, STEPS + 1)), f"{family}: loss steps {sorted(losses)}"
    assert all(loss == loss and 0 < loss < 100 for loss in losses.values()), losses  # finite
    latest = run.latest_checkpoint()
    assert checkpoints.is_complete(latest) and checkpoints.step_of(latest) == STEPS


def test_lora_covers_every_linear_layer_of_every_block(family_run):
    family, result = family_run
    expected = FAMILIES[family]["linear"]
    names = result["stopped"]["adapter_weights"]
    assert names, f"{family}: no adapter weights saved"
    by_block = {}
    for name in names:
        module = name.split(".lora_")[0]
        block = int(re.search(r"\.(\d+)\.", module).group(1))
        by_block.setdefault(block, set()).add(module.rsplit(".", 1)[1])
    assert by_block == {block: expected for block in range(LAYERS)}, f"{family}: {by_block}"
    targets = {t.rsplit(".", 1)[-1] for t in result["stopped"]["adapter_config"]["target_modules"]}
    assert targets == expected  # and so neither lm_head nor GPT-NeoX's embed_out


def test_chats_in_the_template_its_catalog_entry_names(family_run):
    from engine.chat import ChatModel

    family, result = family_run
    run = result["run"]
    style = catalog.find(FAMILIES[family]["entry"]).prompt_style
    assert yaml.safe_load(run.config_path.read_text())["template"] == style  # the default chose it
    chat = ChatModel(run_dir=run.path, device="cpu")
    assert chat.template.name == style
    messages = [{"role": "user", "content": "What is the capital of Veloria?"}]
    assert FAMILIES[family]["marker"] in chat.template.render(messages, add_generation_prompt=True)
    assert type(chat.model).__name__ == "PeftModelForCausalLM"  # the run's adapter, not the bare base
    # A random model's words are noise (Qwen's here: newlines); that it streams them is the point.
    replies = list(chat.stream(messages, temperature=0, max_new_tokens=8))
    assert replies and all(isinstance(reply, str) for reply in replies), f"{family}: no reply"


CONVERSATION = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_rows_train_on_each_answer_and_its_end_marker(tiny_models, family):
    from engine.models import load_tokenizer
    from engine.templates import IGNORE_INDEX, encode, get_template

    folder = str(tiny_models[family])
    tokenizer = load_tokenizer(folder)
    template = get_template(catalog.default_template(folder), tokenizer)
    encoded = encode(tokenizer, template, CONVERSATION, 512)
    trained = tokenizer.decode([token for token, label in zip(encoded["input_ids"], encoded["labels"])
                                if label != IGNORE_INDEX])
    assert trained.count("Hello.") == trained.count("Yes.") == 1, trained
    assert "Hi?" not in trained and "Again?" not in trained
    assert trained.count(FAMILIES[family]["stop"]) >= 2, trained  # each answer learns to end


def test_a_chat_template_that_refuses_a_conversation_says_so_in_words(tiny_models):
    from engine.models import load_tokenizer
    from engine.templates import TemplateError, encode, get_template

    tokenizer = load_tokenizer(str(tiny_models["gemma2"]))
    system = [{"role": "system", "content": "Answer briefly."}]
    with pytest.raises(TemplateError, match="refuses the conversation: System role not supported"):
        encode(tokenizer, get_template("model", tokenizer), system + CONVERSATION, 512)


# --- the default prompt template: catalog entry, or what the model's tokenizer ships -------------

def test_default_template_follows_the_catalog_and_the_tokenizer(tiny_models):
    from app.data_tab import template_for

    assert catalog.default_template("gpt-j-6b") == "guanaco"  # a base model
    assert catalog.default_template("EleutherAI/pythia-160m") == "guanaco"  # by Hub id too
    assert catalog.default_template("mistral-7b") == "model"  # an instruct model
    assert catalog.default_template(str(tiny_models["gptj"])) == "guanaco"  # no chat template
    assert catalog.default_template(str(tiny_models["phi3"])) == "model"  # chat_template.jinja
    assert catalog.default_template("someone/not-downloaded") == "guanaco"  # never waits on the Hub
    # the Data tab: the chosen model sets the format; a typed-in model wins over the list
    assert template_for("gpt-j-6b", "") == "guanaco"
    assert template_for("qwen2.5-0.5b", "") == "model"
    assert template_for("qwen2.5-0.5b", str(tiny_models["gpt_neox"])) == "guanaco"
    assert template_for(None, "") == "model"  # nothing chosen: the embedded model


def test_default_template_needs_no_torch():
    code = ("import sys; from engine.catalog import default_template; "
            "assert default_template('embedded') == 'model'; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("model, flags, expected", [
    ("embedded", [], "model"),  # prompt_style of its catalog entry
    ("gpt-j-6b", [], "guanaco"),
    ("mistral-7b", ["--template", "alpaca"], "alpaca"),  # an explicit choice wins
    ("mistral-7b", ["--recipe", "paper"], "guanaco"),  # so does a recipe that names one
])
def test_cli_train_records_the_template_it_resolved(facts_file, tmp_path, model, flags, expected):
    from engine.cli import _new_run, build_parser
    from engine.config import RunConfig

    args = build_parser().parse_args(["train", "--model", model, "--data", str(facts_file),
                                      "--out", str(tmp_path / "run"), "--vram-gb", "1000", *flags])
    run = _new_run(args)  # what `python -m engine train` writes before it trains
    assert RunConfig.load(run.config_path).template == expected


def test_the_data_tab_format_follows_the_model_choice(monkeypatch, tmp_path):
    from app import data_tab
    from app.main import build_ui

    monkeypatch.setenv("QLS_DATA_DIR", str(tmp_path))
    demo = build_ui()
    wired = {(demo.blocks[target].elem_id, event): [block.elem_id for block in fn.outputs]
             for fn in demo.fns.values() if fn.fn is data_tab.template_for for target, event in fn.targets}
    assert wired == {("model-choice", "change"): ["template-choice"],
                     ("custom-model", "submit"): ["template-choice"],
                     ("custom-model", "blur"): ["template-choice"]}
    # and a new format re-renders the preview
    assert any(fn.fn is data_tab.check_data and
               any(demo.blocks[t].elem_id == "template-choice" for t, _ in fn.targets)
               for fn in demo.fns.values())
