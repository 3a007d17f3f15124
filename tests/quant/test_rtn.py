import pytest
import torch

from qtool.errors import LayoutError
from qtool.quant.qweight import QuantSpec, check_spec, fake_quantize, quantize_rtn


def _ref_asym(w, bits, g):
    """Scalar-loop reference of AWQ's asymmetric quantizer (algorithms.md §1.6)."""
    n, k = w.shape
    out = torch.empty_like(w, dtype=torch.float64)
    qmax = 2**bits - 1
    for r in range(n):
        for c0 in range(0, k, g):
            grp = w[r, c0:c0 + g].double()
            s = max(float(grp.max() - grp.min()), 1e-5) / qmax
            z = min(max(-round(float(grp.min()) / s), 0), qmax)
            for c in range(c0, c0 + g):
                q = min(max(round(float(w[r, c]) / s) + z, 0), qmax)
                out[r, c] = (q - z) * s
    return out


@pytest.mark.parametrize("bits,g", [(4, 32), (3, 64), (8, 16), (4, 128)])
def test_asymmetric_matches_scalar_reference(bits, g):
    torch.manual_seed(bits * 100 + g)
    w = torch.randn(5, 256)
    got = quantize_rtn(w, QuantSpec(bits, g)).dequantize(torch.float64)
    torch.testing.assert_close(got, _ref_asym(w, bits, g), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_and_error_bounded(bits, g, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 384) * torch.rand(16, 1) * 3
    qw = quantize_rtn(w, QuantSpec(bits, g, sym))
    c = qw.codes.to(torch.int32)
    if sym:
        assert qw.codes.dtype == torch.int8 and qw.zero is None
        assert c.min() >= -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1
    else:
        assert qw.codes.dtype == torch.uint8 and c.min() >= 0 and c.max() <= 2**bits - 1
        assert qw.zero.max() <= 2**bits - 1
    gs = 384 if g == -1 else g
    assert qw.scale.shape == (16, 384 // gs)
    err = (qw.dequantize() - w).abs()
    bound = qw._expand(qw.scale)[:, :384] * (0.5 if sym else 1.0) + 1e-6
    assert (err <= bound).all()


def test_exactly_representable_weights_are_lossless():
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (8, 128)).float()
    codes[:, 0], codes[:, 1] = 0, 15  # every group spans the full range
    w = (codes - 3) * 0.125
    torch.testing.assert_close(fake_quantize(w, QuantSpec(4, 128)), w, rtol=0, atol=1e-6)


def test_groups_never_straddle_rows():
    """576 x 576 elements divide by 128 although 576 does not: must be refused, not reshaped."""
    w = torch.randn(576, 576)
    assert check_spec((576, 576), QuantSpec(4, 128))
    with pytest.raises(LayoutError, match="not a multiple of group_size 128.*group_size 64"):
        quantize_rtn(w, QuantSpec(4, 128))


def test_padding_groups_use_real_channels_only():
    torch.manual_seed(2)
    w = torch.randn(4, 100)
    qw = quantize_rtn(w, QuantSpec(4, 64, pad=True))
    assert qw.codes.shape == (4, 128) and qw.in_features == 100 and qw.dequantize().shape == (4, 100)
    # the straddling group (channels 64..99) is quantized over those 36 real channels only
    ref = _ref_asym(w[:, 64:], 4, 36)
    torch.testing.assert_close(qw.dequantize(torch.float64)[:, 64:], ref, rtol=0, atol=1e-5)


def test_zero_rows_do_not_nan():
    w = torch.zeros(3, 64)
    for sym in (False, True):
        d = quantize_rtn(w, QuantSpec(4, 32, sym)).dequantize()
        assert torch.isfinite(d).all() and d.abs().max() == 0
