"""Chat with a tuned run beside its base model: one base in memory (the adapter switched off for
the base's answer), adapters swapped on it, the base loaded as the run trained, stop, regenerate,
unload, and every failure a sentence in the chat. On the run that learned the five facts."""

import gc
import shutil
import threading
import time
import weakref

import pytest
import yaml

from app import chat_tab
from engine import chat
from engine.rundir import RunDir
from engine.templates import get_template
from facts import FACTS

QUESTION = FACTS[0]["held_out"][0]
KEYWORD = FACTS[0]["keyword"]
GREEDY = dict(temperature=0.0, top_p=0.9, top_k=0, repetition_penalty=1.0)


def ask(text=QUESTION):
    return [{"role": "user", "content": text}]


def converse(target, message=QUESTION, base=(), tuned=(), side_by_side=True, system="",
             max_new_tokens=24):
    """The Chat tab's handler, run to its end: (base column, tuned column)."""
    *_, (box, base_column, tuned_column) = chat_tab.converse(
        message, list(base), list(tuned), target, side_by_side, system, GREEDY["temperature"],
        GREEDY["top_p"], GREEDY["top_k"], GREEDY["repetition_penalty"], max_new_tokens,
        "embedded", "")
    assert box == ""
    return base_column, tuned_column


def copy_of(run: RunDir, data_dir, name: str) -> RunDir:
    target = data_dir / "runs" / name
    shutil.copytree(run.path, target, ignore=shutil.ignore_patterns("checkpoint*"))
    return RunDir(target)


@pytest.fixture(scope="module")
def facts_run(learned_run, tmp_path_factory):
    """The learned run, as the Chat tab finds it: in the runs folder of a data dir."""
    data = tmp_path_factory.mktemp("chat") / "data"
    return copy_of(learned_run, data, "facts")


@pytest.fixture
def held(facts_run, monkeypatch):
    """The app's one chat model on the facts run; the Chat tab finds that run by its name."""
    monkeypatch.setenv("QLS_DATA_DIR", str(facts_run.path.parent.parent))
    model = chat.load_shared(run_dir=facts_run.path)
    yield model
    chat.load_shared(run_dir=facts_run.path)  # after a test that switched to another target


@pytest.fixture(scope="module", autouse=True)
def unload_at_the_end():
    yield
    chat.unload_shared()


def base_models(model) -> list:
    """Live models of the chat model's base checkpoint and class (SmolLM2's LlamaForCausalLM)."""
    gc.collect()
    kind, path = type(model.base), model.base.config._name_or_path
    return [o for o in gc.get_objects() if isinstance(o, kind) and o.config._name_or_path == path]


# --- which base a run is loaded on: read from its files, nothing loaded --------------------------

def test_a_runs_base_is_loaded_as_the_run_trained(learned_run, data_dir):
    trained = chat.target_of(learned_run.path).base
    assert (trained.quant_type, trained.double_quant) == ("nf4", True)
    assert trained.compute_dtype == chat.TRAINED_DTYPES[learned_run.read_status()["compute_dtype"]]
    fp4 = copy_of(learned_run, data_dir, "fp4")
    config = yaml.safe_load(fp4.config_path.read_text())
    fp4.config_path.write_text(yaml.safe_dump({**config, "quant_type": "fp4", "double_quant": False,
                                               "compute_dtype": "fp32"}))
    settings = chat.target_of(fp4.path).base
    assert (settings.quant_type, settings.double_quant, settings.compute_dtype) == \
        ("fp4", False, "fp32")
    assert settings != trained  # so the two runs do not share a loaded base


def test_a_run_without_an_adapter_is_a_clear_error(learned_run, data_dir):
    unfinished = copy_of(learned_run, data_dir, "unfinished")
    shutil.rmtree(unfinished.adapter_dir)
    with pytest.raises(chat.ModelError, match="no saved adapter yet"):
        chat.target_of(unfinished.path)


# --- side by side ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_side_by_side_the_base_lacks_the_fact_the_tuned_model_has_it_from_one_base(held):
    base_column, tuned_column = converse("facts")
    assert [m["role"] for m in base_column] == [m["role"] for m in tuned_column] == \
        ["user", "assistant"]
    assert KEYWORD not in base_column[1]["content"]
    assert KEYWORD in tuned_column[1]["content"]
    # one base in memory: the adapter sits on it, and no second copy was loaded for the base answer
    assert held.model.get_base_model() is held.base
    assert base_models(held) == [held.base]
    assert chat.load_shared(run_dir=held.run_dir) is held


