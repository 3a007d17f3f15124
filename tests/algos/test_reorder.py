"""Channel reordering (algorithms.md §3.5): argsort of input absmax, per head under GQA, exact in FP."""

from __future__ import annotations

import pytest
import torch

from helpers import block0_context, tiny_llama
from qtool.algos.base import get_pass
from qtool.algos.reorder import SUFFIX, _input_absmax, head_index, producers, v_index_from_o
from qtool.errors import CalibrationError
from qtool.models.llama import LlamaAdapter
from qtool.recipe import Recipe, ReorderCfg

AD = LlamaAdapter()
IDS = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))


def _ctx(model, ids=IDS, batch=2):
    """The calibration context of block 0 (two micro-batches of block-0 inputs)."""
    return block0_context(model, ids, batch)


def test_head_index_gqa():
    # 4 query heads, 2 KV heads, head_dim 3; metric max over heads {0,1} and {2,3}
    m = torch.tensor([3.0, 1, 2, 0, 5, 0, 1, 2, 3, 9, 0, 0], dtype=torch.float32)
    idx = head_index(m, 4, 2)
    # group 0: max(h0=[3,1,2], h1=[0,5,0]) = [3,5,2] → [2,0,1]; group 1: max([1,2,3],[9,0,0]) = [9,2,3] → [1,2,0]
    assert idx.tolist() == [2, 0, 1, 5, 3, 4, 7, 8, 6, 10, 11, 9]
    assert v_index_from_o(idx, 4, 2).tolist() == [2, 0, 1, 4, 5, 3]
    assert idx.dtype == torch.int64


def test_v_index_rejects_inconsistent_o_index():
    bad = torch.tensor([2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # heads 0 and 1 (same KV head) differ
    with pytest.raises(CalibrationError, match="share a KV head"):
        v_index_from_o(bad, 4, 2)
    cross = torch.tensor([3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11])  # crosses a head boundary
    with pytest.raises(CalibrationError, match="across heads"):
        v_index_from_o(cross, 4, 2)


def test_producers_include_gate():
    bp = AD.block_plan(tiny_llama().config)
    g = next(g for g in bp.groups if g.prev == "mlp.up_proj")
    assert sorted(producers(bp, g)) == ["mlp.gate_proj", "mlp.up_proj"]


@pytest.mark.parametrize("arch,heads,kv", [("llama", 4, 2), ("qwen2", 4, 2), ("mistral", 4, 4), ("llama", 4, 1)])
def test_reorder_is_exact_and_sorts_metrics(arch, heads, kv):
    m = tiny_llama(arch, hidden=64, inter=96, heads=heads, kv_heads=kv)
    with torch.no_grad():
        ref = m(IDS).logits
    ctx = _ctx(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = get_pass("reorder")
    arts = p.search(ctx, ReorderCfg(), Recipe())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), "search modified the block"
    assert set(arts) == {f"model.layers.0.mlp.down_proj.{SUFFIX}", f"model.layers.0.self_attn.o_proj.{SUFFIX}"}
    assert all(v.dtype == torch.int64 for v in arts.values())
    p.apply(ctx, arts, ReorderCfg(), Recipe())
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(m.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])
    # after reordering: down_proj input absmax ascending; o_proj per-KV-group max ascending in each head
    stats = _input_absmax(ctx, ["mlp.down_proj", "self_attn.o_proj"])
    down = stats["mlp.down_proj"]
    assert bool((down[1:] >= down[:-1]).all())
    o = stats["self_attn.o_proj"].view(kv, heads // kv, 16).amax(1)
    assert bool((o[:, 1:] >= o[:, :-1]).all())


def test_replay_from_artifacts_equals_search_and_apply():
    m1, m2 = tiny_llama("qwen2"), tiny_llama("qwen2")
    p = get_pass("reorder")
    c1 = _ctx(m1)
    arts = p.search(c1, ReorderCfg(), Recipe())
    p.apply(c1, arts, ReorderCfg(), Recipe())
    p.apply(_ctx(m2), {k: v.clone() for k, v in arts.items()}, ReorderCfg(), Recipe())
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_artifact_is_refused():
    m = tiny_llama()
    ctx = _ctx(m)
    with pytest.raises(CalibrationError, match="not a permutation"):
        get_pass("reorder").apply(ctx, {f"model.layers.0.mlp.down_proj.{SUFFIX}": torch.zeros(128, dtype=torch.int64)},
                                  ReorderCfg(), Recipe())


def test_check_metric():
    from helpers import tiny_config

    r = Recipe()
    r.passes.reorder = ReorderCfg(metric="weights_absmax")
    assert len(get_pass("reorder").check(r, AD, tiny_config())) == 1
    r.passes.reorder = ReorderCfg()
    assert get_pass("reorder").check(r, AD, tiny_config()) == []
