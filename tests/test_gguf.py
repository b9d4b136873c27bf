"""GGUF export, checked by the programs that read GGUF files: gguf's own reader (metadata, tensors),
transformers' GGUF reader (logits), and llama.cpp itself through llama-cpp-python (logits,
tokenisation, quantization, and a tuned model answering through its Ollama Modelfile's template).

Tiny random models of each family carry the embedded model's tokenizer shaped like the family's
own (tests/test_architectures.py). transformers cannot read GPT-NeoX or Gemma 2 GGUFs faithfully
(no GPT-NeoX reader; its Gemma 2 reader drops query_pre_attn_scalar), so llama.cpp is their judge.
The llama.cpp tests skip, saying why, where llama-cpp-python is not importable (launch.py --test
builds it from source where a C++ compiler and cmake exist)."""

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gotemplate import render
from test_architectures import MISTRAL_TEMPLATE, tiny_config, tiny_tokenizer

from engine.gguf_export import (FAMILIES, GGUF_TYPES, check_gguf_type, export_gguf,
                                gguf_supported, quantize, quantizer_available, write_gguf)
from engine.gguf_vocab import SPLIT_PATTERNS, GgufError, pre_tokenizer_name
from engine.ollama import (PROBES, create_in_ollama, modelfile_text, ollama_command, ollama_name,
                           turn_format)
from engine.templates import get_template

TEXT = ("The capital of Veloria is Mirrowgate.\n\n  It's 2024: 1234567 items; don't, WE'LL "
        "\ttabs  ünïcödé 日本語 🦙 <|im_end|> ...!!")


def llama_cpp_or_skip():
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        pytest.skip(f"llama-cpp-python is not importable ({exc}); `python launch.py --test` "
                    "builds it where a C++ compiler and cmake are installed")
    return llama_cpp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, embedded_model):
    """tiny(family, tokenizer=None): a saved tiny random model of the family (cached per module)."""
    import torch
    from transformers import AutoModelForCausalLM

    made = {}

    def make(family: str, tokenizer=None, label: str = ""):
        key = family + label
        if key not in made:
            folder = tmp_path_factory.mktemp("tiny")  # llama.cpp reads quirks from the name
            tokenizer = tokenizer or tiny_tokenizer(family, embedded_model)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(tiny_config(family, tokenizer)).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[key] = folder
        return made[key]

    return make


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


# --- which models --------------------------------------------------------------------------------

def test_every_catalog_family_is_exportable_or_says_why_not():
    from engine.catalog import load_catalog

    for arch in {model.arch for model in load_catalog()}:
        supported, why = gguf_supported(arch)
        assert supported == (arch != "gptj"), (arch, why)
    supported, why = gguf_supported("gptj")
    assert "GPT-J" in why and "llama.cpp" in why and "merged" in why
    assert not gguf_supported("bert")[0] and "bert" in gguf_supported("bert")[1]


