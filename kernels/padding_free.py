"""Padding-free batches: the rows of a micro-batch concatenated into one row, so no compute goes to
pad tokens, with the rows kept exactly as independent as padding keeps them.

transformers does the work. DataCollatorWithFlattening concatenates the rows, restarts
position_ids at 0 for each one and puts the ignore index on each row's first label, so no token is
ever predicted from the end of the row before it. For sdpa and eager attention, masking_utils
(find_packed_sequence_indices) reads the restarting positions as sequence boundaries and builds a
block-diagonal causal mask, sliding windows included; the rotary or learned position embeddings
read the same position_ids. What transformers leaves to its caller, and this module adds:

- which models honour it. An architecture whose forward builds its mask without the position ids
  lets the rows attend to each other, silently: no error, just a different model. The tables
  below say which do, as checked against transformers 5.23 by tests/test_kernels_packing.py.
- no key-value cache. transformers looks for packed sequences only when there is no cache, and
  these models create one whenever use_cache is on: in training unless gradient checkpointing
  turned it off, and in every evaluation. The collator switches it off in each batch.
- counting tokens: see TOKENS_SEEN.

Cost to know: sdpa and eager attend over the whole packed row through a dense mask, so their score
matrix is (rows x length)^2 instead of rows x length^2. For short chat rows the linear layers, which
see only real tokens now, dominate; for eager attention on long rows the scores can cost more.
"""

from __future__ import annotations

from transformers import DataCollatorWithFlattening

# Architectures (config.model_type) whose forward passes position_ids to transformers' mask
# builder and to its position embeddings, so a packed row's sequences stay apart.
HONOURS_PACKED_POSITIONS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2",
    "gemma3_text", "gpt_neox", "gptj", "gpt_neo", "gpt2", "gpt_bigcode", "codegen",
})
# Architectures that would let the rows of a packed batch see each other: their forward builds the
# attention mask (and, for ALiBi, the position biases) without looking at position_ids.
MIXES_PACKED_ROWS = {"opt": "OPT", "falcon": "Falcon", "bloom": "BLOOM", "mpt": "MPT"}
# The attention implementations that turn restarting position ids into separate sequences here.
# flash_attention_2/3 do too (varlen kernels from position_ids), but nothing here has checked it.
ATTENTIONS = ("sdpa", "eager")

# TrainingArguments.include_num_input_tokens_seen for padding-free batches. They hold no padding,
# so "all" counts exactly the real tokens. "non_padding" would look for an attention mask (there is
# none), then count the tokens unequal to the pad token: every real EOS is missed where pad is EOS,
# and without a tokenizer it warns on every step before counting them all anyway.
TOKENS_SEEN = "all"


def supports_padding_free(model) -> tuple[bool, str]:
    """(True, why) when padding-free batches give this model exactly what padded ones give it;
    else (False, the reason in words). Takes a transformers model or a peft model around one."""
    config = model.config  # a peft model hands over its base model's
    architecture, attention = config.model_type, config._attn_implementation
    if architecture in MIXES_PACKED_ROWS:
        return False, (f"{MIXES_PACKED_ROWS[architecture]} builds its attention mask without the "
                       "position ids, so the rows of a padding-free batch would attend to each "
                       "other: its batches are padded")
    if architecture not in HONOURS_PACKED_POSITIONS:
        return False, (f"padding-free batches are not checked for the {architecture} architecture "
                       "(its rows might attend to each other): its batches are padded")
    if attention not in ATTENTIONS:
        return False, (f"padding-free batches are checked with {' and '.join(ATTENTIONS)} "
                       f"attention, not with {attention}: the batches are padded")
    return True, (f"{architecture} with {attention} attention keeps the sequences of a "
                  "padding-free batch apart")


class _FlatteningWithoutCache(DataCollatorWithFlattening):
    """transformers' flattening collator, with the key-value cache off in every batch: with a
    cache, transformers never looks for packed sequences (see the module's docstring)."""

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        batch["use_cache"] = False
        return batch


def padding_free_collator(ignore_index: int = -100) -> DataCollatorWithFlattening:
    """A data collator for the Trainer: each micro-batch of rows (input_ids, labels, optionally an
    all-ones attention_mask) becomes one row of shape [1, total tokens] with position_ids that
    restart at 0 for every row, and ignore_index on every row's first label (the label value the
    model's loss skips: -100 in transformers). Needs no tokenizer: nothing is padded. Use it only
    where supports_padding_free(model) says so."""
    return _FlatteningWithoutCache(separator_id=ignore_index, return_tensors="pt")
