"""QuickLinear and the w4a16_gemm reference op against x @ dequantize(W)^T of the canonical weight."""

from __future__ import annotations

import pytest
import torch

import qtool.nn.quick as quick_mod
from qtool.kernels import Backend
from qtool.layouts.quick_w4a16 import QuickW4A16Layout
from qtool.nn import runtime_module_for
from qtool.nn.quick import QuickLinear, w4a16_gemm
from qtool.quant.qweight import QuantizedWeight, QuantSpec, quantize_rtn

LAYOUT = QuickW4A16Layout()


def fp16_scaled(qw: QuantizedWeight) -> QuantizedWeight:
    """The canonical weight the packed checkpoint represents (scales rounded to fp16)."""
    return QuantizedWeight(
        codes=qw.codes, scale=qw.scale.half().float(), zero=qw.zero, bits=4,
        group_size=qw.group_size, in_features=qw.in_features,
    )


def build(N, K, g, pad=False, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05
    qw = quantize_rtn(w, QuantSpec(bits=4, group_size=g, pad=pad))
    b = torch.randn(N, generator=gen) if bias else None
    return qw, b


def reference_backend() -> Backend:
    return Backend("reference", "test")


SHAPES = [
    (128, 512, 128, False),
    (192, 576, 64, False),  # N padded to 256
    (576, 576, 64, False),  # N padded to 640
    (1536, 576, 32, False),
    (192, 576, 128, True),  # K padded 576 → 640, N padded to 256
    (384, 1536, 128, False),
]


@pytest.mark.parametrize("N,K,g,pad", SHAPES)
@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fake_quant_matmul(N, K, g, pad, cached, bias):
    qw, b = build(N, K, g, pad=pad, bias=bias, seed=N + K)
    mod = runtime_module_for("quick-w4a16").from_packed(LAYOUT.pack(qw), LAYOUT.pack_meta(qw), b, reference_backend())
    assert isinstance(mod, QuickLinear)
    mod.cache_dequantized = cached
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(1))
    y = mod(x)
    w = fp16_scaled(qw).dequantize(torch.float32)  # [N, K], real columns only
    expected = x @ w.t() + (b if b is not None else 0)
    assert y.shape == (2, 5, N) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_fp16_activations_keep_dtype():
    qw, b = build(192, 576, 64, seed=3)
    mod = QuickLinear.from_packed(LAYOUT.pack(qw), LAYOUT.pack_meta(qw), b.half(), reference_backend())
    x = torch.randn(7, 576, generator=torch.Generator().manual_seed(2)).half()
    w = fp16_scaled(qw).dequantize()
    expected = x.float() @ w.t() + b.half().float()
    for cached in (True, False):
        mod.cache_dequantized = cached
        y = mod(x)
        assert y.dtype == torch.float16
        torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=2e-3)


def test_reference_op_contract():
    qw, _ = build(192, 576, 128, pad=True, bias=False, seed=4)  # Kp 640, Np 256
    t = LAYOUT.pack(qw)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 640, generator=gen)
    x[:, 576:] = 0  # padded activations
    y = w4a16_gemm(x, t["qweight"], t["scales"], t["qzeros"], 128)
    assert y.shape == (3, 256) and y.dtype == torch.float32
    expected = x[:, :576] @ fp16_scaled(qw).dequantize().t()
    torch.testing.assert_close(y[:, :192], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, 192:], torch.zeros(3, 64))  # padded output rows are exactly 0
    y16 = w4a16_gemm(x.half(), t["qweight"], t["scales"], t["qzeros"], 128)
    assert y16.dtype == torch.float16
    assert Backend("reference").op("w4a16_gemm") is w4a16_gemm


def test_reference_path_dequantizes_once(monkeypatch):
    qw, b = build(192, 576, 64, seed=6)
    mod = QuickLinear.from_packed(LAYOUT.pack(qw), LAYOUT.pack_meta(qw), b, reference_backend())
    calls = []
    real = quick_mod.quick_dequantize

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quick_mod, "quick_dequantize", counting)
    x = torch.randn(4, 576)
    y1, y2 = mod(x), mod(x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    mod.clear_cache()
    mod(x)
    assert len(calls) == 2


def test_non_reference_backend_gets_padded_input():
    """A kernel backend receives x zero-padded to padded_in and returns [M, Np]; the module slices."""
    qw, b = build(192, 576, 128, pad=True, seed=7)
    seen = {}

    def fake_kernel(x, qweight, scales, qzeros, group_size):
        seen["x"], seen["g"] = x, group_size
        return w4a16_gemm(x, qweight, scales, qzeros, group_size)

    backend = Backend("cuda", "test", {"w4a16_gemm": fake_kernel})
    mod = QuickLinear.from_packed(LAYOUT.pack(qw), LAYOUT.pack_meta(qw), b, backend)
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(8))
    y = mod(x)
    assert seen["x"].shape == (6, 640) and seen["g"] == 128
    assert torch.equal(seen["x"][:, 576:], torch.zeros(6, 64))
    expected = x @ fp16_scaled(qw).dequantize().t() + b
    assert y.shape == (2, 3, 192)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_rejects_wrong_input_width():
    qw, b = build(128, 512, 128, seed=9)
    mod = QuickLinear.from_packed(LAYOUT.pack(qw), LAYOUT.pack_meta(qw), b, reference_backend())
    with pytest.raises(ValueError):
        mod(torch.randn(2, 500))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reference_path_on_cuda():
    qw, b = build(192, 576, 128, pad=True, seed=10)
    t = {k: v.cuda() for k, v in LAYOUT.pack(qw).items()}
    mod = QuickLinear.from_packed(t, LAYOUT.pack_meta(qw), b.cuda(), reference_backend())
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(11))
    expected = x @ fp16_scaled(qw).dequantize().t() + b
    for cached in (True, False):
        mod.cache_dequantized = cached
        y = mod(x.cuda())
        assert y.device.type == "cuda"
        torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-4)