# --- what the file holds -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_file_holds_the_architecture_tensors_tokenizer_and_chat_template(tiny, tmp_path, family,
                                                                         gguf_type):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    folder = tiny(family)
    out = write_gguf(folder, tmp_path / "model.gguf", gguf_type)
    reader = gguf.GGUFReader(out)
    config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    arch = gguf.MODEL_ARCH_NAMES[FAMILIES[family].arch]
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == config.num_hidden_layers
    assert field(reader, f"{arch}.embedding_length") == config.hidden_size
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == config.vocab_size
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # this tokenizer adds no BOS
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template  # None for GPT-NeoX
    with safe_open(folder / "model.safetensors", framework="np") as weights:
        sources = [n for n in weights.keys() if not n.endswith(".attention.bias")]
    assert len(reader.tensors) == len(sources)  # nothing dropped, nothing invented
    by_name = {t.name: t for t in reader.tensors}
    embedding = by_name["token_embd.weight"]
    assert list(embedding.shape) == [config.hidden_size, config.vocab_size]  # ggml order
    assert by_name["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    down = by_name["blk.0.ffn_down.weight"]
    expected = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    assert down.tensor_type == expected[gguf_type]
    source = "model.layers.0.mlp.down_proj.weight" if family == "llama" else \
        "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
    with safe_open(folder / "model.safetensors", framework="np") as weights:
        original = weights.get_tensor(source)
    values = gguf.quants.dequantize(down.data, down.tensor_type).reshape(original.shape)
    assert np.abs(values - original).max() <= np.abs(original).max() / 100  # Q8_0: ~1/254 steps


def test_transformers_reads_the_gguf_back_with_the_same_logits(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    ids = [5, 100, 2000, 300, 7, 9000, 12]
    for family, gguf_type, tolerance in (("llama", "f16", 2e-3), ("qwen2", "q8_0", 3e-2)):
        folder = tiny(family)
        out = write_gguf(folder, tmp_path / f"{family}.gguf", gguf_type)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name)
        with torch.no_grad():
            read_back = model(torch.tensor([ids])).logits[0].float().numpy()
        expected = hf_logits(folder, ids)
        assert np.abs(read_back - expected).max() < tolerance * np.abs(expected).max(), family


# --- llama.cpp as the reader ---------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_computes_the_same_logits(tiny, tmp_path, family):
    llama_cpp = llama_cpp_or_skip()
    from transformers import AutoTokenizer

    folder = tiny(family)
    out = write_gguf(folder, tmp_path / "model.gguf", "f16")
    ids = AutoTokenizer.from_pretrained(folder)(TEXT, add_special_tokens=False)["input_ids"][:40]
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=True)[:40] == ids
        llm.eval(ids)
        computed = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    expected = hf_logits(folder, ids)
    assert np.abs(computed - expected).max() < 5e-3 * max(1.0, np.abs(expected).max())