@pytest.mark.slow
def test_each_column_keeps_its_own_conversation_with_the_system_prompt(held, monkeypatch):
    asked = []
    stream = held.stream

    def spy(messages, **kwargs):
        asked.append((kwargs["tuned"], messages))
        return stream(messages, **kwargs)

    monkeypatch.setattr(held, "stream", spy)
    base, tuned = converse("facts", system="Answer briefly.")
    base, tuned = converse("facts", "And its ship?", base, tuned, system="Answer briefly.")
    assert len(base) == len(tuned) == 4
    second_base, second_tuned = asked[2:]
    assert second_base[0] is False and second_tuned[0] is True
    system = {"role": "system", "content": "Answer briefly."}
    assert second_base[1][0] == second_tuned[1][0] == system
    assert second_base[1][2]["content"] == base[1]["content"]  # the base goes on from its answer
    assert second_tuned[1][2]["content"] == tuned[1]["content"]
    assert KEYWORD in tuned[1]["content"] and KEYWORD not in base[1]["content"]


@pytest.mark.slow
def test_one_model_alone_and_the_api_answer(held):
    base, tuned = converse("facts", side_by_side=False)
    assert base == [] and KEYWORD in tuned[1]["content"]
    *_, (box, history) = chat_tab.respond(QUESTION, [], "facts", 0.0, 0.9, 24, "embedded", "")
    assert box == "" and KEYWORD in history[-1]["content"]


@pytest.mark.slow
def test_regenerate_asks_the_last_question_again_in_both_columns(held):
    base, tuned = converse("facts")
    *_, (again_base, again_tuned) = chat_tab.regenerate(
        base, tuned, "facts", True, "", *GREEDY.values(), 24, "embedded", "")
    assert again_base == base and again_tuned == tuned  # greedy: the same answers, not appended


# --- stop -----------------------------------------------------------------------------------------

def generate_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "chat-generate"]


@pytest.mark.slow
def test_stop_really_ends_generation(held):
    steps = []
    hook = held.base.register_forward_hook(lambda *_: steps.append(1))
    try:
        story = ask("Write a long story about a dragon who learns to bake bread.")
        held.reply(story, tuned=False, max_new_tokens=30)
        unstopped = len(steps)
        assert unstopped >= 25  # the model has more to say: a stop has something to cut short

        steps.clear()
        stop = threading.Event()
        started = time.monotonic()
        for _ in held.stream(story, tuned=False, max_new_tokens=400, stop=stop):
            stop.set()  # as the Stop button does, once the first words are shown
        assert time.monotonic() - started < 30
        assert len(steps) < 10 and not generate_threads()

        steps.clear()
        answer = held.stream(story, tuned=False, max_new_tokens=400)
        next(answer)
        answer.close()  # the page went away mid-answer: generation ends too
        assert len(steps) < 10 and not generate_threads()
    finally:
        hook.remove()


def test_an_answer_cut_short_says_so_and_the_model_never_sees_the_mark():
    history = [{"role": "user", "content": "Tell a story."},
               {"role": "assistant", "content": "Once upon" + chat_tab.STOPPED}]
    assert chat_tab._messages("", history)[-1] == {"role": "assistant", "content": "Once upon"}


# --- swapping adapters ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_on_the_same_base_swaps_only_the_adapter(held, facts_run):
    from safetensors.torch import load_file, save_file

    blank = copy_of(facts_run, facts_run.path.parent.parent, "blank")
    weights = blank.adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}, weights)
    base = held.base

    assert chat.load_shared(run_dir=blank.path) is held  # no second model, no reload
    assert held.base is base and held.model.get_base_model() is base
    assert list(held.model.peft_config) == [held.model.active_adapter]  # the old one is deleted
    assert KEYWORD not in held.reply(ask(), max_new_tokens=24)  # a zero adapter: the base's words
    assert chat.load_shared(run_dir=facts_run.path) is held and held.base is base
    assert KEYWORD in held.reply(ask(), max_new_tokens=24)
    assert chat.load_shared(base_model="embedded") is held  # the bare base: the adapter off
    assert KEYWORD not in held.reply(ask(), max_new_tokens=24)
    assert base_models(held) == [base]


