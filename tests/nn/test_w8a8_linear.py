"""int8 activation quantizers, the w8a8 reference ops and W8A8Linear.

Expected values come from hand-made inputs (scales that are powers of two, so every code is
known), from int64 arithmetic for the GEMM, and from the fake-quant reference: dequantized
weight · fake-quantized activations, computed in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtool.errors import CalibrationError
from qtool.kernels import select_backend
from qtool.layouts.w8a8 import W8A8Layout
from qtool.nn import runtime_module_for
from qtool.nn.w8a8 import W8A8Linear, w8a8_gemm
from qtool.quant.activations import (
    AbsMaxObserver,
    fake_quant_per_tensor,
    fake_quant_per_token,
    quantize_per_tensor,
    quantize_per_token,
)
from qtool.quant.qweight import QuantSpec, quantize_rtn

SPEC = QuantSpec(bits=8, group_size=-1, symmetric=True)
LAYOUT = W8A8Layout()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ quantizers


def test_per_token_hand_values_and_round_half_even():
    # Row 0: absmax 127 → s = 1 exactly, so q = round(x) with ties to even.
    # Row 1: absmax -254 (negative) → s = 2, the absmax element becomes -127.
    x = torch.tensor(
        [
            [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, -126.5],
            [-254.0, 1.0, 3.0, 5.0, -7.0, 0.9, 100.0, 253.0],
        ]
    )
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (2, 1)
    assert s.tolist() == [[1.0], [2.0]]
    assert q.tolist() == [
        [127, 0, 2, 2, 0, -2, 3, -126],
        [-127, 0, 2, 2, -4, 0, 50, 126],
    ]


def test_per_token_absmax_element_is_127_and_range():
    x = torch.randn(64, 96, generator=gen(1)) * torch.logspace(-3, 3, 64).unsqueeze(1)
    q, s = quantize_per_token(x)
    idx = x.abs().argmax(dim=1)
    rows = torch.arange(64)
    assert torch.equal(q[rows, idx].abs(), torch.full((64,), 127, dtype=torch.int8))
    assert torch.equal(torch.sign(q[rows, idx].float()), torch.sign(x[rows, idx]))
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert torch.allclose(s.squeeze(1), x.abs().amax(dim=1) / 127, rtol=1e-7, atol=0)
    # rounding error at most half a step
    assert bool(((q.float() * s - x).abs() <= s / 2 * (1 + 1e-5)).all())


def test_per_token_zero_rows_and_leading_dims():
    x = torch.randn(2, 3, 16, generator=gen(2)).half()
    x[1, 2] = 0
    q, s = quantize_per_token(x)
    assert q.shape == (2, 3, 16) and s.shape == (2, 3, 1) and s.dtype == torch.float32
    assert bool(torch.isfinite(s).all())
    assert s[1, 2, 0].item() == pytest.approx(1e-5 / 127, rel=1e-6)
    assert int(q[1, 2].abs().max()) == 0
    fq = fake_quant_per_token(x)
    assert fq.dtype == torch.float16 and not bool(torch.isnan(fq).any())
    assert torch.equal(fq[1, 2], torch.zeros(16, dtype=torch.float16))
    # each row is quantized on its own: same result as the 2-D call on the flattened rows
    q2, s2 = quantize_per_token(x.reshape(6, 16))
    assert torch.equal(q2.reshape(2, 3, 16), q) and torch.equal(s2.reshape(2, 3, 1), s)


def test_per_tensor_static_hand_values_and_saturation():
    x = torch.tensor([[0.25, -0.75, 1.25, 100.0, -100.0, 0.0]])
    q = quantize_per_tensor(x, 0.5)
    # 0.5 → 0 (half to even), -1.5 → -2, 2.5 → 2, beyond the range saturates at ±127 (never -128)
    assert q.tolist() == [[0, -2, 2, 127, -127, 0]]
    fq = fake_quant_per_tensor(x.to(torch.bfloat16), torch.tensor([0.5]))
    assert fq.dtype == torch.bfloat16
    assert fq.float().tolist() == [[0.0, -1.0, 1.0, 63.5, -63.5, 0.0]]
    with pytest.raises(ValueError):
        quantize_per_tensor(x, 0.0)
    with pytest.raises(ValueError):
        quantize_per_tensor(x, torch.tensor([0.5, 0.5]))


def test_abs_max_observer_streams_the_global_max():
    obs = AbsMaxObserver()
    with pytest.raises(CalibrationError):
        obs.scale()
    batches = [torch.randn(4, 8, generator=gen(i)) * (i + 1) for i in range(5)]
    batches[2][1, 3] = -50.0  # the global absmax, negative
    for b in batches:
        obs.update(b.half())
    obs.update(torch.empty(0, 8))  # ignored
    assert obs.count == 5
    assert obs.absmax.dtype == torch.float32 and obs.absmax.item() == 50.0
    assert obs.scale().shape == (1,) and obs.scale().item() == pytest.approx(50.0 / 127, rel=1e-7)
    obs.reset()
    obs.update(torch.zeros(3))
    assert obs.scale().item() == pytest.approx(1e-5 / 127, rel=1e-6)
    with pytest.raises(CalibrationError):
        obs.update(torch.tensor([float("inf")]))


# ------------------------------------------------------------------------------ reference ops


def int64_product(xq, w):
    return (xq.long().unsqueeze(1) * w.long().unsqueeze(0)).sum(-1)


def test_gemm_integer_product_is_exact():
    # K = 4096 with values near ±127: accumulators reach ~6.6e7 > 2^24, where fp32 sums lose bits.
    g = gen(3)
    xq = torch.randint(100, 128, (3, 4096), generator=g, dtype=torch.int8)
    w = torch.randint(100, 128, (5, 4096), generator=g, dtype=torch.int8)
    w[:, ::2] *= -1
    y = w8a8_gemm(xq, torch.ones(3, 1), w, torch.ones(5), None, torch.float64)
    assert torch.equal(y, int64_product(xq, w).double())


def test_gemm_scales_and_bias():
    g = gen(4)
    xq = torch.randint(-127, 128, (6, 32), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (10, 32), generator=g, dtype=torch.int8)
    xs = torch.rand(6, 1, generator=g) + 0.01
    ws = torch.rand(10, generator=g).half() + 0.01
    b = torch.randn(10, generator=g)
    expected = int64_product(xq, w).double() * xs.double() * ws.double().unsqueeze(0) + b.double()
    for w_scale in (ws, ws.reshape(10, 1)):
        y = w8a8_gemm(xq, xs, w, w_scale, b, torch.float32)
        assert y.dtype == torch.float32 and y.shape == (6, 10)
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    y16 = w8a8_gemm(xq, xs, w, ws, b, torch.float16)
    assert y16.dtype == torch.float16
    with pytest.raises(TypeError):
        w8a8_gemm(xq.float(), xs, w, ws, b, torch.float32)
    with pytest.raises(ValueError):
        w8a8_gemm(xq, xs, w[:, :16], ws, b, torch.float32)


def test_reference_backend_has_the_ops():
    be = select_backend("reference")
    assert be.op("w8a8_gemm") is w8a8_gemm
    q, s = be.op("quantize_per_token")(torch.tensor([[2.0, -1.0]]))
    assert q.tolist() == [[127, -64]] and s.item() == pytest.approx(2 / 127)
    assert runtime_module_for("w8a8") is W8A8Linear


# ------------------------------------------------------------------------------ W8A8Linear


def make(n=48, k=80, seed=5, bias=True):
    g = gen(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    b = torch.randn(n, generator=g) if bias else None
    qw = LAYOUT.canonical(quantize_rtn(w, SPEC))
    return w, qw, b


def fake_quant_reference(x, qw, b, act_scale=None):
    """Dequantized weight × fake-quantized activations, in float64."""
    if act_scale is None:
        xf = fake_quant_per_token(x.float())
    else:
        xf = fake_quant_per_tensor(x.float(), act_scale)
    y = F.linear(xf.double(), qw.dequantize(torch.float64), None if b is None else b.double())
    return y


def test_dynamic_matches_fake_quant_reference_with_leading_dims():
    _, qw, b = make()
    packed = LAYOUT.pack(qw)
    mod = W8A8Linear.from_packed(packed, LAYOUT.pack_meta(qw), b, select_backend("reference"))
    assert not mod.static
    x = torch.randn(2, 7, 80, generator=gen(6)) * 3
    x[0, 0, 5] = 40.0  # an outlier token
    y = mod(x)
    assert y.shape == (2, 7, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), fake_quant_reference(x, qw, b), rtol=1e-5, atol=1e-5)
    # 2-D input gives the same rows
    torch.testing.assert_close(mod(x.reshape(14, 80)), y.reshape(14, 48), rtol=0, atol=0)


def test_quantized_output_is_close_to_fp_but_not_equal():
    w, qw, b = make(bias=False)
    mod = W8A8Linear(qw, None, select_backend("reference"))
    x = torch.randn(16, 80, generator=gen(7))
    y, y_fp = mod(x), F.linear(x, w)
    sqnr = 20 * torch.log10(y_fp.norm() / (y_fp - y).norm())
    assert 30 < sqnr < 80  # int8 noise: clearly present, clearly small


def test_fp16_and_bf16_inputs_keep_dtype():
    _, qw, b = make()
    mod = W8A8Linear(qw, b, select_backend("reference"))
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(3, 80, generator=gen(8)).to(dt)
        y = mod(x)
        assert y.dtype == dt
        torch.testing.assert_close(y.double(), fake_quant_reference(x, qw, b), rtol=1e-2, atol=1e-2)


def test_static_matches_fake_quant_reference():
    _, qw, b = make()
    x = torch.randn(5, 9, 80, generator=gen(9))
    obs = AbsMaxObserver()
    obs.update(x[:, :4])  # calibrate on part of the data: later tokens may saturate
    s_in = obs.scale()
    qw.meta["input_scale"] = s_in
    packed = LAYOUT.pack(qw)
    assert "input_scale" in packed
    mod = W8A8Linear.from_packed(packed, LAYOUT.pack_meta(qw), b, select_backend("reference"))
    assert mod.static
    s_disk = packed["input_scale"]  # what the module must use
    assert torch.equal(s_disk, s_in) and torch.equal(mod.input_scale, s_disk)
    assert bool((x.abs() > 127.5 * s_in).any())  # some inputs saturate at ±127
    y = mod(x)
    torch.testing.assert_close(y.double(), fake_quant_reference(x, qw, b, s_disk), rtol=1e-5, atol=1e-5)
    # static differs from dynamic on the same input
    dyn = W8A8Linear(LAYOUT.unpack({k: v for k, v in packed.items() if k != "input_scale"}, {}), b,
                     select_backend("reference"))
    assert not torch.allclose(dyn(x), y, rtol=1e-4, atol=1e-4)


def test_static_scale_as_argument():
    _, qw, _ = make(bias=False)
    mod = W8A8Linear(qw, None, select_backend("reference"), input_scale=0.05)
    x = torch.randn(4, 80, generator=gen(10))
    ref = fake_quant_reference(x, qw, None, 0.05)
    torch.testing.assert_close(mod(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_rejects_non_w8a8_weight():
    qw = quantize_rtn(torch.randn(8, 16), QuantSpec(8, -1, False))
    with pytest.raises(ValueError):
        W8A8Linear(qw, None, select_backend("reference"))
