"""Model sources, config reading without weights, FP model loading (HF dirs and GGUF files)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import save_tiny, tiny_llama, tiny_tokenizer, write_tiny_gguf
from qtool.errors import AssetError, CheckpointError, ConfigError, IncompatibleModelError
from qtool.io.hf import (
    ModelSource,
    SkippedArray,
    gguf_config_dict,
    load_config,
    load_model,
    load_tokenizer,
    read_gguf_metadata,
    resolve_dtype,
    resolve_source,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("QTOOL_HOME", str(h))
    return h


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- resolve_source -------------------------------------------------------------------------
def test_resolve_kinds(tmp_path, home):
    d = save_tiny(tiny_llama(), tmp_path / "m")
    assert resolve_source(str(d)) == ModelSource("hf-dir", str(d.resolve()))
    g = tmp_path / "w.gguf"
    g.write_bytes(b"GGUF")
    src = resolve_source(str(g))
    assert (src.kind, src.path, src.gguf_file) == ("gguf", str(tmp_path.resolve()), "w.gguf")
    assert src.file == g.resolve()
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ModelSource("hub", "HuggingFaceTB/SmolLM2-135M")


def test_resolve_errors(tmp_path, home):
    with pytest.raises(CheckpointError, match="model path not found"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="model path not found"):
        resolve_source("a/b/c")
    with pytest.raises(CheckpointError, match="model path not found"):
        resolve_source("missing.gguf")
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "m.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json") as e:
        resolve_source(str(tmp_path / "nocfg"))
    assert "m.gguf" in str(e.value)
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        resolve_source(str(tmp_path / "f.bin"))
    with pytest.raises(ConfigError):
        resolve_source("")


def test_builtin_source(home):
    with pytest.raises(AssetError, match="qtool assets fetch"):
        resolve_source("smollm2-135m")
    d = home / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (d / f).write_text("{}")
    assert resolve_source("smollm2-135m") == ModelSource("builtin", str(d))


# --- HF directories -------------------------------------------------------------------------
def test_load_config_reads_no_weights(tmp_path, home):
    d = save_tiny(tiny_llama(arch="qwen2", layers=3), tmp_path / "m")
    os.remove(d / "model.safetensors")  # the config must not need the weights
    cfg = load_config(str(d))
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 3 and cfg.num_key_value_heads == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_load_model_roundtrip(tmp_path, home, arch):
    ref = tiny_llama(arch=arch, seed=5)
    d = save_tiny(ref, tmp_path / arch)
    model, tok = load_model(str(d))
    assert type(model) is type(ref)
    assert not model.training and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    assert tok("abc")["input_ids"] == tiny_tokenizer()("abc")["input_ids"]
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


def test_load_model_dtype(tmp_path, home):
    d = save_tiny(tiny_llama(), tmp_path / "m")
    model, _ = load_model(ModelSource("hf-dir", str(d)), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(ConfigError):
        resolve_dtype("int8", "cpu")


def test_refuses_pickles_and_quantized_checkpoints(tmp_path, home):
    d = save_tiny(tiny_llama(), tmp_path / "m")
    os.replace(d / "model.safetensors", d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(str(d))
    d2 = save_tiny(tiny_llama(), tmp_path / "q")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleModelError, match="already-quantized"):
        load_model(str(d2))


def test_load_tokenizer(tmp_path, home):
    d = save_tiny(tiny_llama(), tmp_path / "m")
    tok = load_tokenizer(str(d))
    assert tok.decode(tok("Hello\n\nworld")["input_ids"]) == "Hello\n\nworld"


# --- GGUF -----------------------------------------------------------------------------------
def test_gguf_metadata_and_config_match_transformers(tmp_path, home):
    from transformers import AutoConfig

    ref = tiny_llama(vocab=128, tie=False, seed=2)
    g = write_tiny_gguf(ref, tmp_path / "g" / "tiny.gguf", with_vocab_size=False)
    meta, names = read_gguf_metadata(g)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.tokens"] == SkippedArray(128, 8)  # long arrays are skipped
    assert meta["tokenizer.ggml.merges"] == ["t h", "h e"]
    assert "output.weight" in names and "blk.1.ffn_down.weight" in names and len(names) == 3 + 2 * 9
    ours = gguf_config_dict(meta, names)
    assert ours["vocab_size"] == 128 and ours["tie_word_embeddings"] is False
    cfg = load_config(str(g))
    theirs = AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name)
    assert cfg.to_dict() == theirs.to_dict()


def test_gguf_load_converts_once(tmp_path, home):
    ref = tiny_llama(vocab=128, seed=4)
    g = write_tiny_gguf(ref, tmp_path / "tiny.gguf")
    model, tok = load_model(str(g))
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    assert model.config.use_cache is False and not model.training
    conv = list((home / "converted").iterdir())
    assert len(conv) == 1 and (conv[0] / "model.safetensors").is_file()
    import hashlib

    assert conv[0].name == hashlib.sha256(g.read_bytes()).hexdigest()[:16]
    assert tok.tokenize("the") == ["th", "e"]  # the GGUF's merges ("t h" ranks before "h e")
    # second use loads the cached directory: the GGUF file is no longer needed for the weights
    mtime = (conv[0] / "model.safetensors").stat().st_mtime_ns
    model2, _ = load_model(str(g))
    assert (conv[0] / "model.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(_logits(model2, ids), _logits(model, ids))
    assert load_config(str(g)).num_hidden_layers == 2


def test_not_a_gguf(tmp_path, home):
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(IncompatibleModelError, match="not a GGUF"):
        load_config(str(g))


# --- real model (slow) ----------------------------------------------------------------------
def _real_assets():
    from qtool.assets import SMOLLM_GGUF_NAME, qtool_home

    h = qtool_home()
    if not (h / "models" / "smollm2-135m" / "model.safetensors").is_file():
        pytest.skip("SmolLM2 not fetched (run `qtool assets fetch`)")
    return h / "models" / SMOLLM_GGUF_NAME


@pytest.mark.slow
def test_smollm2_builtin_and_gguf_config():
    from transformers import AutoConfig

    gguf_file = _real_assets()
    src = resolve_source("smollm2-135m")
    assert src.kind == "builtin"
    cfg = load_config(src)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 30, 9, 3, 1536, 49152, True)
    # the cheap GGUF metadata path gives the config transformers' own (slow) GGUF reader builds
    fast = load_config(str(gguf_file))
    slow = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert fast.to_dict() == slow.to_dict()
    model, tok = load_model(src)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert tok.tokenize("Hello world, this is a test.") == ["Hello", "Ġworld", ",", "Ġthis", "Ġis", "Ġa", "Ġtest", "."]