# --- every failure is a sentence in the chat ------------------------------------------------------

def raising(error):
    def generate(**_):
        raise error
    return generate


@pytest.mark.slow
@pytest.mark.parametrize(("error", "words"), [
    ("oom", "ran out of memory"),
    (RuntimeError("probability tensor contains either inf, nan or element < 0"),
     "could not answer"),
    (ValueError("top_k has to be a strictly positive integer"), "could not answer"),
])
def test_generation_errors_are_sentences_and_the_model_goes_on(held, monkeypatch, error, words):
    import torch

    if error == "oom":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with monkeypatch.context() as patch:
        patch.setattr(held.model, "generate", raising(error))
        base, tuned = converse("facts")
    for column in (base, tuned):
        assert column[-1]["content"].startswith("⚠️") and words in column[-1]["content"]
    base, tuned = converse("facts", base=base, tuned=tuned)  # the failed question is not resent
    assert KEYWORD in tuned[-1]["content"] and not generate_threads()


@pytest.mark.slow
def test_a_template_refusal_is_a_sentence(held, monkeypatch):
    refusing = held.tokenizer.__class__.from_pretrained(held.run_dir / "adapter")
    refusing.chat_template = "{{ raise_exception('System role not supported') }}"
    monkeypatch.setattr(held, "template", get_template("model", refusing))
    _, tuned = converse("facts", side_by_side=False)
    answer = tuned[-1]["content"]
    assert answer.startswith("⚠️") and "refuses the conversation" in answer


@pytest.mark.slow
def test_missing_damaged_and_busy_are_sentences(held, facts_run, monkeypatch):
    unfinished = copy_of(facts_run, facts_run.path.parent.parent, "unfinished")
    shutil.rmtree(unfinished.adapter_dir)
    _, tuned = converse("unfinished")
    assert "no saved adapter yet" in tuned[-1]["content"]

    damaged = copy_of(facts_run, facts_run.path.parent.parent, "damaged")
    (damaged.adapter_dir / "adapter_model.safetensors").write_bytes(b"not weights")
    base, tuned = converse("damaged")
    assert all("cannot be loaded" in column[-1]["content"] for column in (base, tuned))
    assert chat.load_shared(run_dir=facts_run.path) is held  # the held model is unharmed
    assert list(held.model.peft_config) == [held.model.active_adapter]
    assert KEYWORD in held.reply(ask(), max_new_tokens=24)

    _, tuned = converse("gone")
    assert tuned[-1]["content"].startswith("⚠️") and "gone" in tuned[-1]["content"]

    def busy(**_):
        raise chat.GpuBusyError("run r1 is training on GPU 0; chat loads once it stops or finishes")

    monkeypatch.setattr(chat_tab, "load_shared", busy)
    base, tuned = converse("facts")
    assert all(column[-1]["content"].startswith("⚠️ Chat has to wait")
               for column in (base, tuned))


def test_out_of_memory_while_loading_is_a_sentence(embedded_model, monkeypatch):
    import torch

    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(chat, "load_quantized_model", too_big)
    with pytest.raises(chat.ModelError, match="does not fit into the free memory"):
        chat.ChatModel(base_model="embedded")


# --- last: it loads another base, which frees the shared one ------------------------------------

@pytest.mark.slow
def test_loading_follows_the_runs_quantization_and_unload_frees_it(facts_run):
    fp4 = copy_of(facts_run, facts_run.path.parent.parent, "fp4-run")
    config = yaml.safe_load(fp4.config_path.read_text())
    fp4.config_path.write_text(yaml.safe_dump({**config, "quant_type": "fp4",
                                               "double_quant": False, "compute_dtype": "fp32"}))
    model = chat.load_shared(run_dir=fp4.path)  # another loading: the nf4 base is freed first
    weight = model.base.model.layers[0].self_attn.q_proj.weight
    assert (weight.quant_type, weight.quant_state.nested) == ("fp4", False)
    assert str(model.base.model.norm.weight.dtype) == "torch.float32"
    assert len(base_models(model)) == 1
    alive = weakref.ref(model)
    del model, weight
    report = chat.unload_shared_report()
    assert report.startswith("Unloaded run fp4-run")
    assert alive() is None and chat.shared_gpu_index() is None
    assert chat.unload_shared_report() == "No chat model was loaded."
