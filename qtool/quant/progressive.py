"""QoQ weight quantizers (QServe W4A8, `algorithms.md` §3.2): progressive per-group and per-channel.

Progressive group quantization (`quantize_progressive`, QServe "per-group", g = 128 or 64):

1. per output channel, symmetric INT8 with a *protective range* P (default 119):
   ``s1 = max_k |W[n, k]| / P`` rounded to fp16 (the checkpoint stores fp16; rounded *up* by one
   fp16 ulp where rounding to nearest fell below the exact value, so that |W / s1| <= P and no
   weight is clipped), ``W8 = round(W / s1)`` in [-P, P];
2. per group of `group_size` input channels, asymmetric UINT4 on the integers W8 with an integer
   scale and an integer post-scale zero (deepcompressor's ``PostScale`` zero point)::

       s2 = max(1, round((max - min) / 15))      (integer, stored int8)
       zs = round(-min) = -min                   (integer, int8 domain; min is already an integer)
       q4 = clamp(round((W8 + zs) / s2), 0, 15)
       W8 ~= q4 * s2 - zs                         (the kernel adds s2_zeros = -zs bytewise)

   W = s1 * (q4 * s2 - zs): exactly `QuantizedWeight.dequantize()` with ``scale = s1 [N, 1]``,
   ``scale2 = s2 [N, G]`` and ``zero = zs [N, G]`` (both int8).

Why the protective range, and why no extra clamping of zs is needed (the proof the tests check
exhaustively). Let a group of W8 have integer min m and max M with -P <= m <= M <= P and
R = M - m <= 2P. The reconstruction r(v) = m + s2 * min(15, round((v - m) / s2)) of a value v is
non-decreasing in v, so over the group it ranges over [r(m), r(M)] and only the two extremes matter:

- r(m) = m >= -P: the lower end never leaves the int8 range, and q4 >= 0 holds without clamping
  because v + zs = v - m >= 0.
- r(M) <= m + s2 * round(R / s2) <= m + R + s2 / 2 = M + s2 / 2 (round to nearest), and the clamp at
  15 can only lower it. With P = 119, R <= 238, so s2 = round(R / 15) <= 16 and r(M) <= 119 + 8 = 127.
  A finer count (R and s2 integers, R / 15 never a tie) gives r(M) <= M + 7 whenever R <= 240, so
  P = 120 is the largest safe value for post-scale zeros; P = 121 fails (m = -112, M = 121:
  s2 = 16, q4 = 15, r = 128). P = 119 (QServe's "magic number") is safe for pre- and post-scale zeros.
- q4 * s2 <= 15 * 16 = 240 <= 255: the kernel's one 32-bit multiply of four packed codes by s2 never
  carries into the neighbouring byte. s2 <= 16 <= 17.
- zs = -m is in [-P, P], so s2_zeros = -zs fits int8. zs is *not* clamped to [0, 15] (that would be
  a pre-scale uint4 zero point): a group with only positive values has a negative zs, which is
  exactly representable and keeps the whole [m, M] range — clamping it would clip such groups.

Nothing is asserted: the quantizer verifies these bounds on its output and raises `LayoutError`
with the offending value when they fail (only possible with a protective range above 120).

Measured (fp32 Gaussian / Laplace / Student-t weights, g = 128): rounding s2 to nearest as above
has ~8 % lower weight MSE than ``ceil`` (which never clips at q4 = 15), so the deepcompressor rule
is kept.

Per-channel QoQ (`quantize_qoq_per_channel`, QServe "per-channel", g = -1): asymmetric UINT4 per
output channel with an fp16 scale and an fp16 post-scale zero::

    s1 = fp16(max(max - min, 1e-5) / 15)
    z  = round(-min / s1)                      (an integer zero point; see below)
    sz = fp16(z * s1)                          (QServe's s1_szeros: "scaled zeros")
    q4 = clamp(round((W + sz) / s1), 0, 15)    (computed with the stored fp16 sz)
    W ~= q4 * s1 - sz                          (zero_mode = "post")

so `sz` is the post-scale form of the integer zero point z (QServe's own converter computes
``szeros = zeros * s1`` the same way). z is not clamped to [0, 15]: the kernel only ever sees the fp16
product sz, so a row with only positive (or only negative) values keeps its full range instead of
being clipped as a uint4 zero point would force.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.errors import LayoutError
from qtool.quant.qweight import QuantizedWeight, QuantSpec, _grouped

PROTECTIVE_RANGE = 119  # QServe / QoQ paper; the largest safe value for post-scale zeros is 120
MAX_S2 = 17  # q4 * s2 <= 255 for q4 <= 15
QMAX4 = 15
_ABSMAX_FLOOR = 1e-5


def fp16_scale_up(exact: Tensor) -> Tensor:
    """fp32 tensor of fp16-representable values >= `exact` (round to nearest, then one ulp up if below)."""
    s16 = exact.to(torch.float16)
    below = s16.to(torch.float32) < exact
    if bool(below.any()):
        s16 = torch.where(below, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16.to(torch.float32)


def _check_protective(protective: int) -> int:
    if isinstance(protective, bool) or int(protective) != protective or not 1 <= protective <= 127:
        raise ValueError(f"protective range must be an integer in [1, 127], got {protective!r}")
    return int(protective)


def quantize_progressive(
    weight: Tensor,
    group_size: int = 128,
    protective: int = PROTECTIVE_RANGE,
    *,
    pad: bool = False,
) -> QuantizedWeight:
    """QoQ progressive quantization of a [N, K] weight (module docstring for formulas and bounds).

    `pad`: K not a multiple of `group_size` is padded by replicating the last real column (the
    `QuantSpec.pad` semantics of `quantize_rtn`); `in_features` stays the real K. Without `pad` such
    shapes raise `LayoutError`.
    Returns codes uint8 [N, Kp] in [0, 15], scale fp32 [N, 1] (fp16-exact s1), scale2 int8 [N, G] (s2),
    zero int8 [N, G] (zs), zero_mode "post".
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if group_size == -1:
        raise LayoutError(
            "progressive quantization needs groups (group_size -1 asked)",
            "use quantize_qoq_per_channel for QoQ per-channel (g = -1)",
        )
    p = _check_protective(protective)
    n, k = weight.shape
    w = weight.detach().to(torch.float32)

    # Step 1: per-channel symmetric INT8 in [-P, P].
    absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=_ABSMAX_FLOOR)
    s1 = fp16_scale_up(absmax / p)
    if not bool(torch.isfinite(s1).all()):
        raise LayoutError("per-channel scale s1 overflows fp16", "the weight has values beyond the fp16 range")
    w8 = torch.clamp(torch.round(w / s1), -p, p)

    # Step 2: per-group asymmetric UINT4 on the integers, integer scale and post-scale zero.
    g8, kp = _grouped(w8, QuantSpec(bits=4, group_size=group_size, pad=pad))  # [N, G, g]
    gmax = g8.amax(dim=2, keepdim=True)
    gmin = g8.amin(dim=2, keepdim=True)
    s2 = torch.clamp(torch.round((gmax - gmin) / QMAX4), min=1)
    zs = -gmin
    q4 = torch.clamp(torch.round((g8 + zs) / s2), 0, QMAX4)

    _verify_int8_reconstruction(q4, s2, zs, p)
    return QuantizedWeight(
        codes=q4.reshape(n, kp).to(torch.uint8),
        scale=s1,
        zero=zs.squeeze(2).to(torch.int8),
        bits=4,
        group_size=group_size,
        in_features=k,
        zero_mode="post",
        scale2=s2.squeeze(2).to(torch.int8),
        meta={"scheme": "qoq-progressive", "protective": p},
    )


