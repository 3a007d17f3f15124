"""SmoothAttention (algorithms.md §3.4): post-RoPE statistics, RoPE-pair and GQA sharing, exactness."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import block0_context, tiny_llama
from qtool.algos.base import get_pass
from qtool.algos.smooth_attention import (
    SUFFIX,
    apply_rope,
    attention_scale,
    collect_qk_absmax,
    fold_attention_scale,
    share_rope_pairs,
    smooth_scale,
)
from qtool.models.llama import LlamaAdapter
from qtool.recipe import SmoothAttentionCfg

AD = LlamaAdapter()
IDS = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))


def _ctx(model, ids=IDS, batch=2):
    """The calibration context of block 0 (two micro-batches of block-0 inputs)."""
    return block0_context(model, ids, batch)


class _Recorder:
    """Monkeypatched eager attention: records the post-RoPE query/key states the model really uses."""

    def __init__(self, monkeypatch, model):
        mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
        self.orig = mod.eager_attention_forward
        self.calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        monkeypatch.setattr(mod, "eager_attention_forward", self)
        model.set_attn_implementation("eager")

    def __call__(self, module, query, key, value, attention_mask, **kw):
        self.calls.append((query.detach().clone(), key.detach().clone(), module.layer_idx))
        return self.orig(module, query, key, value, attention_mask, **kw)

    def scores(self, layer=0):
        out = []
        for q, k, li in self.calls:
            if li == layer:
                rep = q.shape[1] // k.shape[1]
                out.append(q @ k.repeat_interleave(rep, dim=1).transpose(-1, -2))
        return out


def _spiky(model, seed=0):
    """Give k_proj a few outlier channels (so λ is far from 1 and the test is meaningful)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj.weight
            k[torch.randint(0, k.shape[0], (3,), generator=g)] *= 8


# ------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_statistics_are_post_rope_absmax_of_the_real_attention(monkeypatch, arch):
    m = tiny_llama(arch, hidden=64, heads=4, kv_heads=2)
    rec = _Recorder(monkeypatch, m)
    ctx = _ctx(m)
    qmax, kmax = collect_qk_absmax(ctx)
    qs = [q for q, _, li in rec.calls if li == 0]
    ks = [k for _, k, li in rec.calls if li == 0]
    assert len(qs) == 2  # two micro-batches
    exp_q = torch.stack([q.abs().amax(dim=(0, 2)) for q in qs]).amax(0).reshape(-1)
    exp_k = torch.stack([k.abs().amax(dim=(0, 2)) for k in ks]).amax(0).reshape(-1)
    torch.testing.assert_close(qmax, exp_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kmax, exp_k, rtol=1e-6, atol=1e-6)


def test_share_rope_pairs():
    x = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0, 0.0, 7.0, 1.0]])
    assert share_rope_pairs(x, "half").tolist() == [[4.0, 5.0, 7.0, 2.0, 4.0, 5.0, 7.0, 2.0]]
    assert share_rope_pairs(x, "interleaved").tolist() == [[5.0, 5.0, 3.0, 3.0, 4.0, 4.0, 7.0, 7.0]]
    assert torch.equal(share_rope_pairs(x, None), x)


def test_smooth_scale_rules():
    k = torch.tensor([4.0, 0.0, 9.0])
    q = torch.tensor([1.0, 2.0, 4.0])
    assert smooth_scale(k, q, 0.5, 0.0).tolist() == [2.0, 1.0, 3.0]  # 0 → 1
    assert smooth_scale(k, q, 0.5, 1.0).tolist() == [2.0, 1.0, 0.75]
    assert smooth_scale(k, torch.tensor([1.0, 0.0, 1.0]), 0.5, 1.0).tolist() == [1.0, 1.0, 1.0]  # inf → all ones
    assert smooth_scale(torch.tensor([float("nan"), 1.0]), q[:2], 0.5, 0.0).tolist() == [1.0, 1.0]


