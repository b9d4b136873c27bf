"""The tokenizer of a GGUF file: what llama.cpp (and Ollama, LM Studio) need to turn text into
exactly the token ids the model trained on, and to know where an answer ends.

Read from the tokenizer transformers loads from the merged folder (tokenizers' own description of
it: vocabulary, merges, how text is split), so neither sentencepiece nor llama.cpp's converter is
needed. Two kinds of tokenizer exist among the
models we export:

- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2, GPT-NeoX): llama.cpp's "gpt2" tokenizer,
  with the merges and the name of the regular expression that splits text before merging
  (`tokenizer.ggml.pre`), which llama.cpp hard-codes per name;
- SentencePiece BPE (Llama 2, Mistral, TinyLlama, Gemma, Phi-3), which transformers stores as a BPE
  model with byte fallback: llama.cpp's "llama" tokenizer, which merges by token score.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from engine.export import ExportError


class GgufError(ExportError):
    """A GGUF file cannot be written for this model; the message says why and what to do instead.
    An ExportError, so whatever reports failed exports reports this one too."""


# How the text is cut before byte-level BPE merges, as tokenizer.json says it (the regular
# expression of a Split step), and the name llama.cpp knows that cut by (its llama-vocab.cpp).
SPLIT_PATTERNS = {
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2 and Qwen2.5: the same, but each digit on its own
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Write the tokenizer of the model in model_dir: vocabulary, merges or scores, special token
    ids, whether BOS/EOS are added, and the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GgufError("this model's tokenizer is not a fast (tokenizers) one, which GGUF export "
                        "reads the vocabulary from; export the merged model instead")
    # The tokenizer as transformers builds it, not tokenizer.json as saved: a model's tokenizer
    # class may replace parts of the file (Qwen2's sets its own pre-tokenizer), and training
    # tokenised with what transformers built.
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GgufError(f"this model's tokenizer is of type {model.get('type')}, and GGUF export "
                        "handles BPE tokenizers only; export the merged model instead")
    if model.get("byte_fallback"):
        _sentencepiece_vocab(writer, tokenizer, spec, vocab_size)
    else:
        _byte_level_vocab(writer, tokenizer, spec, vocab_size)
    _special_tokens(writer, model_dir, tokenizer, vocab_size)


def tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below vocab_size: its token and llama.cpp's token type. Rows of the embedding
    that no token uses (vocabularies padded to a multiple of 64) become unused placeholders."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise GgufError(f"the tokenizer has token ids up to {max(by_id)}, but the model's "
                        f"embedding has only {vocab_size} rows: the model and its tokenizer "
                        "disagree")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # llama.cpp matches added tokens in the raw text, before any splitting
            tokens.append(token)
            special = added[i].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _byte_level_vocab(writer, tokenizer, spec: dict, vocab_size: int) -> None:
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GgufError("this BPE tokenizer is neither byte-level (GPT-2 style) nor SentencePiece "
                        "style, the two kinds llama.cpp reads; export the merged model instead")
    tokens, types = tokens_and_types(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge)
                             for merge in spec["model"].get("merges", [])])


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how this byte-level tokenizer cuts text before merging.

    llama.cpp's own converter recognises a tokenizer by hashing the ids it gives a test sentence
    and looking the hash up in a list of known models; that list changes with every release and
    misses fine-tuned tokenizers. The cut is what matters, and tokenizer.json states it, so it is
    read from there; tests/test_gguf.py proves that llama.cpp then tokenises like transformers."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel" and not last.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return "gpt-2"  # GPT-2's own expression: GPT-NeoX, Pythia, the embedded SmolLM2
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
                and last.get("use_regex", True):
            return "smollm"  # each digit apart, then GPT-2's expression
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
            name = SPLIT_PATTERNS.get((steps[0].get("pattern") or {}).get("Regex"))
            if name:
                return name
    raise GgufError("this tokenizer splits text before merging in a way llama.cpp has no name "
                    f"for that we know ({json.dumps(pre)[:200]}), so llama.cpp would tokenise "
                    "differently from training; export the merged model instead")


def _sentencepiece_vocab(writer, tokenizer, spec: dict, vocab_size: int) -> None:
    tokens, types = tokens_and_types(tokenizer, vocab_size)
    # llama.cpp merges the adjacent pair whose joined text has the highest score; transformers
    # merges the pair earliest in the merge list. A score of minus the merge's rank makes the two
    # agree (it is what SentencePiece's own scores encode).
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    unmerged = -float(len(ranks) + 1)  # single characters, and pieces no merge makes
    scores = []
    for i, token in enumerate(tokens):
        if types[i] == gguf.TokenType.NORMAL and BYTE_TOKEN.fullmatch(token):
            types[i] = gguf.TokenType.BYTE
        elif token == tokenizer.unk_token:
            types[i] = gguf.TokenType.UNKNOWN
        scores.append(-float(ranks[token]) if token in ranks else unmerged)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2 and Mistral do, Gemma does not)."""
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    if any(step.get("type") == "Prepend" and step.get("prepend") == SPM_SPACE for step in steps):
        return True
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre else []
    return any(step.get("type") == "Metaspace" and (
        step.get("prepend_scheme") in ("first", "always") or step.get("add_prefix_space"))
        for step in steps)


def _special_tokens(writer, model_dir: Path, tokenizer, vocab_size: int) -> None:
    """BOS/EOS/UNK/PAD as the tokenizer has them, whether encoding adds BOS/EOS (measured, the way
    training tokenised), and the chat template, written by gguf's SpecialVocab."""
    special = gguf.SpecialVocab(model_dir, n_vocab=vocab_size)
    special.special_token_ids = {
        kind: token_id for kind in ("bos", "eos", "unk", "pad")
        if (token_id := getattr(tokenizer, f"{kind}_token_id")) is not None
    }
    adds_bos, adds_eos = added_special_tokens(tokenizer)
    special.add_special_token = {"bos": adds_bos, "eos": adds_eos}
    template = tokenizer.chat_template
    special.chat_template = template if isinstance(template, str) else None
    special.add_to_gguf(writer, quiet=True)


def added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding text adds BOS before it and EOS after it, measured on the tokenizer: what
    training's tokenisation did, and so what llama.cpp must do (`add_bos_token`/`add_eos_token`)."""
    with_specials = tokenizer("x")["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    front, back = [], []
    for start in range(len(with_specials) - len(without) + 1):
        if with_specials[start:start + len(without)] == without:
            front, back = with_specials[:start], with_specials[start + len(without):]
            break
    return (tokenizer.bos_token_id is not None and front[:1] == [tokenizer.bos_token_id],
            tokenizer.eos_token_id is not None and back[-1:] == [tokenizer.eos_token_id])
