import json

import pytest
import torch

from helpers import tiny_config, tiny_llama
from qtool.errors import IncompatibleModelError
from qtool.models.base import adapter_for


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_block_plan_matches_real_modules(arch, kv_heads):
    model = tiny_llama(arch=arch, kv_heads=kv_heads)
    ad = adapter_for(model.config)
    plan = ad.block_plan(model.config)
    assert ad.num_blocks(model.config) == len(ad.blocks(model)) == 2
    for i, block in enumerate(ad.blocks(model)):
        assert model.get_submodule(ad.block_prefix(i)) is block
        for name, (n, k) in plan.linears.items():
            lin = block.get_submodule(name)
            assert isinstance(lin, torch.nn.Linear)
            assert tuple(lin.weight.shape) == (n, k), name
        for g in plan.groups:
            prev = block.get_submodule(g.prev)
            width = prev.weight.shape[0]
            for lin in g.linears:
                assert block.get_submodule(lin).in_features == width, (g.name, lin)
    names = [g.name for g in plan.groups]
    if kv_heads == 4:
        assert "v-o" in names and not plan.skipped
    else:
        assert "v-o" not in names
        assert any("v→o not applicable" in s for s in plan.skipped)


def test_attention_geometry_and_rope_pairing():
    cfg = tiny_config(heads=4, kv_heads=2, hidden=64)
    att = adapter_for(cfg).attention(cfg)
    assert (att.num_heads, att.num_kv_heads, att.head_dim, att.kv_groups) == (4, 2, 16, 2)
    assert att.rope == "half"


def test_qwen2_biases_present():
    model = tiny_llama(arch="qwen2")
    blk = model.model.layers[0]
    assert blk.self_attn.q_proj.bias is not None and blk.self_attn.o_proj.bias is None


def test_tied_embeddings_reported():
    assert adapter_for(tiny_config(tie=True)).tied_embeddings(tiny_config(tie=True))
    assert not adapter_for(tiny_config(tie=False)).tied_embeddings(tiny_config(tie=False))


def test_unknown_architecture_refused_before_weights(tmp_path):
    """An unsupported config.json is refused by plan() although no weights exist at all."""
    from qtool.pipeline import plan
    from qtool.recipe import load_recipe

    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                               "n_embd": 64, "n_layer": 2, "n_head": 4}))
    r = load_recipe([], [f"model.path={d}", f"output.dir={tmp_path / 'out'}", "layout=unpacked"])
    with pytest.raises(IncompatibleModelError) as e:
        plan(r)
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert e.value.exit_code == 4


def test_forced_adapter_and_unknown_forced():
    cfg = tiny_config()
    cfg.architectures = ["MyCustomLlama"]
    assert adapter_for(cfg, "llama").name == "llama"
    with pytest.raises(IncompatibleModelError):
        adapter_for(cfg)
    with pytest.raises(IncompatibleModelError, match="unknown adapter"):
        adapter_for(cfg, "bloom")


def test_bad_head_counts_rejected():
    cfg = tiny_config(heads=4, kv_heads=3)
    cfg.architectures = ["LlamaForCausalLM"]
    with pytest.raises(IncompatibleModelError, match="num_key_value_heads"):
        adapter_for(cfg)
