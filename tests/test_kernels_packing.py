"""Padding-free batches (kernels/padding_free.py): a packed micro-batch computes exactly what its
rows compute alone, and exactly the loss and LoRA gradients of the padded batch the engine builds.

Every architecture kernels.padding_free calls supported gets a tiny random model here (sliding
windows shorter than the rows, so windows meet packing too), with each attention it can load;
the embedded SmolLM2 checks the same on real conversations. Each comparison also builds a
deliberately mixed result (the packed row under an all-ones mask: positions restart, attention
crosses) and requires it to differ, so the tests fail if transformers ever stopped honouring
packed position_ids instead of passing because nothing could tell.
"""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM,
                          DataCollatorForSeq2Seq, Trainer, TrainingArguments)

from engine.templates import IGNORE_INDEX, encode, get_template
from facts import FACTS
import kernels.padding_free
from kernels.padding_free import (ATTENTIONS, HONOURS_PACKED_POSITIONS, MIXES_PACKED_ROWS,
                                  ROW_ATTENTION, TOKENS_SEEN, padding_free_collator,
                                  supports_padding_free, use_row_attention)

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 96
LENGTHS = (5, 9, 3, 7)  # several rows longer than the sliding windows below
ROPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
WINDOW = 4
GPT = dict(n_embd=32, n_layer=2, n_head=4)
TINY = {  # architecture -> the shape of a tiny random model of it
    "llama": ROPE,
    "mistral": {**ROPE, "sliding_window": WINDOW},
    "mixtral": {**ROPE, "sliding_window": WINDOW, "num_local_experts": 4},
    "qwen2": {**ROPE, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {**ROPE, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "phi3": ROPE,
    "phi": ROPE,
    "gemma": {**ROPE, "head_dim": 8},
    "gemma2": {**ROPE, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW},
    "gemma3_text": {**ROPE, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "gpt_neox": ROPE,
    "gptj": {**GPT, "rotary_dim": 4},
    "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, window_size=WINDOW,
                    attention_types=[[["global", "local"], 1]]),
    "gpt2": GPT,
    "gpt_bigcode": GPT,
    "codegen": {**GPT, "rotary_dim": 4},
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "mpt": dict(d_model=32, n_layers=2, n_heads=4),
}


def tiny_config(architecture: str, vocab: int = VOCAB):
    return AutoConfig.for_model(architecture, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0, **TINY[architecture])


def tiny_model(architecture: str, attention: str, vocab: int = VOCAB):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(architecture, vocab), dtype=torch.float32,
        attn_implementation="sdpa" if attention == ROW_ATTENTION else attention)
    if attention == ROW_ATTENTION:
        assert use_row_attention(model)
    return model


def loadable_attentions(architecture: str) -> list[str]:
    """The ATTENTIONS this architecture loads with (ROW_ATTENTION wherever sdpa does)."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(tiny_config(architecture))]
    return [attention for attention in ATTENTIONS if attention == "eager" or getattr(
        model_class, f"_supports_{'sdpa' if attention == ROW_ATTENTION else attention}", False)]


def random_rows(lengths=LENGTHS, vocab=VOCAB) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return rows


def fact_rows(tokenizer, count: int) -> list[dict]:
    """The quick-test recipe's rows, tokenised the way engine/train.py does (loss on answers)."""
    template = get_template("model", tokenizer)
    rows = []
    for fact in FACTS:
        for question in fact["train"]:
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": fact["answer"]}]
            row = encode(tokenizer, template, messages, max_seq_len=256)
            row.pop("length")
            rows.append(row)
    return rows[::len(rows) // count][:count]  # different facts: different lengths


def each_row_alone(model, rows) -> torch.Tensor:
    """The logits of each row run by itself, one row after the other."""
    return torch.cat([model(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in rows])


def assert_rows_kept_apart(model, rows, atol=2e-5):
    """The packed batch's logits equal each row's alone; the same row with attention crossing the
    rows (an all-ones mask) does not, so the comparison could see rows mixing."""
    batch = padding_free_collator()(rows)
    model.eval()
    with torch.no_grad():
        packed = model(**batch).logits[0]
        ids, positions = batch["input_ids"], batch["position_ids"]
        mixed = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                      use_cache=False).logits[0]
        alone = each_row_alone(model, rows)
    torch.testing.assert_close(packed, alone, atol=atol, rtol=1e-4)
    after_first_row = slice(len(rows[0]["input_ids"]), None)
    assert (mixed[after_first_row] - alone[after_first_row]).abs().max() > 1e-3


@pytest.mark.parametrize("architecture,attention", [
    (architecture, attention) for architecture in sorted(HONOURS_PACKED_POSITIONS)
    for attention in loadable_attentions(architecture)])
def test_packed_rows_compute_what_each_row_computes_alone(architecture, attention):
    """With ROW_ATTENTION too: where it cannot run row by row (a sliding window, the caller's
    all-ones mask of the mixed comparison) it must run sdpa exactly as transformers does."""
    model = tiny_model(architecture, attention)
    assert supports_padding_free(model)[0]
    assert_rows_kept_apart(model, random_rows())


# Where transformers 5.23 hands the attention layers the position ids, so ROW_ATTENTION can find
# the rows; the others (gpt_bigcode here) run sdpa with the block mask, still exact.
ROW_BY_ROW = ["gemma", "gemma3_text", "gpt2", "gpt_neox", "llama", "phi", "phi3", "qwen2", "qwen3"]


@pytest.mark.parametrize("architecture", ROW_BY_ROW)
def test_row_attention_runs_each_packed_row_on_its_own(architecture, monkeypatch):
    calls = []
    real = kernels.padding_free.packed_rows
    monkeypatch.setattr(kernels.padding_free, "packed_rows",
                        lambda *args: calls.append(real(*args)) or calls[-1])
    model = tiny_model(architecture, ROW_ATTENTION).eval()
    rows = random_rows()
    with torch.no_grad():
        model(**padding_free_collator()(rows))
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    expected = list(zip(starts, starts[1:] + [sum(LENGTHS)]))
    # every layer without a sliding window ran the rows one by one
    assert calls and expected in calls, calls
    calls.clear()
    with torch.no_grad():  # a single row is no packed batch: plain sdpa, causal
        model(input_ids=torch.tensor([rows[0]["input_ids"]]))
    assert calls and not any(calls)


def test_row_attention_is_only_for_sdpa_and_supported_models():
    assert not use_row_attention(tiny_model("llama", "eager"))
    assert not use_row_attention(tiny_model("opt", "sdpa"))  # rows would mix anyway
    model = tiny_model("llama", "sdpa")
    assert use_row_attention(model) and model.config._attn_implementation == ROW_ATTENTION
    assert supports_padding_free(model)[0]


@pytest.mark.parametrize("architecture", sorted(MIXES_PACKED_ROWS))
def test_architectures_that_mix_packed_rows_are_refused(architecture):
    model = tiny_model(architecture, "eager").eval()
    supported, reason = supports_padding_free(model)
    assert not supported and MIXES_PACKED_ROWS[architecture] in reason and "attend" in reason
    # The table is right: packed, these rows do see each other (when transformers fixes one,
    # this fails, and the architecture moves to HONOURS_PACKED_POSITIONS).
    rows = random_rows()
    batch = padding_free_collator()(rows)
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = each_row_alone(model, rows)
    assert (packed - alone).abs().max() > 1e-3


def test_every_architecture_is_decided_and_tested():
    """Each architecture of the catalog's attention table is in one table or the other, and each
    one the module supports has a tiny model above."""
    with open(ROOT / "presets" / "attention.yaml", encoding="utf-8") as fh:
        catalog = set(yaml.safe_load(fh))
    assert catalog <= HONOURS_PACKED_POSITIONS | set(MIXES_PACKED_ROWS)
    assert set(TINY) == HONOURS_PACKED_POSITIONS | set(MIXES_PACKED_ROWS)


def test_unchecked_architecture_or_attention_is_refused_with_the_reason():
    torch.manual_seed(0)
    olmo = AutoModelForCausalLM.from_config(AutoConfig.for_model("olmo", vocab_size=VOCAB, **ROPE))
    supported, reason = supports_padding_free(olmo)
    assert not supported and "olmo" in reason and "not checked" in reason
    flex = tiny_model("llama", "flex_attention")
    supported, reason = supports_padding_free(flex)
    assert not supported and "flex_attention" in reason


def test_the_cache_would_mix_the_rows_so_the_collator_turns_it_off():
    """transformers skips its packed-sequence detection when a key-value cache exists, and a model
    makes one whenever use_cache is on (evaluation, or training without gradient checkpointing)."""
    model = tiny_model("llama", "sdpa").eval()
    assert model.config.use_cache
    rows = random_rows()
    batch = padding_free_collator()(rows)
    assert batch["use_cache"] is False
    with torch.no_grad():
        with_cache = model(**{**batch, "use_cache": True}).logits[0]
        alone = each_row_alone(model, rows)
    assert (with_cache - alone).abs().max() > 1e-3


@pytest.mark.parametrize("ignore_index", [IGNORE_INDEX, -1])
def test_first_label_of_every_packed_row_is_ignored(ignore_index):
    rows = random_rows()  # every label a real token, as in a plain-text row
    batch = padding_free_collator(ignore_index)(rows)
    labels, positions = batch["labels"][0].tolist(), batch["position_ids"][0].tolist()
    ids = [token for row in rows for token in row["input_ids"]]
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    assert batch["input_ids"][0].tolist() == ids and len(labels) == len(ids) == sum(LENGTHS)
    assert [labels[start] for start in starts] == [ignore_index] * len(rows)
    assert all(labels[i] == ids[i] for i in range(len(ids)) if i not in starts)
    assert positions == [p for length in LENGTHS for p in range(length)]
    assert "attention_mask" not in batch  # a mask would switch transformers' packing detection off


@pytest.fixture(scope="module")
def smollm2(embedded_model):
    return AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)


@pytest.mark.slow  # a 135M model's forward, four times, in fp32
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_embedded_model_keeps_packed_conversations_apart(smollm2, tokenizer, attention):
    smollm2.set_attn_implementation("sdpa" if attention == ROW_ATTENTION else attention)
    if attention == ROW_ATTENTION:
        assert use_row_attention(smollm2)
    assert supports_padding_free(smollm2)[0]
    # 30 layers of fp32 summed in another order: logits of about 20 agree to within 1e-4
    assert_rows_kept_apart(smollm2, fact_rows(tokenizer, 2), atol=1e-4)


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # A and B random: with B = 0 the gradients of A would all be zero
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules="all-linear", init_lora_weights=False))