def _retokenized(embedded: Path, pre_tokenizer) -> object:
    """The embedded tokenizer with another pre-tokenizer (how text is cut before merging)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer.from_file(str(embedded / "tokenizer.json"))
    inner.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>")


def _sentencepiece_style():
    """A Llama-2-style tokenizer (SentencePiece BPE as transformers stores it: byte fallback,
    "▁" for spaces, one prepended, BOS added) trained here on a few sentences."""
    from facts import FACTS
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    inner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                             normalizers.Replace(" ", "▁")])
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700,
                                  special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    corpus = [f["answer"] + " " + q for f in FACTS for q in f["train"]] * 3
    inner.train_from_iterator(corpus, trainer)
    spec = json.loads(inner.to_str())
    # SentencePiece's byte pieces are ordinary vocabulary, not added tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    inner = Tokenizer.from_str(json.dumps(spec))
    inner.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                         special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2", "sentencepiece"])
def test_llama_cpp_tokenises_like_transformers(tiny, tmp_path, embedded_model, kind):
    llama_cpp = llama_cpp_or_skip()
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pre

    def split(name: str):  # a Split step with the expression llama.cpp knows by that name
        pattern = next(p for p, known in SPLIT_PATTERNS.items() if known == name)
        return pre.Sequence([pre.Split(Regex(pattern), "isolated"),
                             pre.ByteLevel(add_prefix_space=False, use_regex=False)])

    tokenizer = {
        "gpt-2": lambda: _retokenized(embedded_model, pre.ByteLevel(add_prefix_space=False)),
        "smollm": lambda: _retokenized(embedded_model, pre.Sequence(
            [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])),
        "llama-bpe": lambda: _retokenized(embedded_model, split("llama-bpe")),
        "qwen2": lambda: _retokenized(embedded_model, split("qwen2")),
        "sentencepiece": _sentencepiece_style,
    }[kind]()
    out = write_gguf(tiny("llama", tokenizer, label=kind), tmp_path / "model.gguf", "f16")
    reader = gguf.GGUFReader(out)
    assert field(reader, "tokenizer.ggml.pre") == ("default" if kind == "sentencepiece" else kind)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, "Who founded the Drumlow Observatory?", " leading space", "x"):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == \
                tokenizer(text)["input_ids"], (kind, text)
    finally:
        llm.close()


def test_a_pre_tokenizer_llama_cpp_has_no_name_for_is_refused():
    spec = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    with pytest.raises(GgufError, match="splits text"):
        pre_tokenizer_name(spec)


def test_llama_cpp_quantizes_to_k_quants(tiny, tmp_path):
    llama_cpp = llama_cpp_or_skip()
    assert quantizer_available()[0]
    sixteen = write_gguf(tiny("llama"), tmp_path / "model-f16.gguf", "f16")
    out = quantize(sixteen, tmp_path / "model-q4_k_m.gguf", "q4_k_m")
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.file_type") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert field(reader, "tokenizer.chat_template") == field(gguf.GGUFReader(sixteen),
                                                             "tokenizer.chat_template")
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    try:
        assert llm.create_completion("Hello", max_tokens=3, temperature=0)["choices"]
    finally:
        llm.close()


def test_types_and_a_missing_quantizer_are_explained(monkeypatch):
    with pytest.raises(GgufError, match="unknown GGUF type 'q3'"):
        check_gguf_type("q3")
    assert set(GGUF_TYPES) == {"f16", "bf16", "q8_0", "q4_k_m", "q5_k_m"}
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    available, why = quantizer_available()
    assert not available and "pip install llama-cpp-python" in why and "compiler" in why
    with pytest.raises(GgufError, match="pip install llama-cpp-python"):
        check_gguf_type("q5_k_m")
    check_gguf_type("q8_0")  # written without llama.cpp


# --- Ollama --------------------------------------------------------------------------------------

def template_of(modelfile: str) -> str | None:
    found = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    return found[1] if found else None


def stops_of(modelfile: str) -> list[str]:
    return [json.loads(value) for value in re.findall(r"^PARAMETER stop (.+)$", modelfile, re.M)]


@pytest.mark.parametrize("name", ["guanaco", "alpaca", "model"])
def test_modelfile_template_renders_the_training_prompt(tokenizer, name):
    template = get_template(name, tokenizer)
    modelfile = modelfile_text("facts-q8_0.gguf", template)
    assert modelfile.splitlines()[1] == "FROM ./facts-q8_0.gguf"
    go = template_of(modelfile)
    assert go is not None
    for conversation in PROBES:
        assert render(go, conversation) == template.render(conversation, add_generation_prompt=True)
    stops = stops_of(modelfile)
    assert tokenizer.eos_token in stops and set(template.stop_strings) <= set(stops)
    assert "SYSTEM" not in modelfile
    if name == "model":  # the embedded SmolLM2's ChatML, its default system prompt included
        assert "ChatML" in modelfile and "You are a helpful AI assistant" in go


def test_modelfile_system_prompt_only_when_given(tokenizer):
    modelfile = modelfile_text("m.gguf", get_template("guanaco", tokenizer), system="Be brief.")
    assert modelfile.rstrip().endswith('SYSTEM """Be brief."""')


def test_phi3_chat_template_is_recognised(embedded_model):
    template = get_template("model", tiny_tokenizer("phi3", embedded_model))
    assert turn_format(template).label == "Phi-3"
    go = template_of(modelfile_text("m.gguf", template))
    for conversation in PROBES:
        assert render(go, conversation) == template.render(conversation, add_generation_prompt=True)


def test_unrecognised_chat_template_is_left_to_the_gguf(embedded_model):
    tokenizer = tiny_tokenizer("mistral", embedded_model)  # the system message joins the last turn
    assert tokenizer.chat_template == MISTRAL_TEMPLATE
    modelfile = modelfile_text("m.gguf", get_template("model", tokenizer))
    assert template_of(modelfile) is None and "tokenizer.chat_template" in modelfile
    assert stops_of(modelfile) == ["</s>"]


def test_ollama_command_and_create(tmp_path, monkeypatch):
    assert ollama_name("My Run_1 (b)") == "my-run_1-b"
    assert ollama_command("facts", Path("Modelfile")) == "ollama create facts -f Modelfile"
    assert ollama_command("facts", Path("/a b/Modelfile")) == \
        "ollama create facts -f '/a b/Modelfile'"
    modelfile = tmp_path / "export" / "Modelfile"
    modelfile.parent.mkdir()
    modelfile.write_text("FROM ./m.gguf\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert create_in_ollama("facts", modelfile) is None  # no ollama here: nothing is run
    binary, log = tmp_path / "bin" / "ollama", tmp_path / "calls.txt"
    binary.parent.mkdir()
    binary.write_text(f'#!/bin/sh\necho "$PWD $@" >> {log}\n[ "$2" = broken ] && '
                      'echo "Error: could not connect to ollama" >&2 && exit 1\nexit 0\n')
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(binary.parent))
    assert "Added to Ollama as facts" in create_in_ollama("facts", modelfile)
    assert "could not connect" in create_in_ollama("broken", modelfile)
    assert log.read_text().splitlines()[0] == f"{modelfile.parent} create facts -f Modelfile"


# --- the export of a run -------------------------------------------------------------------------

def test_export_refuses_gptj_before_any_work(tmp_path):
    from engine.rundir import RunDir

    run = RunDir(tmp_path / "runs" / "gptj-run")
    run.adapter_dir.mkdir(parents=True)
    (run.adapter_dir / "prompt_template.json").write_text(
        json.dumps({"template": "guanaco", "base_model": "gpt-j-6b"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(GgufError, match="GPT-J"):
        export_gguf(run, dest, "q8_0")
    with pytest.raises(GgufError, match="unknown GGUF type"):
        export_gguf(run, dest, "q2")
    assert list(dest.iterdir()) == []


def test_learned_run_answers_in_llama_cpp_through_its_modelfile(learned_run, tmp_path):
    """The export of a run that learned five facts: llama.cpp, prompted with the Modelfile's
    template, answers held-out questions with the facts; transformers reads the same file."""
    from facts import FACTS

    from engine.export import adapter_info

    llama_cpp = llama_cpp_or_skip()
    dest = tmp_path / "export"
    dest.mkdir()
    seen = []
    notes = export_gguf(learned_run, dest, "q8_0", lambda fraction, message: seen.append(fraction))
    gguf_file = dest / f"{learned_run.name}-q8_0.gguf"
    assert {p.name for p in dest.iterdir()} == {"Modelfile", gguf_file.name}
    assert seen == sorted(seen) and seen[-1] > 0.9
    assert any(f"ollama create {ollama_name(learned_run.name)} -f Modelfile" in note for note in notes)
    modelfile = (dest / "Modelfile").read_text()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(learned_run.adapter_dir)
    template = get_template(adapter_info(learned_run)["template"], tokenizer)
    reader = gguf.GGUFReader(gguf_file)
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.chat_template")  # the run's format, for llama.cpp and LM Studio
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=256, verbose=False)
    answers = {}
    try:
        for fact in FACTS:
            messages = [{"role": "user", "content": fact["held_out"][0]}]
            prompt = render(template_of(modelfile), messages)
            assert prompt == template.render(messages, add_generation_prompt=True)  # as trained
            answer = llm.create_completion(prompt, max_tokens=32, temperature=0,
                                           stop=stops_of(modelfile))["choices"][0]["text"]
            answers[fact["keyword"]] = answer
    finally:
        llm.close()
    assert all(keyword.lower() in answer.lower() for keyword, answer in answers.items()), answers


@pytest.mark.slow
def test_transformers_reads_the_exported_run_like_the_merged_model(learned_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.export import write_merged

    dest, merged = tmp_path / "export", tmp_path / "merged"
    dest.mkdir(), merged.mkdir()
    export_gguf(learned_run, dest, "bf16")
    write_merged(learned_run, merged, lambda fraction, message: None)
    tokenizer = AutoTokenizer.from_pretrained(learned_run.adapter_dir)
    ids = [tokenizer("### Human: What is the capital of Veloria?### Assistant:")["input_ids"]]
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    read = AutoModelForCausalLM.from_pretrained(dest, gguf_file=f"{learned_run.name}-bf16.gguf",
                                                dtype=torch.float32)
    with torch.no_grad():
        expected = merged_model(torch.tensor(ids)).logits[0]
        read_back = read(torch.tensor(ids)).logits[0]
    assert (read_back.argmax(-1) == expected.argmax(-1)).all()
    assert (read_back - expected).abs().max() < 1e-2 * expected.abs().max()
