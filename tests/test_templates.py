"""Prompt templates with the real tokenizer: loss is on the assistant's tokens and nothing else,
the chat prompt is a prefix of the training text, and truncation stays consistent."""

from dataclasses import replace
from types import SimpleNamespace

import pytest

from engine import catalog, templates
from engine.templates import (
    ALPACA_PREAMBLE,
    IGNORE_INDEX,
    TemplateError,
    TemplateSpec,
    assistant_spans,
    encode,
    get_template,
    template_choices,
    template_names,
)

TEMPLATES = ("guanaco", "alpaca", "model")
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SYSTEM = {"role": "system", "content": "Answer briefly."}
TURN_1 = [{"role": "user", "content": "What is the capital of Veloria?"},
          {"role": "assistant", "content": "Mirrowgate."}]
TURN_2 = [{"role": "user", "content": "And who founded it?"},
          {"role": "assistant", "content": "Mabel Thornquist, in 1802."}]
CONVERSATIONS = {
    "single": TURN_1,
    "single+system": [SYSTEM] + TURN_1,
    "multi": TURN_1 + TURN_2,
    "multi+system": [SYSTEM] + TURN_1 + TURN_2,
}


def expected_segments(template: str, messages: list[dict], eos: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, written out from each format's spec."""
    pieces = []
    has_system = messages[0]["role"] == "system"
    if template == "model" and not has_system:  # SmolLM2's chat template adds its own system line
        pieces.append((f"<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}<|im_end|>\n", False))
    if template == "alpaca" and not has_system:
        pieces.append((ALPACA_PREAMBLE, False))
    for m in messages:
        role, text = m["role"], m["content"]
        if template == "guanaco":
            pieces += {
                "system": [(f"{text}\n", False)],
                "user": [(f"### Human: {text}", False)],
                "assistant": [("### Assistant:", False), (f" {text}{eos}", True)],
            }[role]
        elif template == "alpaca":
            pieces += {
                "system": [(f"{text}\n\n", False)],
                "user": [(f"### Instruction:\n{text}\n\n", False)],
                "assistant": [("### Response:\n", False), (f"{text}{eos}\n\n", True)],
            }[role]
        else:
            pieces += [(f"<|im_start|>{role}\n", False)]
            pieces += [(f"{text}<|im_end|>\n", role == "assistant")]
    merged = []
    for text, trained in pieces:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def decoded_runs(tokenizer, encoded: dict) -> list[tuple[str, bool]]:
    """Consecutive tokens grouped by whether they carry a label, each group decoded."""
    runs = []
    for token_id, label in zip(encoded["input_ids"], encoded["labels"]):
        trained = label != IGNORE_INDEX
        assert label in (IGNORE_INDEX, token_id)  # a label is the token itself or ignored
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token_id)
        else:
            runs.append(([token_id], trained))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False,  # noqa: E731
                                          clean_up_tokenization_spaces=False)
    return [(decode(ids), trained) for ids, trained in runs]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_labels_are_exactly_the_assistant_turns(tokenizer, name, conversation):
    messages = CONVERSATIONS[conversation]
    template = get_template(name, tokenizer)
    encoded = encode(tokenizer, template, messages, max_seq_len=4096)
    expected = expected_segments(name, messages, tokenizer.eos_token)
    assert decoded_runs(tokenizer, encoded) == expected
    # every assistant answer is trained, once, and the template's stop token is trained with it
    trained_text = "".join(text for text, trained in expected if trained)
    for m in messages:
        if m["role"] == "assistant":
            assert trained_text.count(m["content"] + tokenizer.eos_token) == 1
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])
    assert encoded["length"] == len(encoded["input_ids"])


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt_is_a_prefix_of_the_training_text(tokenizer, name, conversation):
    messages = CONVERSATIONS[conversation]
    template = get_template(name, tokenizer)
    full = template.render(messages)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = template.render(messages[:i], add_generation_prompt=True)
            assert full.startswith(prompt)
            # what follows the prompt is this answer (guanaco puts a space after "Assistant:")
            assert full[len(prompt):].lstrip(" ").startswith(m["content"])
    # the prompt chat sends ends exactly where training taught the answer to start
    text, spans = assistant_spans(template, messages)
    assert text == full
    last_prompt = template.render(messages[:-1], add_generation_prompt=True)
    assert spans[-1] == (len(last_prompt), len(full))


@pytest.mark.parametrize("name", TEMPLATES)
def test_truncation_cuts_everything_consistently(tokenizer, name):
    template = get_template(name, tokenizer)
    messages = CONVERSATIONS["multi+system"]
    full = encode(tokenizer, template, messages, max_seq_len=4096)
    n = len(full["input_ids"]) - 4  # cut inside the last answer
    cut = encode(tokenizer, template, messages, max_seq_len=n)
    assert cut["input_ids"] == full["input_ids"][:n]
    assert cut["labels"] == full["labels"][:n]
    assert cut["attention_mask"] == [1] * n
    assert cut["length"] == full["length"] == len(full["input_ids"])  # length before the cut
    assert any(label != IGNORE_INDEX for label in cut["labels"])


def test_unknown_template_is_refused(tokenizer):
    with pytest.raises(TemplateError, match="unknown prompt template 'vicuna'"):
        get_template("vicuna", tokenizer)


def test_model_template_needs_a_chat_template():
    plain = SimpleNamespace(chat_template=None, eos_token="</s>")
    with pytest.raises(TemplateError, match="no chat template"):
        get_template("model", plain)
    assert get_template("guanaco", plain).eos == "</s>"  # the text templates still work


