"""The model catalog and the GPU table: every preset parses and validates, shapes add up to the
published parameter counts, and a local folder's config.json gives the same shape as the catalog."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from engine import catalog
from engine.catalog import CatalogError, find, load_catalog, shape_from_config
from engine.planner import model_shape
from engine.speed import find_gpu, load_gpus

ROOT = Path(__file__).resolve().parent.parent
MODELS = load_catalog()
IDS_USED_ELSEWHERE = ["embedded", "smollm2-1.7b", "gpt-j-6b", "mistral-7b", "qwen2.5-7b",
                      "llama-3.1-8b", "qwen2.5-14b", "gpt-neox-20b"]


def test_catalog_has_the_issues_families_with_unique_ids():
    assert len(MODELS) >= 30
    ids = [m.id for m in MODELS]
    assert not [i for i, n in Counter(ids).items() if n > 1]
    assert set(IDS_USED_ELSEWHERE) <= set(ids)
    for family in ("pythia-", "redpajama-", "llama-", "llama-2-", "llama-3.", "qwen2.5-", "gemma-2-",
                   "phi-3.5", "smollm2-", "tinyllama"):
        assert any(i.startswith(family) for i in ids), family


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.id)
def test_every_entry_is_a_valid_shape(model):
    assert model.problems() == []
    assert model.hub_id.count("/") == 1
    assert model.heads % model.kv_heads == 0
    assert model.head_dim or model.hidden % model.heads == 0
    assert model.max_context >= 2048 and model.licence
    # The shapes must add up to the published parameter count: a mistyped layer count, width or
    # vocabulary moves it by far more than the 2.5% that norms and biases account for.
    assert model.total_params / 1e9 == pytest.approx(model.params_b, rel=0.025)
    assert find(model.id) == model and find(model.hub_id.upper()) == model


def test_a_broken_entry_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "models.yaml"
    bad.write_text("- {id: broken, name: B, hub_id: a/b, arch: llama, layers: 2, hidden: 100, "
                   "intermediate: 10, heads: 3, kv_heads: 3, vocab: 10, tied: true, max_context: 64}\n")
    monkeypatch.setattr(catalog, "_catalog_path", lambda: bad)
    with pytest.raises(CatalogError, match=r"entry 1 \(broken\).*heads \(3\) must divide hidden"):
        load_catalog()
    bad.write_text("- {id: zipped, name: Z, hub_id: a/b, arch: llama, layers: 2, hidden: 96, "
                   "intermediate: 10, heads: 3, kv_heads: 3, vocab: 10, tied: true, "
                   "max_context: 64, weights_format: zip}\n")
    with pytest.raises(CatalogError, match=r"entry 1 \(zipped\).*weights_format 'zip' is unknown"):
        load_catalog()
    bad.write_text("- {id: typo, name: T, hub_id: a/b, layer: 2}\n")
    with pytest.raises(CatalogError, match="unknown field.*layer"):
        load_catalog()


def test_embedded_entry_matches_the_embedded_models_own_config(embedded_model):
    from_folder = shape_from_config(embedded_model)
    entry = find("embedded")
    for field in ("arch", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "tied",
                  "max_context", "head_size"):
        assert getattr(from_folder, field) == getattr(entry, field), field


def test_a_local_folder_is_planned_from_its_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mistral", "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
        "tie_word_embeddings": False, "max_position_embeddings": 4096}))
    shape = model_shape(str(tmp_path))
    assert (shape.layers, shape.kv_heads, shape.head_size, shape.gated_mlp) == (4, 2, 32, True)
    assert shape.embedding_params == 2 * 1000 * 256
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CatalogError, match="config.json.*layers"):
        model_shape(str(tmp_path))
    assert model_shape("someone/not-in-the-catalog") is None


def test_benchmark_configs_have_the_catalogs_shapes(tmp_path):
    # bench/gpu_check.py builds random models from these configs: they must be the real shapes.
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for model_id in ("gpt-j-6b", "gpt-neox-20b", "gemma-2-9b", "llama-3.2-3b"):
        folder = tmp_path / model_id
        bench.hf_config(find(model_id)).save_pretrained(folder)
        shape, entry = shape_from_config(folder), find(model_id)
        assert (shape.quantized_params, shape.embedding_params) == (entry.quantized_params,
                                                                    entry.embedding_params), model_id


def test_gpu_table():
    gpus = load_gpus()
    assert len(gpus) >= 20
    assert all(g.vram_gb >= 6 and g.bandwidth_gbs > 0 and g.tflops_16bit > 0 for g in gpus)
    assert all(not g.bf16 for g in gpus if "RTX 20" in g.name)  # Turing has no bf16
    assert all(g.bf16 for g in gpus if "RTX 20" not in g.name)
    assert find_gpu("NVIDIA GeForce RTX 3060", 11.8).vram_gb == 12
    assert find_gpu("NVIDIA GeForce RTX 3060", 8).vram_gb == 8
    assert find_gpu("3060 Ti").name == "RTX 3060 Ti"
    assert find_gpu("NVIDIA GeForce RTX 4070 Ti SUPER").name == "RTX 4070 Ti SUPER"
    assert find_gpu("rtx 5090").vram_gb == 32
    assert find_gpu("Tesla T4") is None


def test_recorded_attention_is_what_transformers_runs():
    # transformers runs SDPA by default wherever a model class supports it, else eager: the
    # planner's seq^2 term must follow it for every architecture it knows.
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    table = catalog.attention_kernels()
    assert {m.arch for m in MODELS} <= set(table)
    for arch, recorded in table.items():
        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch])
        assert recorded == ("sdpa" if model_class._supports_sdpa else "eager"), arch
    assert find("gpt-j-6b").attention == "eager" and find("gpt-neox-20b").attention == "sdpa"


def test_a_local_folders_attention_comes_from_its_model_type(tmp_path):
    config = {"num_hidden_layers": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100,
              "n_positions": 2048}
    for model_type, attention in (("gptj", "eager"), ("gpt_neox", "sdpa"), ("someone-new", "sdpa")):
        (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        assert shape_from_config(tmp_path).attention == attention, model_type


def test_gpt_j_downloads_its_16_bit_revision():
    # main holds fp32 pickle weights (24.2 GB), float16 the same in 16 bits (12.1 GB), also as
    # pickle: converted to safetensors on download
    gptj = find("EleutherAI/gpt-j-6b")
    assert (gptj.revision, gptj.weights_bits, gptj.weights_format) == ("float16", 16, "pickle")
    assert gptj.download_gb == pytest.approx(12.1, rel=0.01)
    neox = find("gpt-neox-20b")  # its main branch has safetensors
    assert (neox.revision, neox.weights_format) == (None, "safetensors")
    assert find("llama-3.1-8b").download_gb == pytest.approx(16.06, rel=0.01)  # 16-bit weights
