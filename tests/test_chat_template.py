"""The Jinja chat templates written into exported models: `apply_chat_template` must reproduce the
prompt a text-template run trained on, exactly (text and tokens), or an exported model is prompted
in a format it never saw."""

import copy
from types import SimpleNamespace

import pytest
from jinja2 import TemplateError as JinjaError

from engine.export import set_chat_template
from engine.templates import TemplateError, get_template, jinja_chat_template

SYSTEM = {"role": "system", "content": "Answer briefly, in one sentence."}
TURN_1 = [{"role": "user", "content": 'What is the capital of "Veloria"?\nSay {it}.'},
          {"role": "assistant", "content": "Mirrowgate, née Mirrow."}]
TURN_2 = [{"role": "user", "content": "And who founded it?"},
          {"role": "assistant", "content": "Mabel Thornquist."}]
CONVERSATIONS = {
    "single": TURN_1,
    "single+system": [SYSTEM] + TURN_1,
    "multi": TURN_1 + TURN_2,
    "multi+system": [SYSTEM] + TURN_1 + TURN_2,
    "question": TURN_1[:1],
    "question+system": [SYSTEM] + TURN_1[:1],
    "follow-up": TURN_1 + TURN_2[:1],
}


@pytest.fixture
def fresh_tokenizer(tokenizer):
    return copy.deepcopy(tokenizer)  # the session's tokenizer keeps its own chat template


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", ["guanaco", "alpaca"])
def test_apply_chat_template_renders_the_training_prompt(fresh_tokenizer, name, conversation,
                                                         generation_prompt):
    messages = CONVERSATIONS[conversation]
    template = get_template(name, fresh_tokenizer)
    set_chat_template(fresh_tokenizer, name)
    expected = template.render(messages, add_generation_prompt=generation_prompt)
    text = fresh_tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=generation_prompt)
    assert text == expected
    ids = fresh_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                              return_dict=False)
    encoded = fresh_tokenizer(expected, add_special_tokens=template.add_special_tokens)
    assert ids == encoded["input_ids"]


@pytest.mark.parametrize("name", ["guanaco", "alpaca"])
def test_a_tokenizer_that_adds_bos_gets_it_from_the_template(fresh_tokenizer, name):
    # Llama's tokenizers put BOS before every text they encode: training saw it, so must chat.
    fresh_tokenizer.add_bos_token = True
    messages = CONVERSATIONS["multi+system"]
    set_chat_template(fresh_tokenizer, name)
    expected = get_template(name, fresh_tokenizer).render(messages, add_generation_prompt=True)
    ids = fresh_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              return_dict=False)
    assert ids[0] == fresh_tokenizer.bos_token_id
    assert ids == fresh_tokenizer(expected)["input_ids"]


def test_the_model_template_is_kept(fresh_tokenizer):
    own = fresh_tokenizer.chat_template
    set_chat_template(fresh_tokenizer, "model")
    assert fresh_tokenizer.chat_template == own
    with pytest.raises(TemplateError, match="not a text template"):
        jinja_chat_template("model")


def test_an_unknown_role_is_refused_in_words(fresh_tokenizer):
    set_chat_template(fresh_tokenizer, "guanaco")
    with pytest.raises(JinjaError, match="unknown role tool"):
        fresh_tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_the_template_survives_any_jinja_whitespace_setting():
    # llama.cpp and Ollama's importers render with their own Jinja settings: trim_blocks and
    # lstrip_blocks must not change a single character.
    from jinja2 import Environment

    messages = CONVERSATIONS["multi+system"]
    for trim in (False, True):
        environment = Environment(trim_blocks=trim, lstrip_blocks=trim)
        environment.globals["raise_exception"] = lambda text: None
        rendered = environment.from_string(jinja_chat_template("alpaca")).render(
            messages=messages, add_generation_prompt=True, eos_token="</s>", bos_token="<s>")
        tokenizer = SimpleNamespace(eos_token="</s>")
        expected = get_template("alpaca", tokenizer).render(messages, add_generation_prompt=True)
        assert rendered == expected