def test_gqa_reduction_is_max_over_the_group():
    kmax = torch.rand(2 * 4) + 0.5
    qmax = torch.rand(4 * 4) + 0.5  # 4 query heads, 2 KV heads, head_dim 4
    lam = attention_scale(kmax, qmax, 2, None, 0.0, 1.0)
    exp = 1 / qmax.view(2, 2, 4).amax(1).reshape(-1)
    torch.testing.assert_close(lam, exp)


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch,heads,kv", [("llama", 4, 2), ("qwen2", 4, 2), ("mistral", 4, 4), ("llama", 4, 1)])
def test_pass_keeps_scores_and_logits(monkeypatch, arch, heads, kv):
    m = tiny_llama(arch, hidden=64, heads=heads, kv_heads=kv)
    _spiky(m)
    rec = _Recorder(monkeypatch, m)
    with torch.no_grad():
        ref_logits = m(IDS).logits
    ref_scores = rec.scores(0)
    p = get_pass("smooth_attention")
    ctx = _ctx(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    arts = p.search(ctx, SmoothAttentionCfg(), None)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), "search modified the block"
    key = f"model.layers.0.self_attn.{SUFFIX}"
    assert list(arts) == [key] and arts[key].shape == (kv * 16,) and arts[key].dtype == torch.float32
    assert (arts[key] != 1).any()
    p.apply(ctx, arts, SmoothAttentionCfg(), None)
    rec.calls.clear()
    with torch.no_grad():
        got_logits = m(IDS).logits
    for a, b in zip(rec.scores(0), ref_scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
    # keys' outliers shrank: with λ = sqrt(kmax) (pair max), max |K/λ| ≤ sqrt(max |K|) = max λ
    k_after = max(k.abs().max() for _, k, li in rec.calls if li == 0)
    assert k_after <= arts[key].max() * (1 + 1e-5)
    assert k_after < arts[key].max() ** 2 * (1 - 1e-3)


def test_qwen2_biases_are_scaled():
    m = tiny_llama("qwen2")
    a = AD.attention(m.config)
    att = m.model.layers[0].self_attn
    qb, kb = att.q_proj.bias.clone(), att.k_proj.bias.clone()
    lam = torch.rand(a.num_kv_heads * a.head_dim) + 0.5
    fold_attention_scale(m.model.layers[0], a, lam)
    lam_q = lam.view(a.num_kv_heads, 1, -1).expand(-1, a.kv_groups, -1).reshape(-1)
    torch.testing.assert_close(att.q_proj.bias, qb * lam_q)
    torch.testing.assert_close(att.k_proj.bias, kb / lam)


def _interleaved_cos_sin(b, L, d, base=100.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(L).float()[:, None] * inv[None, :]  # [L, d/2]
    ang = ang.repeat_interleave(2, dim=-1)  # (θ0, θ0, θ1, θ1, …): interleaved layout
    return ang.cos().expand(b, L, d), ang.sin().expand(b, L, d)


def _half_cos_sin(b, L, d, base=100.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(L).float()[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=-1)  # HF layout
    return ang.cos().expand(b, L, d), ang.sin().expand(b, L, d)


@pytest.mark.parametrize("rope", ["half", "interleaved"])
def test_scores_unchanged_for_both_rope_conventions(rope):
    """Hand-written RoPE (both conventions) with GQA: post-RoPE scores are invariant under λ."""
    torch.manual_seed(0)
    b, L, d, heads, kv = 2, 12, 8, 4, 2
    q = torch.randn(b, heads, L, d, dtype=torch.float64)
    k = torch.randn(b, kv, L, d, dtype=torch.float64) * torch.tensor([1, 9, 1, 1, 1, 1, 30, 1.0], dtype=torch.float64)
    cos, sin = (_half_cos_sin if rope == "half" else _interleaved_cos_sin)(b, L, d)
    cos, sin = cos.double(), sin.double()

    def scores(q, k):
        qr, kr = apply_rope(q, cos, sin, rope), apply_rope(k, cos, sin, rope)
        return qr @ kr.repeat_interleave(heads // kv, dim=1).transpose(-1, -2)

    qr, kr = apply_rope(q, cos, sin, rope), apply_rope(k, cos, sin, rope)
    lam = attention_scale(kr.abs().amax(dim=(0, 2)).reshape(-1), qr.abs().amax(dim=(0, 2)).reshape(-1),
                          kv, rope, 0.5, 0.0).double().view(kv, d)
    lam_q = lam.repeat_interleave(heads // kv, dim=0)
    ref = scores(q, k)
    got = scores(q * lam_q[None, :, None, :], k / lam[None, :, None, :])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # negative control: pairing channels with the wrong convention breaks exactness
    wrong = "interleaved" if rope == "half" else "half"
    lam_w = attention_scale(kr.abs().amax(dim=(0, 2)).reshape(-1), qr.abs().amax(dim=(0, 2)).reshape(-1),
                            kv, wrong, 0.5, 0.0).double().view(kv, d)
    bad = scores(q * lam_w.repeat_interleave(heads // kv, dim=0)[None, :, None, :], k / lam_w[None, :, None, :])
    assert (bad - ref).abs().max() > 1e-3


def test_hand_written_half_rope_matches_hf():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    cos, sin = _half_cos_sin(2, 6, 8)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, "half"), hq)
    torch.testing.assert_close(apply_rope(k, cos, sin, "half"), hk)


def test_check_needs_kv_quant():
    from qtool.recipe import Recipe

    r = Recipe()
    from helpers import tiny_config

    probs = get_pass("smooth_attention").check(r, AD, tiny_config())
    assert any("kv_bits" in p for p in probs)
    r.quant.kv_bits = 4
    assert get_pass("smooth_attention").check(r, AD, tiny_config()) == []
