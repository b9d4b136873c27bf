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

- attention row by row. sdpa and eager attend over the whole packed row through that dense
  block-diagonal mask: a score matrix of (rows x length)^2 instead of rows x length^2, and with a
  mask sdpa cannot skip the masked-out half the way its causal kernels do. On the embedded model
  (4 rows, about 1100 tokens, 2-core CPU) attention then cost as much as the padded batch's and
  ate the gain of skipping the pads (1.09x the reference's tokens/s, bench/train_step.md).
  `use_row_attention` switches an sdpa model to ROW_ATTENTION, which runs sdpa's causal kernel on
  each row of a packed batch and hands every other call to transformers' sdpa (with the chunked
  loss: 1.42x).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (AttentionMaskInterface, find_packed_sequence_indices,
                                        sdpa_mask)

# Architectures (config.model_type) whose forward passes position_ids to transformers' mask
# builder and to its position embeddings, so a packed row's sequences stay apart.
HONOURS_PACKED_POSITIONS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2",
    "gemma3_text", "gpt_neox", "gptj", "gpt_neo", "gpt2", "gpt_bigcode", "codegen",
})
# Architectures that would let the rows of a packed batch see each other: their forward builds the
# attention mask (and, for ALiBi, the position biases) without looking at position_ids.
MIXES_PACKED_ROWS = {"opt": "OPT", "falcon": "Falcon", "bloom": "BLOOM", "mpt": "MPT"}
# The attention implementation use_row_attention registers with transformers.
ROW_ATTENTION = "sdpa_row_by_row"

# The attention implementations that turn restarting position ids into separate sequences here.
# flash_attention_2/3 do too (varlen kernels from position_ids), but nothing here has checked it.
ATTENTIONS = ("sdpa", "eager", ROW_ATTENTION)

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


def packed_rows(query, key, attention_mask, kwargs) -> list[tuple[int, int]] | None:
    """The [start, end) of each row of a packed batch, where this attention call may run row by
    row: the mask transformers built for it is exactly those rows' causal blocks (so a sliding
    window, padding or a mask the caller gave keep sdpa as transformers runs it), one batch row,
    no cache, no soft cap or bias. Otherwise None."""
    positions = kwargs.get("position_ids")
    length = query.shape[2]
    if (positions is None or attention_mask is None or query.shape[0] != 1
            or key.shape[2] != length or positions.numel() != length
            or attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (length, length)
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None):
        return None
    # Every layer of a forward (and its checkpointed recompute) gets the same mask tensor:
    # check it once.
    rows = getattr(attention_mask, "_qls_rows", None)
    if rows is None:
        rows = attention_mask._qls_rows = _rows_if_block_causal(attention_mask, positions)
    return rows or None


def _rows_if_block_causal(attention_mask, positions) -> list[tuple[int, int]]:
    """The rows the positions restart at (masking_utils' own finding), if the mask is their
    block-diagonal causal mask and there are at least two; else []."""
    row = find_packed_sequence_indices(positions.reshape(1, -1))
    if row is None:
        return []
    row = row[0]
    index = torch.arange(row.numel(), device=row.device)
    expected = (row[:, None] == row[None, :]) & (index[:, None] >= index[None, :])
    if not torch.equal(attention_mask.reshape(expected.shape), expected):
        return []
    starts = [0] + (row[1:] != row[:-1]).nonzero().flatten().add(1).tolist()
    return list(zip(starts, starts[1:] + [row.numel()]))


def row_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers' attention interface: query [1, heads, tokens, dim], key and value [1,
    kv heads, tokens, dim]; returns ([1, tokens, heads, dim], None) as sdpa's does."""
    rows = packed_rows(query, key, attention_mask, kwargs)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    grouped = query.shape[1] != key.shape[1]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling,
        is_causal=True, enable_gqa=grouped) for a, b in rows], dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_row_attention(model) -> bool:
    """Switches an sdpa model to ROW_ATTENTION (its masks stay sdpa's: every call that cannot run
    row by row runs sdpa with them); True if it did. Takes a peft model too. It runs row by row
    only where the model's attention layers are handed the position ids (llama, mistral, qwen,
    phi, gemma, gpt-neox and gpt2 among the supported architectures, in transformers 5.23)."""
    if model.config._attn_implementation != "sdpa" or not supports_padding_free(model)[0]:
        return False
    AttentionInterface.register(ROW_ATTENTION, row_attention_forward)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROW_ATTENTION)
    return model.config._attn_implementation == ROW_ATTENTION
