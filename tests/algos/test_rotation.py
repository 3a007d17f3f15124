"""Hadamard construction and the offline residual-stream rotation (algorithms.md §3.3)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_llama
from qtool.algos.rotation import (
    apply_rotation,
    check_rotation,
    hadamard,
    hadamard_factors,
    hadamard_transform,
    untie_embeddings,
)
from qtool.errors import IncompatibleModelError
from qtool.models.llama import LlamaAdapter
from qtool.recipe import RotationCfg

AD = LlamaAdapter()


# ------------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 48, 60, 64, 96, 108, 576, 896, 960])
def test_hadamard_is_normalised_hadamard(n):
    h = hadamard(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # every entry is ±1/sqrt(n): a true Hadamard matrix, not just some orthogonal matrix
    torch.testing.assert_close(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)
    raw = hadamard(n, normalized=False)
    assert set(raw.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(raw @ raw.T, n * torch.eye(n, dtype=torch.float64))


def test_576_factorisation():
    # SmolLM2-135M's hidden size: 576 = 16 · 36 (Paley II with q = 17), no order-9 Hadamard needed
    assert hadamard_factors(576) == (16, 36)
    assert hadamard_factors(1536) == (128, 12)
    assert hadamard_factors(4096) == (4096,)


@pytest.mark.parametrize("n", [3, 5, 6, 10, 18, 52])
def test_impossible_orders_raise_clearly(n):
    with pytest.raises(ValueError, match=f"order {n} "):
        hadamard(n)


@pytest.mark.parametrize("n", [12, 48, 64, 96, 576])
def test_fast_transform_matches_dense(n):
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x), x @ hadamard(n), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- the model transform
def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("hidden,heads,kv,tie", [(64, 4, 2, True), (96, 4, 2, False), (48, 4, 2, True), (64, 4, 4, False)])
def test_rotation_keeps_logits(arch, hidden, heads, kv, tie):
    m = tiny_llama(arch, hidden=hidden, heads=heads, kv_heads=kv, tie=tie)
    # non-trivial norm weights, so the folding is exercised
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    ref = _logits(m, IDS)
    info = apply_rotation(m, AD, m.config, RotationCfg())
    got = _logits(m, IDS)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
    assert info["untied"] == tie
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert m.config.tie_word_embeddings is False
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name


def test_residual_stream_is_rotated():
    m = tiny_llama(hidden=96)
    e0 = m.model.embed_tokens.weight.detach().clone().double()
    apply_rotation(m, AD, m.config, RotationCfg(per_head_vo=False))
    torch.testing.assert_close(m.model.embed_tokens.weight.double(), e0 @ hadamard(96), rtol=0, atol=1e-6)


def test_compute_device_option_gives_the_same_weights():
    m1, m2 = tiny_llama("qwen2"), tiny_llama("qwen2")
    apply_rotation(m1, AD, m1.config, RotationCfg())
    apply_rotation(m2, AD, m2.config, RotationCfg(), device=torch.device("cpu"))
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_per_head_vo_is_exact_and_per_head():
    m1 = tiny_llama("qwen2", hidden=64, heads=4, kv_heads=2)
    m2 = tiny_llama("qwen2", hidden=64, heads=4, kv_heads=2)
    ref = _logits(m1, IDS)
    apply_rotation(m1, AD, m1.config, RotationCfg(per_head_vo=False))
    apply_rotation(m2, AD, m2.config, RotationCfg(per_head_vo=True))
    torch.testing.assert_close(_logits(m1, IDS), ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(_logits(m2, IDS), ref, rtol=1e-5, atol=2e-5)
    d = 16
    hh = hadamard(d)
    a1, a2 = m1.model.layers[0].self_attn, m2.model.layers[0].self_attn
    # v: every KV head's rows rotated by Hhᵀ (bias too); o: every query head's columns by Hh
    for h in range(2):
        rows = slice(h * d, (h + 1) * d)
        torch.testing.assert_close(a2.v_proj.weight[rows].double(), hh.T @ a1.v_proj.weight[rows].double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(a2.v_proj.bias[rows].double(), a1.v_proj.bias[rows].double() @ hh, rtol=0, atol=1e-6)
    for h in range(4):
        cols = slice(h * d, (h + 1) * d)
        torch.testing.assert_close(a2.o_proj.weight[:, cols].double(), a1.o_proj.weight[:, cols].double() @ hh, rtol=0, atol=1e-6)
    # q/k untouched by the per-head transform
    assert torch.equal(a1.q_proj.weight, a2.q_proj.weight)


def test_untie_then_save_and_load_keeps_both_tensors(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny_llama(tie=True)
    apply_rotation(m, AD, m.config, RotationCfg())
    ref = _logits(m, IDS)
    m.save_pretrained(str(tmp_path), safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= keys
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert back.config.tie_word_embeddings is False
    assert back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(back, IDS), ref, rtol=0, atol=0)


def test_untie_updates_both_configs():
    m = tiny_llama(tie=True)
    import copy

    cfg = copy.deepcopy(m.config)
    assert untie_embeddings(m, AD, cfg)
    assert cfg.tie_word_embeddings is False and m.config.tie_word_embeddings is False
    assert not AD.tied_embeddings(cfg)
    # untied models are left alone
    m2 = tiny_llama(tie=False)
    w = m2.lm_head.weight
    assert not untie_embeddings(m2, AD, m2.config)
    assert m2.lm_head.weight is w


def test_check_rotation_reports_impossible_sizes():
    from helpers import tiny_config

    assert check_rotation(AD, tiny_config(hidden=64), RotationCfg()) == []
    # head_dim 10: no Hadamard of order 10 (hidden 40 = 2 · 20 itself is fine)
    probs = check_rotation(AD, tiny_config(hidden=40, heads=4, kv_heads=2), RotationCfg())
    assert len(probs) == 1 and "head_dim" in probs[0]
    assert check_rotation(AD, tiny_config(hidden=40, heads=4, kv_heads=2), RotationCfg(per_head_vo=False)) == []
    m = tiny_llama(hidden=40, heads=4, kv_heads=2)
    with pytest.raises(IncompatibleModelError, match="head_dim"):
        apply_rotation(m, AD, m.config, RotationCfg())


def test_qoq_fp_transforms_compose_exactly():
    """rotate → reorder → smooth_attention → smooth_proj over every block keeps the FP logits."""
    from qtool.algos.base import get_pass
    from qtool.calib.runner import walk_blocks
    from qtool.recipe import ReorderCfg, SmoothAttentionCfg, SmoothProjCfg

    m = tiny_llama("qwen2", hidden=96, heads=4, kv_heads=2, tie=True)
    ref = _logits(m, IDS)
    apply_rotation(m, AD, m.config, RotationCfg())
    passes = [("reorder", ReorderCfg()), ("smooth_attention", SmoothAttentionCfg()), ("smooth_proj", SmoothProjCfg())]
    seen = []

    def process(ctx):
        for name, pcfg in passes:
            arts = get_pass(name).search(ctx, pcfg, None)
            get_pass(name).apply(ctx, arts, pcfg, None)
            seen.extend(arts)

    walk_blocks(m, AD, m.config, IDS, process, device=torch.device("cpu"), batch_size=2, offload=True,
                propagate="quantized")
    assert len(seen) == 2 * 4
    torch.testing.assert_close(_logits(m, IDS), ref, rtol=1e-4, atol=1e-4)


def test_pipeline_qoq_with_rotation_and_gptq(tmp_path):
    """End to end: the full QoQ recipe (rotation, reorder, SmoothAttention, smooth_proj, progressive
    + GPTQ, w4a8kv4 layout) on a tied Qwen2 saves an untied checkpoint that reloads identically."""
    import json

    from helpers import SAMPLE_TEXT, save_tiny
    from qtool import api, pipeline
    from qtool.recipe import load_recipe

    d = save_tiny(tiny_llama("qwen2", tie=True), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 20)
    r = load_recipe([], [
        f"model.path={d}", f"output.dir={tmp_path / 'out'}", f"calib.data={tmp_path / 'text.txt'}",
        "calib.n_samples=2", "calib.seqlen=16", "layout=w4a8kv4", "quant.group_size=64",
        "quant.scheme=progressive", "quant.a_bits=8", "quant.kv_bits=4", "quant.gptq={}",
        "passes.rotation={}", "passes.reorder={}", "passes.smooth_attention={}", "passes.smooth_proj={}",
    ])
    res = pipeline.run_quantize(pipeline.plan(r))
    cfg = json.loads((res.output / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert len(res.artifacts) == 2 * 4
    model, _, _ = api.load_target(str(res.output), "reference")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, res.model(IDS).logits, rtol=1e-5, atol=1e-5)