def loss_and_lora_gradients(model, batch) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: param.grad.clone() for name, param in model.named_parameters()
                         if param.requires_grad}


@pytest.mark.parametrize("architecture,attention", [
    ("llama", "sdpa"), ("llama", ROW_ATTENTION), ("gemma2", "eager"), ("gpt_neox", "sdpa")])
def test_loss_and_lora_gradients_equal_the_padded_batchs(architecture, attention, tokenizer):
    """The same rows, padded the way engine/train.py pads them and packed: the same loss (sum over
    answer tokens / their count) and the same LoRA gradients, with activation checkpointing on as
    engine/train.py has it."""
    base = tiny_model(architecture, attention, vocab=len(tokenizer))
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = lora(base)
    model.train()
    assert supports_padding_free(model)[0]  # a peft model answers for its base model
    rows = fact_rows(tokenizer, 4)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(rows)
    assert (padded["attention_mask"] == 0).any()  # the rows differ in length: there is padding
    padded_loss, padded_grads = loss_and_lora_gradients(model, padded)
    packed_loss, packed_grads = loss_and_lora_gradients(model, padding_free_collator()(rows))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(packed_grads) > 0
    for name, grad in packed_grads.items():
        scale = padded_grads[name].abs().max().item()
        assert scale > 0, name
        # the same fp32 sums in another order: equal to within 1e-4 of the largest entry
        torch.testing.assert_close(grad, padded_grads[name], atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize("packing", [False, True])
def test_trainer_counts_only_real_tokens(packing, tokenizer, tmp_path):
    rows = fact_rows(tokenizer, 4)
    model = tiny_model("llama", "sdpa", vocab=len(tokenizer))
    collator = (padding_free_collator() if packing else
                DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))
    counting = TOKENS_SEEN if packing else "non_padding"
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(rows),
                             max_steps=1, use_cpu=True, report_to="none", save_strategy="no",
                             include_num_input_tokens_seen=counting)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                      processing_class=tokenizer)  # whose pad token is its EOS
    trainer.train()
    assert trainer.state.num_input_tokens_seen == sum(len(row["input_ids"]) for row in rows)


def test_the_engine_packs_and_attends_row_by_row_with_kernels_auto(tokenizer):
    """engine/kernel_path puts the piece in: the plan says so, the batches come packed."""
    from engine.kernel_path import KernelPlan, apply_to_model, collator

    plan = KernelPlan({"padding_free": "test"})
    model = lora(tiny_model("llama", "sdpa", vocab=len(tokenizer)))
    apply_to_model(plan, model, torch.float32)
    assert plan.on == {"padding_free": "attention row by row"}
    assert plan.summary() == "kernels: padding_free (attention row by row)"
    assert model.config._attn_implementation == ROW_ATTENTION
    batch_collator, counting = collator(plan, tokenizer)
    batch = batch_collator(fact_rows(tokenizer, 3))
    assert batch["input_ids"].shape[0] == 1 and counting == TOKENS_SEEN

    plan = KernelPlan({"padding_free": "test"})
    apply_to_model(plan, lora(tiny_model("opt", "sdpa", vocab=len(tokenizer))), torch.float32)
    assert not plan.on and "OPT" in plan.off["padding_free"]
    padded = collator(plan, tokenizer)[0](fact_rows(tokenizer, 3))
    assert padded["input_ids"].shape[0] == 3
