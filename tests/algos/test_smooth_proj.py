"""QoQ projection smoothing of down_proj inputs (algorithms.md §3.1): formula, rules, exactness."""

from __future__ import annotations

import pytest
import torch

from helpers import block0_context, tiny_llama
from qtool.algos.base import get_pass
from qtool.algos.smooth_proj import SUFFIX, proj_groups, smooth_scale
from qtool.models.llama import LlamaAdapter
from qtool.recipe import Recipe, SmoothProjCfg

AD = LlamaAdapter()
IDS = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))


def _ctx(model, ids=IDS, batch=2):
    """The calibration context of block 0 (two micro-batches of block-0 inputs)."""
    return block0_context(model, ids, batch)


def test_scale_rules():
    a = torch.tensor([8.0, 0.0, 1.0])
    b = torch.tensor([2.0, 1.0, 4.0])
    torch.testing.assert_close(smooth_scale(a, b, 1 / 3, 0.5), torch.tensor([2 / 2**0.5, 1.0, 0.5]))
    assert smooth_scale(a, b, 0.0, 0.0).tolist() == [1.0, 1.0, 1.0]
    assert smooth_scale(a, torch.tensor([2.0, 0.0, 4.0]), 0.3, 0.7).tolist() == [1.0, 1.0, 1.0]  # inf → ones
    assert smooth_scale(torch.tensor([float("nan"), 1.0, 1.0]), b, 0.3, 0.7).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kv", [2, 4])
def test_only_the_down_proj_group(kv):
    m = tiny_llama(kv_heads=kv)
    groups = proj_groups(AD.block_plan(m.config), AD.attention(m.config))
    assert [(g.prev, g.linears) for g in groups] == [("mlp.up_proj", ("mlp.down_proj",))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_search_matches_formula_and_fold_is_exact(arch):
    m = tiny_llama(arch, hidden=64, inter=96, heads=4, kv_heads=2)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[:5] *= 20  # channels with large activations
    with torch.no_grad():
        ref = m(IDS).logits
    ctx = _ctx(m)
    mlp = m.model.layers[0].mlp
    # reference statistic, computed independently with a hook on down_proj
    xs = []
    h = mlp.down_proj.register_forward_pre_hook(lambda mod, args: xs.append(args[0].detach().reshape(-1, 96)))
    ctx.run_block()
    h.remove()
    a = torch.cat(xs).abs().amax(0)
    b = mlp.down_proj.weight.detach().abs().amax(0)
    exp = a.pow(0.3) / b.pow(0.7)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = get_pass("smooth_proj")
    arts = p.search(ctx, SmoothProjCfg(), Recipe())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), "search modified the block"
    key = f"model.layers.0.mlp.up_proj.{SUFFIX}"
    assert list(arts) == [key]
    torch.testing.assert_close(arts[key], exp, rtol=1e-6, atol=0)
    p.apply(ctx, arts, SmoothProjCfg(), Recipe())
    torch.testing.assert_close(mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"] / exp[:, None])
    torch.testing.assert_close(mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"] * exp[None, :])
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_alpha0_beta1_equalises_weight_columns():
    m = tiny_llama()
    ctx = _ctx(m)
    p = get_pass("smooth_proj")
    p.apply(ctx, p.search(ctx, SmoothProjCfg(alpha=0.0, beta=1.0), Recipe()), SmoothProjCfg(), Recipe())
    col_max = m.model.layers[0].mlp.down_proj.weight.abs().amax(0)
    torch.testing.assert_close(col_max, torch.ones_like(col_max))


def test_check_rejects_search_codes():
    from helpers import tiny_config

    r = Recipe()
    r.passes.smooth_proj = SmoothProjCfg(alpha=0.5, beta=-2)
    probs = get_pass("smooth_proj").check(r, AD, tiny_config())
    assert len(probs) == 1 and "beta" in probs[0]
    r.passes.smooth_proj = SmoothProjCfg()
    assert get_pass("smooth_proj").check(r, AD, tiny_config()) == []
