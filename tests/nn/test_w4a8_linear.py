"""`w4a8_gemm` reference op and the `W4A8Linear` runtime module.

Expected values: int64 matmuls of the canonical integers (codes, s2, zs from the QuantizedWeight,
never unpacked from the packed tensors) and the fake-quant product in fp64.
"""

from __future__ import annotations

import pytest
import torch

from qtool.kernels import select_backend
from qtool.layouts.w4a8kv4 import W4A8KV4Layout
from qtool.nn import runtime_module_for
from qtool.nn.w4a8 import W4A8Linear, w4a8_gemm
from qtool.quant.activations import quantize_per_token
from qtool.quant.progressive import quantize_progressive, quantize_qoq_per_channel

LAYOUT = W4A8KV4Layout()


def _w8(qw) -> torch.Tensor:
    """Integer W8 = q4*s2 - zs [N, Kp] from the canonical tensors, int64."""
    g = qw.group_size
    return qw.codes.long() * qw.scale2.long().repeat_interleave(g, 1) - qw.zero.long().repeat_interleave(g, 1)


def _x8(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(-127, 128, (m, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("n,k,g", [(192, 576, 64), (64, 1536, 128), (32, 128, 128)])
def test_per_group_integer_part_is_exact(n, k, g):
    torch.manual_seed(n + k)
    qw = quantize_progressive(torch.randn(n, k), group_size=g)
    t = LAYOUT.pack(qw)
    x8 = _x8(7, k, seed=k)
    acc = x8.long() @ _w8(qw).t()  # exact integer reference
    ones_x = torch.ones(7, 1)
    ones_w = torch.ones(n, dtype=torch.float16)
    y = w4a8_gemm(x8, ones_x, None, t["qweight"], ones_w, None, t["s2_scales"], t["s2_zeros"], g)
    assert y.dtype == torch.float32 and y.shape == (7, n)
    assert torch.equal(y, acc.to(torch.float32))
    if k == 576:
        assert int(acc.abs().max()) < 2**24  # fp32-exact range: y holds the integers themselves
    # with real scales: s_x * s1 * acc
    sx = torch.rand(7, 1) * 0.05 + 1e-3
    y = w4a8_gemm(x8, sx, None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], g)
    ref = acc.double() * sx.double() * qw.scale.double().t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


def test_per_channel_formula():
    torch.manual_seed(1)
    n, k = 64, 576
    qw = quantize_qoq_per_channel(torch.randn(n, k))
    t = LAYOUT.pack(qw)
    x8 = _x8(5, k, seed=2)
    sx = torch.rand(5, 1) * 0.05 + 1e-3
    x_sum = torch.randn(5, 1) * 3
    bias = torch.randn(n)
    y = w4a8_gemm(x8, sx, x_sum, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None, -1, bias)
    acc = x8.long() @ qw.codes.long().t()
    ref = qw.scale.double().t() * sx.double() * acc.double() - qw.zero.double().t() * x_sum.double() + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-5)
    # x_sum defaults to the sum of the dequantized activations: then y == x_deq @ W^T
    y0 = w4a8_gemm(x8, sx, None, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None, -1)
    ref0 = (x8.double() * sx.double()) @ qw.dequantize(torch.float64).t()
    torch.testing.assert_close(y0.double(), ref0, rtol=1e-5, atol=1e-5)


def test_gemm_rejects_mismatches():
    qw = quantize_progressive(torch.randn(32, 256), group_size=128)
    t = LAYOUT.pack(qw)
    x8 = _x8(2, 256, seed=3)
    with pytest.raises(ValueError):
        w4a8_gemm(x8[:, :128], torch.ones(2, 1), None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 128)
    with pytest.raises(ValueError):
        w4a8_gemm(x8, torch.ones(2, 1), None, t["qweight"], t["s1_scales"], None, t["s2_scales"], t["s2_zeros"], 64)


@pytest.mark.parametrize("g", [128, -1])
def test_gemm_out_dtype_rounds_the_fp32_result_once(g):
    torch.manual_seed(7)
    n, k = 64, 256
    w = torch.randn(n, k)
    qw = quantize_progressive(w, group_size=g) if g > 0 else quantize_qoq_per_channel(w)
    t = LAYOUT.pack(qw)
    x8 = _x8(5, k, seed=8)
    sx = torch.rand(5, 1) * 0.05 + 1e-3
    args = (x8, sx, None, t["qweight"], t["s1_scales"], t.get("s1_szeros"), t.get("s2_scales"), t.get("s2_zeros"), g,
            torch.randn(n))
    y32 = w4a8_gemm(*args)
    assert y32.dtype == torch.float32 and torch.equal(w4a8_gemm(*args, torch.float32), y32)
    for dt in (torch.float16, torch.bfloat16):
        y = w4a8_gemm(*args, dt)
        assert y.dtype == dt and torch.equal(y, y32.to(dt))
    with pytest.raises(TypeError, match="out_dtype"):
        w4a8_gemm(*args, torch.int32)


def _module(qw, bias=None):
    backend = select_backend("reference")
    return runtime_module_for("w4a8kv4").from_packed(LAYOUT.pack(qw), LAYOUT.pack_meta(qw), bias, backend)


def _fake_quant_reference(x: torch.Tensor, qw, bias=None) -> torch.Tensor:
    """fp64: per-token int8 activations (scale = max|x|/127) times the dequantized weight."""
    xf = x.reshape(-1, x.shape[-1]).double()
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
    xq = torch.clamp(torch.round(xf / s), -127, 127) * s
    y = xq @ qw.dequantize(torch.float64).t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("kind", ["g128-pad", "g64", "per-channel"])
def test_runtime_module_equals_fake_quant(kind):
    torch.manual_seed(4)
    n, k = 192, 576
    w = torch.randn(n, k) * 0.05
    qw = {
        "g128-pad": lambda: quantize_progressive(w, group_size=128, pad=True),
        "g64": lambda: quantize_progressive(w, group_size=64),
        "per-channel": lambda: quantize_qoq_per_channel(w),
    }[kind]()
    bias = torch.randn(n) * 0.1
    mod = _module(qw, bias)
    assert isinstance(mod, W4A8Linear)
    x = torch.randn(2, 9, k)
    x[..., 3] *= 20  # an outlier channel
    y = mod(x)
    assert y.shape == (2, 9, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _fake_quant_reference(x, qw, bias), rtol=1e-5, atol=1e-5)
    # quality against the float product (4-bit weights, int8 activations): SQNR in dB
    y_float = x.double() @ w.double().t() + bias.double()
    sqnr = 20 * torch.log10(y_float.norm() / (y.double() - y_float).norm())
    assert sqnr > 15


def test_runtime_module_dtype_and_registration():
    qw = quantize_progressive(torch.randn(32, 128), group_size=128)
    mod = _module(qw)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    seen = {}
    real = mod._gemm

    def spy(*args):
        seen["out_dtype"] = args[-1]
        return real(*args)

    mod._gemm = spy
    y = mod(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 32)
    assert seen["out_dtype"] == torch.bfloat16  # the GEMM writes the layer's dtype itself (no separate cast)
    torch.testing.assert_close(y.double(), _fake_quant_reference(x.float(), qw), rtol=1e-2, atol=1e-2)
    backend = select_backend("reference")
    assert backend.op("w4a8_gemm") is w4a8_gemm
    assert runtime_module_for("w4a8kv4") is W4A8Linear


def test_uses_quantize_per_token():
    # the module's activation codes are those of qtool.quant.activations.quantize_per_token
    qw = quantize_progressive(torch.randn(32, 128), group_size=128)
    mod = _module(qw)
    seen = {}
    real = mod._gemm

    def spy(xq, xs, *rest):
        seen["xq"], seen["xs"] = xq, xs
        return real(xq, xs, *rest)

    mod._gemm = spy
    x = torch.randn(4, 128)
    mod(x)
    q, s = quantize_per_token(x)
    assert torch.equal(seen["xq"], q) and torch.equal(seen["xs"], s)


@pytest.mark.parametrize("group_size", [64, -1])
def test_tiny_llama_w4a8kv4_end_to_end(group_size):
    """Every decoder linear replaced by W4A8Linear plus KV4 attention: close to the float model."""
    from helpers import tiny_llama

    from qtool.nn.kv4_attention import enable_kv4

    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
        for name in names:
            lin = model.get_submodule(name)
            w = lin.weight.detach()
            qw = quantize_qoq_per_channel(w) if group_size == -1 else quantize_progressive(w, group_size=group_size)
            model.set_submodule(name, _module(qw, lin.bias))
        enable_kv4(model)
        out = model(ids).logits
    assert all(isinstance(model.get_submodule(n), W4A8Linear) for n in names)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.25, rel
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6