def _verify_int8_reconstruction(q4: Tensor, s2: Tensor, zs: Tensor, protective: int) -> None:
    """Raise LayoutError unless every W4A8-kernel bound holds (see the module docstring)."""
    hint = f"use a protective range <= 120 (QServe uses {PROTECTIVE_RANGE}); got {protective}"
    s2_max = int(s2.max())
    if s2_max > MAX_S2:
        raise LayoutError(f"progressive quantization produced s2 = {s2_max} > {MAX_S2}", hint)
    prod_max = int((q4 * s2).max())
    if prod_max > 255:
        raise LayoutError(f"progressive quantization produced q4*s2 = {prod_max} > 255", hint)
    zs_abs = int(zs.abs().max())
    if zs_abs > 127:
        raise LayoutError(f"progressive quantization produced |zero| = {zs_abs} > 127", hint)
    r = q4 * s2 - zs
    r_min, r_max = int(r.min()), int(r.max())
    if r_min < -127 or r_max > 127:
        raise LayoutError(
            f"progressive quantization reconstructs int8 weights in [{r_min}, {r_max}], outside [-127, 127]",
            hint,
        )


def quantize_qoq_per_channel(weight: Tensor) -> QuantizedWeight:
    """QoQ per-channel UINT4 of a [N, K] weight: W ~= q4 * s1 - sz (module docstring).

    Returns codes uint8 [N, K], scale fp32 [N, 1] and zero fp32 [N, 1] (both fp16-exact: s1, sz),
    group_size -1, zero_mode "post".
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().to(torch.float32)
    wmax = w.amax(dim=1, keepdim=True)
    wmin = w.amin(dim=1, keepdim=True)
    s1 = ((wmax - wmin).clamp(min=_ABSMAX_FLOOR) / QMAX4).to(torch.float16).to(torch.float32)
    z = torch.round(-wmin / s1)
    sz = (z * s1).to(torch.float16).to(torch.float32)
    if not bool(torch.isfinite(sz).all()):
        raise LayoutError("per-channel zero overflows fp16", "the weight has values beyond the fp16 range")
    q4 = torch.clamp(torch.round((w + sz) / s1), 0, QMAX4)
    return QuantizedWeight(
        codes=q4.to(torch.uint8),
        scale=s1,
        zero=sz,
        bits=4,
        group_size=-1,
        in_features=k,
        zero_mode="post",
        meta={"scheme": "qoq-per-channel"},
    )
