"""KV4 cache quantization ops (QServe formulas, `algorithms.md` §3.6) and KV4 inside HF attention."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from qtool.kernels import select_backend
from qtool.nn.w4a8 import fake_quant_kv, fake_quant_kv4, kv4_dequantize, kv4_quantize


def _scalar_kv4(vec: list[float]):
    """QServe's per-vector formulas with numpy fp32/fp16 scalars (normal, non-degenerate vectors)."""
    f = [np.float32(v) for v in vec]
    vmax, vmin = max(f), min(f)
    scale = np.float16((vmax - vmin) / np.float32(15))
    zero = np.float16(np.float32(-15.0) * vmin / (vmax - vmin))
    inv = np.float32(1.0) / np.float32(scale)
    q = [min(15, max(0, round(float(x * inv + np.float32(zero))))) for x in f]
    c = np.float16(-float(scale) * float(zero))  # exact product of two fp16 values, one rounding
    deq = [float(np.float16(qi * float(scale) + float(c))) for qi in q]  # fp16 fma: exact in double
    return q, float(scale), float(zero), deq


def test_kv4_quantize_matches_scalar_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 64) * torch.rand(3, 2, 5, 1) * 4
    x[0, 0, 0] += 7.0  # an all-positive vector (negative zero point)
    q, scale, zero = kv4_quantize(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert scale.dtype == torch.float16 and zero.dtype == torch.float16 and scale.shape == (3, 2, 5, 1)
    deq = kv4_dequantize(q, scale, zero)
    assert deq.dtype == torch.float16
    xs = x.reshape(-1, 64)
    for i in range(xs.shape[0]):
        eq, es, ez, ed = _scalar_kv4(xs[i].tolist())
        assert q.reshape(-1, 64)[i].tolist() == eq
        assert scale.reshape(-1)[i].item() == es and zero.reshape(-1)[i].item() == ez
        assert deq.reshape(-1, 64)[i].double().tolist() == ed


def test_fake_quant_error_bound():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 17, 128) * 2
    x[..., 5] *= 10  # outlier channel
    y = fake_quant_kv4(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    vmax, vmin = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    step = (vmax - vmin) / 15
    bound = step * (0.5 + 2e-3) + x.abs() * 2**-10 + 1e-6  # rounding + fp16 storage of scale/zero/result
    assert bool(((y - x).abs() <= bound).all())
    assert not torch.equal(y, x)
    # codes use the whole range: min -> 0, max -> 15
    q, _, _ = kv4_quantize(x)
    assert int(q.amin(-1).max()) == 0 and int(q.amax(-1).min()) == 15


def test_degenerate_vectors_are_finite_and_exact():
    x = torch.stack([torch.zeros(64), torch.full((64,), 0.375), torch.full((64,), -5.0), torch.full((64,), 1e-9)])
    q, scale, zero = kv4_quantize(x)
    assert bool(torch.isfinite(scale.float()).all()) and bool(torch.isfinite(zero.float()).all())
    assert bool((scale.float() > 0).all()) and int(q.max()) <= 15
    y = fake_quant_kv4(x)
    assert torch.equal(y[:3], x[:3])  # fp16-representable constants reconstruct exactly
    assert y[3].abs().max().item() <= 6e-8
    # a near-constant vector (range << |min|): still within the range, no fp16 overflow of the zero
    v = torch.linspace(10.0, 10.001, 64)
    assert (fake_quant_kv4(v) - v).abs().max().item() <= 0.0011


def test_kv8_and_dtypes():
    torch.manual_seed(2)
    x = torch.randn(2, 64)
    e4 = (fake_quant_kv(x, 4) - x).abs().max()
    e8 = (fake_quant_kv(x, 8) - x).abs().max()
    assert e8 < e4 / 8
    xb = x.to(torch.bfloat16)
    assert fake_quant_kv4(xb).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        fake_quant_kv(x, 3)
    backend = select_backend("reference")
    assert backend.op("kv4_quantize") is kv4_quantize and backend.op("kv4_dequantize") is kv4_dequantize


# ---------------------------------------------------------------- inside HF attention


def _tiny(attn: str = "sdpa"):
    from helpers import tiny_llama

    model = tiny_llama()
    model.config._attn_implementation = attn
    return model


def _ids(batch: int = 2, seq: int = 24):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_enable_changes_logits_slightly_and_disable_restores(attn):
    from qtool.nn.kv4_attention import disable_kv4, enable_kv4, kv4_enabled

    model = _tiny(attn)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        name = enable_kv4(model)
        assert name == f"qtool_kv4_{attn}" and kv4_enabled(model)
        kv = model(ids).logits
        disable_kv4(model)
        again = model(ids).logits
    assert model.config._attn_implementation == attn and not kv4_enabled(model)
    assert torch.equal(again, base)
    rel = ((kv - base).norm() / base.norm()).item()
    assert 1e-5 < rel < 0.1, rel


def test_keys_and_values_seen_after_rope():
    import qtool.nn.kv4_attention as kva
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _tiny()
    ids = _ids(1, 12)
    attn0 = model.model.layers[0].self_attn
    captured = {}

    def pre_hook(mod, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["pos"] = kwargs["position_embeddings"]

    calls = []
    real = kva.fake_quant_kv

    def spy(t, bits=4):
        calls.append(t.clone())
        return real(t, bits)

    h = attn0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    kva.fake_quant_kv = spy
    try:
        kva.enable_kv4(model)
        with torch.no_grad():
            model(ids)
    finally:
        kva.fake_quant_kv = real
        h.remove()
        kva.disable_kv4(model)
    assert len(calls) == 2 * model.config.num_hidden_layers  # key and value of every layer
    key0, value0 = calls[0], calls[1]
    assert key0.shape == (1, 2, 12, 16)  # [batch, kv_heads, seq, head_dim]: per KV head, before GQA repeat
    with torch.no_grad():
        hs = captured["hidden"]
        k = attn0.k_proj(hs).view(1, 12, -1, 16).transpose(1, 2)
        q = attn0.q_proj(hs).view(1, 12, -1, 16).transpose(1, 2)
        v = attn0.v_proj(hs).view(1, 12, -1, 16).transpose(1, 2)
        cos, sin = captured["pos"]
        _, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(key0, k_rope)
    assert not torch.allclose(key0, k)  # RoPE was applied before quantization
    torch.testing.assert_close(value0, v)


def test_no_quant_wrapper_keeps_masks_identical():
    # keys/values off: the wrapper must reproduce the base model exactly, padding mask included
    from qtool.nn.kv4_attention import disable_kv4, enable_kv4

    model = _tiny()
    ids = _ids(2, 16)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        enable_kv4(model, keys=False, values=False)
        same = model(ids, attention_mask=mask).logits
        enable_kv4(model)  # re-enable with quantization: settings update in place
        quant = model(ids, attention_mask=mask).logits
        disable_kv4(model)
    assert torch.equal(same, base)
    assert not torch.equal(quant, base)


def test_incremental_decode_equals_full_forward():
    # per-token quantization: quantizing the whole cache at every step == quantizing each token once
    from qtool.nn.kv4_attention import disable_kv4, enable_kv4

    model = _tiny()
    ids = _ids(1, 10)
    enable_kv4(model)
    try:
        with torch.no_grad():
            full = model(ids, use_cache=False).logits[:, -1]
            out = model(ids[:, :-1], use_cache=True)
            # transformers >= 5.2x names the cache argument / output `cache` (`past_key_values` deprecated)
            new_api = "cache" in inspect.signature(model.forward).parameters
            past = out.cache if new_api else out.past_key_values
            step = model(ids[:, -1:], **{"cache" if new_api else "past_key_values": past}, use_cache=True).logits[:, -1]
    finally:
        disable_kv4(model)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_spec_forms():
    from qtool.nn.kv4_attention import _bits_from_spec
    from qtool.recipe import QuantCfg

    assert _bits_from_spec(None) == 4 and _bits_from_spec(8) == 8
    assert _bits_from_spec(QuantCfg(kv_bits=4)) == 4
    with pytest.raises(ValueError):
        _bits_from_spec(QuantCfg(kv_bits=16))