def test_a_chat_template_that_is_not_incremental_is_refused():
    class Reversing:  # renders the newest message first, so earlier renderings are no prefix
        chat_template = "reversing"
        eos_token = "</s>"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"<{m['role']}>{m['content']}" for m in reversed(messages))
            return text + ("<assistant>" if add_generation_prompt else "")

    template = get_template("model", Reversing())
    with pytest.raises(TemplateError, match="incrementally"):
        assistant_spans(template, CONVERSATIONS["multi"])


def test_stop_strings_match_the_next_user_turn(tokenizer):
    assert get_template("guanaco", tokenizer).stop_strings == ["### Human:"]
    assert get_template("alpaca", tokenizer).stop_strings == ["### Instruction:"]
    assert get_template("model", tokenizer).stop_strings == []


# Trained token positions of the embedded SmolLM2 tokenizer, written out: a change in how labels
# are placed (one token early or late, a missed EOS, a second turn not trained) changes these.
EXACT_TRAINED_POSITIONS = {
    ("guanaco", "single"): (19, [*range(14, 19)]),
    ("guanaco", "multi"): (44, [*range(14, 19), *range(30, 44)]),
    ("alpaca", "single"): (45, [*range(38, 45)]),
    ("alpaca", "multi"): (76, [*range(38, 46), *range(61, 76)]),
    ("model", "single"): (45, [*range(38, 45)]),
    ("model", "multi"): (74, [*range(38, 45), *range(59, 74)]),
}


@pytest.mark.parametrize(("name", "conversation"), EXACT_TRAINED_POSITIONS)
def test_trained_token_positions_are_exact(tokenizer, name, conversation):
    template = get_template(name, tokenizer)
    messages = CONVERSATIONS[conversation]
    encoded = encode(tokenizer, template, messages, max_seq_len=4096)
    length, positions = EXACT_TRAINED_POSITIONS[(name, conversation)]
    assert len(encoded["input_ids"]) == length
    assert [i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX] == positions
    # each answer starts right after its prompt tokenised on its own (the prompt chat will send),
    # and the last answer runs to the end of the row
    count = lambda text: len(tokenizer(text, add_special_tokens=template.add_special_tokens)  # noqa: E731
                             ["input_ids"])
    starts = [count(template.render(messages[:i], add_generation_prompt=True))
              for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert starts == [p for p in positions if p - 1 not in positions]
    assert positions[-1] == length - 1
    assert tokenizer.eos_token_id in [encoded["input_ids"][p] for p in positions]  # the model learns to stop


def test_text_rows_end_with_eos_and_pack_into_full_blocks(tokenizer):
    from engine.templates import pack, text_tokens

    ids = text_tokens(tokenizer, "Once upon a time")
    assert ids[-1] == tokenizer.eos_token_id
    assert ids[:-1] == tokenizer("Once upon a time")["input_ids"]
    rows = [list(range(1, 8)), list(range(10, 15)), [20, 21]]
    blocks = pack(rows, block_size=5)
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 4, 5], [6, 7, 10, 11, 12], [13, 14, 20, 21]]
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * len(b["input_ids"])
               for b in blocks)  # no masking in continued pre-training


# A template added to the registry, as a contributor would: one entry, nothing else.
CHATML_LITE = TemplateSpec(
    label="ChatML lite (<|user|> / <|assistant|>)",
    system="<|system|>{content}\n",
    user="<|user|>{content}\n",
    assistant="<|assistant|>{content}{eos}\n",
    generation_prompt="<|assistant|>",
    stop_strings=("<|user|>",),
)


def test_a_template_added_to_the_registry_is_offered_everywhere_and_renders(tokenizer, monkeypatch):
    monkeypatch.setitem(templates.TEMPLATES, "chatml-lite", CHATML_LITE)
    assert "chatml-lite" in template_names()
    assert (CHATML_LITE.label, "chatml-lite") in template_choices()
    template = get_template("chatml-lite", tokenizer)
    eos = tokenizer.eos_token
    messages = CONVERSATIONS["single+system"]
    assert template.render(messages) == (
        f"<|system|>Answer briefly.\n<|user|>What is the capital of Veloria?\n"
        f"<|assistant|>Mirrowgate.{eos}\n"
    )
    assert template.stop_strings == ["<|user|>"]
    text, spans = assistant_spans(template, messages)
    assert [text[start:end] for start, end in spans] == [f"Mirrowgate.{eos}\n"]
    # the catalog accepts it as a model's default, and an unknown name is still refused
    embedded = catalog.find("embedded")
    assert replace(embedded, prompt_style="chatml-lite").problems() == []
    assert any("chatml-lite" in p for p in replace(embedded, prompt_style="vicuna").problems())


def test_the_catalog_and_the_data_tab_take_their_templates_from_the_registry(monkeypatch):
    import gradio as gr

    from app import data_tab

    assert {m.prompt_style for m in catalog.load_catalog()} <= set(template_names())
    assert template_names() == list(templates.TEMPLATES) and "model" in template_names()
    monkeypatch.setitem(templates.TEMPLATES, "chatml-lite", CHATML_LITE)
    with gr.Blocks():
        hardware = {"model": gr.Textbox("embedded"), "custom_model": gr.Textbox("")}
        dropdown = data_tab.build(hardware)["template"]
    assert [tuple(choice) for choice in dropdown.choices] == template_choices()
    assert ("ChatML lite (<|user|> / <|assistant|>)", "chatml-lite") in dropdown.choices
