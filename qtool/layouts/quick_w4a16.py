"""`quick-w4a16`: the QUICK interleaved W4A16 layout (SqueezeBits/QUICK; algorithms.md §4b).

Asymmetric uint4 codes, group size 32/64/128, fp16 scales, integer zero points; W = (q - z) · s.
Tensors per linear (Np = out_features padded to a multiple of 128, Kp = padded in_features):

- ``qweight`` int32 ``[Kp/4, Np/2]``: the nibble of ``q[n, k]`` lies in flat word
  ``kb·4Np + (2y+h)·Np + 128·bx + 8·(4·jm + t) + 4·khalf + c`` at bit ``16·lohi + 4·k8 + 8·(tile%2)``,
  with ``bx = n/128, y = (n%128)/64, tile = (n%64)/8, j = n%8, h = j/4, jm = j%4, c = tile/2`` and
  ``kb = k/32, khalf = (k%32)/16, kr = k%16, k8 = kr/8, t = (kr%8)/2, lohi = kr%2``.
- ``scales`` fp16 ``[G, 2·Np]``: with ``Q = y·(Np/16) + h·(Np/32) + 4·bx + jm`` and ``x = 8Q + tile``,
  ``scales[g, 2x] = scales[g, 2x+1] = s[n, g]``.
- ``qzeros`` int32 ``[G, Np/4]``: word ``x/4`` holds ``z[n, g]`` in both nibbles ``x%4`` and ``x%4 + 4``.

Every index above is a mixed-radix digit of ``n`` or ``k``, so the whole permutation is one
``reshape → permute → reshape`` of the code matrix (no per-element index tensor, no Python loop over
elements): the geometry (view shape and axis order) is computed once per shape and cached, and the
inverse is the inverse axis order. Works on any device and for every ``Np % 128 == 0`` (QUICK's own
packer only handles N == 128 or N % 256 == 0; algorithms.md §6 pitfall 12).

Padding. N is padded up to a multiple of 128 with rows whose code and zero are 0 and whose scale is 0,
so the padded outputs are exactly 0; the runtime slices them off using ``out_features`` from the meta.
K is padded by the quantizer (``quant.pad``) to a multiple of the group size; the padded columns must
meet zero activations at run time (the runtime module zero-pads x from in_features to padded_in).

Scales are stored in fp16, so ``pack`` rounds the canonical fp32 scale to fp16 (and refuses scales
that overflow fp16); ``unpack`` returns that fp16-exact value as fp32.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch
from torch import Tensor

from qtool.errors import LayoutError
from qtool.layouts.base import register_layout, uint4_pre_zero_problems
from qtool.quant.qweight import QuantizedWeight, QuantSpec, check_spec

GROUP_SIZES = (32, 64, 128)
N_ALIGN = 128  # QUICK CTA width: N must be a multiple of 128 (padded if not)
K_ALIGN = 32  # QUICK k-tile

# ---------------------------------------------------------------------------------------------------
# Nibble <-> int32 word conversion (8 nibbles per word, nibble i at bits 4i..4i+3).
# Two nibbles make one byte (low nibble = even slot); four bytes viewed as one little-endian int32.


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise LayoutError("4-bit packing assumes a little-endian host")


def pack_nibbles(nib: Tensor) -> Tensor:
    """[..., 8] integer tensor with values 0..15 → [...] int32 words (nibble i at bits 4i..4i+3)."""
    _check_little_endian()
    nib = nib.to(torch.uint8)
    byte = nib[..., 0::2] | (nib[..., 1::2] << 4)  # [..., 4] bytes, byte b = nibbles 2b, 2b+1
    return byte.contiguous().view(torch.int32).squeeze(-1)


def unpack_nibbles(words: Tensor) -> Tensor:
    """[...] int32 words → [..., 8] uint8 nibbles (inverse of `pack_nibbles`)."""
    _check_little_endian()
    if words.dtype != torch.int32:
        raise LayoutError(f"packed 4-bit tensors must be int32, got {words.dtype}")
    byte = words.contiguous().unsqueeze(-1).view(torch.uint8)  # [..., 4]
    return torch.stack((byte & 0xF, byte >> 4), dim=-1).flatten(-2)  # [..., 8]


# ---------------------------------------------------------------------------------------------------
# Geometry: the permutation as a mixed-radix view + one permute, cached per (Np, Kp).
#
# codes [Np, Kp] viewed with axes (bx, y, c, tm, h, jm | kb, khalf, k8, t, lohi), where
#   n = 128·bx + 64·y + 16·c + 8·tm + 4·h + jm   (tile = 2c + tm, j = 4h + jm)
#   k = 32·kb + 16·khalf + 8·k8 + 2·t + lohi
# Word order (most significant first): kb, (y, h) = segment, bx, (jm, t) = lane, khalf, c;
# nibble slot inside the word: 4·lohi + 2·tm + k8  (bit 16·lohi + 8·(tile%2) + 4·k8).
_QW_PERM = (6, 1, 4, 0, 5, 9, 7, 2, 10, 3, 8)
# scales/zeros [G, Np] viewed with axes (g, bx, y, tile, h, jm) → column order x = (y, h, bx, jm, tile).
_SZ_PERM = (0, 2, 4, 1, 5, 3)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@lru_cache(maxsize=None)
def _qweight_geometry(np_: int, kp: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(view shape of codes [Np, Kp], axis order codes→words, shape after the permute)."""
    if np_ % N_ALIGN or kp % K_ALIGN:
        raise LayoutError(f"QUICK needs N % 128 == 0 and K % 32 == 0, got N={np_}, K={kp}")
    view = (np_ // 128, 2, 4, 2, 2, 4, kp // 32, 2, 2, 4, 2)
    permuted = tuple(view[a] for a in _QW_PERM)
    return view, _QW_PERM, permuted


@lru_cache(maxsize=None)
def _column_geometry(np_: int) -> tuple[int, ...]:
    """View shape (without the leading G axis) of per-column tensors for the scale/zero order."""
    if np_ % N_ALIGN:
        raise LayoutError(f"QUICK needs N % 128 == 0, got N={np_}")
    return (np_ // 128, 2, 8, 2, 4)


def interleave_codes(codes: Tensor) -> Tensor:
    """codes [Np, Kp] (0..15) → QUICK qweight int32 [Kp/4, Np/2]."""
    np_, kp = codes.shape
    view, perm, _ = _qweight_geometry(np_, kp)
    nib = codes.reshape(view).permute(perm).reshape(-1, 8)
    return pack_nibbles(nib).reshape(kp // 4, np_ // 2)


def deinterleave_codes(qweight: Tensor) -> Tensor:
    """QUICK qweight int32 [Kp/4, Np/2] → codes uint8 [Np, Kp] (inverse of `interleave_codes`)."""
    kp, np_ = qweight.shape[0] * 4, qweight.shape[1] * 2
    view, perm, permuted = _qweight_geometry(np_, kp)
    nib = unpack_nibbles(qweight).reshape(permuted)
    return nib.permute(_inverse(perm)).reshape(np_, kp)


def interleave_columns(t: Tensor) -> Tensor:
    """Per-column tensor [Np, G] → [G, Np] in QUICK's column order x (x = 8Q + tile)."""
    np_, g = t.shape
    view = _column_geometry(np_)
    return t.t().reshape((g,) + view).permute(_SZ_PERM).reshape(g, np_)


def deinterleave_columns(t: Tensor) -> Tensor:
    """[G, Np] in QUICK's column order → [Np, G] (inverse of `interleave_columns`)."""
    g, np_ = t.shape
    view = _column_geometry(np_)
    permuted = (g,) + tuple(view[a - 1] for a in _SZ_PERM[1:])
    return t.reshape(permuted).permute(_inverse(_SZ_PERM)).reshape(g, np_).t()


def pack_scales(scale: Tensor) -> Tensor:
    """s [Np, G] → fp16 [G, 2·Np] with each scale duplicated into a half2."""
    s = interleave_columns(scale.to(torch.float16))
    return s.unsqueeze(-1).expand(*s.shape, 2).reshape(s.shape[0], -1).contiguous()


def unpack_scales(scales: Tensor, check: bool = True) -> Tensor:
    """fp16 [G, 2·Np] → s [Np, G] fp16 (verifies the duplication when `check`)."""
    pairs = scales.reshape(scales.shape[0], -1, 2)
    if check and not torch.equal(pairs[..., 0], pairs[..., 1]):
        raise LayoutError("QUICK scales are not duplicated in pairs: not a quick-w4a16 tensor")
    return deinterleave_columns(pairs[..., 0])


def pack_zeros(zero: Tensor) -> Tensor:
    """z [Np, G] (0..15) → int32 [G, Np/4], each zero in nibbles x%4 and x%4+4 of word x/4."""
    z = interleave_columns(zero.to(torch.uint8))
    z4 = z.reshape(z.shape[0], -1, 4)
    return pack_nibbles(torch.cat((z4, z4), dim=-1))


def unpack_zeros(qzeros: Tensor, check: bool = True) -> Tensor:
    """int32 [G, Np/4] → z [Np, G] uint8 (verifies the dual nibbles when `check`)."""
    nib = unpack_nibbles(qzeros)  # [G, Np/4, 8]
    if check and not torch.equal(nib[..., :4], nib[..., 4:]):
        raise LayoutError("QUICK qzeros do not hold each zero twice: not a quick-w4a16 tensor")
    return deinterleave_columns(nib[..., :4].reshape(qzeros.shape[0], -1))


def quick_dequantize(qweight: Tensor, scales: Tensor, qzeros: Tensor, group_size: int) -> Tensor:
    """Dequantize QUICK tensors to fp32 W [Np, Kp] = (q - z) · s (padded rows/columns included)."""
    codes = deinterleave_codes(qweight)
    np_, kp = codes.shape
    s = unpack_scales(scales, check=False).to(torch.float32)
    z = unpack_zeros(qzeros, check=False).to(torch.float32)
    if s.shape[0] != np_ or z.shape[0] != np_ or kp != s.shape[1] * group_size or z.shape != s.shape:
        raise LayoutError(
            f"inconsistent QUICK tensors: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
            f"qzeros {tuple(qzeros.shape)}, group_size {group_size}"
        )
    w = codes.to(torch.float32).reshape(np_, -1, group_size) - z.unsqueeze(-1)
    return (w * s.unsqueeze(-1)).reshape(np_, kp)


def _pad_rows(t: Tensor, rows: int, value: float) -> Tensor:
    if rows == t.shape[0]:
        return t
    pad = torch.full((rows - t.shape[0],) + tuple(t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat((t, pad), dim=0)


def _padded_out(n: int) -> int:
    return -(-n // N_ALIGN) * N_ALIGN


@register_layout
class QuickW4A16Layout:
    name = "quick-w4a16"
    version = 1

    def check(self, shape: tuple[int, int], spec: QuantSpec) -> list[str]:
        problems = []
        if spec.bits != 4:
            problems.append(f"quick-w4a16 holds 4-bit weights only (bits={spec.bits})")
        if spec.symmetric:
            problems.append("quick-w4a16 needs asymmetric quantization (symmetric=false): it stores zero points")
        if spec.group_size not in GROUP_SIZES:
            problems.append(
                f"quick-w4a16 needs group_size 32, 64 or 128 (got {spec.group_size}); per-channel is not supported"
            )
        else:
            problems.extend(check_spec(shape, spec))
        return problems

    def _validate(self, qw: QuantizedWeight) -> None:
        problems = uint4_pre_zero_problems(qw, GROUP_SIZES, K_ALIGN)
        if problems:
            raise LayoutError("cannot pack as quick-w4a16: " + "; ".join(problems))

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        self._validate(qw)
        n = qw.codes.shape[0]
        np_ = _padded_out(n)
        scale16 = qw.scale.to(torch.float16)
        if not torch.isfinite(scale16).all():
            raise LayoutError(
                "cannot pack as quick-w4a16: a scale overflows fp16",
                "QUICK stores fp16 scales; check the weights for inf/NaN or huge outliers",
            )
        codes = _pad_rows(qw.codes.to(torch.uint8), np_, 0)
        zero = _pad_rows(qw.zero.to(torch.uint8), np_, 0)
        scale = _pad_rows(scale16, np_, 0.0)
        return {
            "qweight": interleave_codes(codes).contiguous(),
            "qzeros": pack_zeros(zero).contiguous(),
            "scales": pack_scales(scale),
        }

    def pack_meta(self, qw: QuantizedWeight) -> dict:
        n, kp = qw.codes.shape
        return {
            "bits": 4,
            "group_size": qw.group_size,
            "in_features": qw.in_features,
            "out_features": n,
            "padded_in": kp,
            "padded_out": _padded_out(n),
        }

    def unpack(self, tensors: dict[str, Tensor], meta: dict) -> QuantizedWeight:
        missing = {"qweight", "qzeros", "scales"} - set(tensors)
        if missing:
            raise LayoutError(f"quick-w4a16 tensors missing: {sorted(missing)}")
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        g, kp, np_ = meta["group_size"], meta["padded_in"], meta["padded_out"]
        n, k = meta["out_features"], meta["in_features"]
        groups = kp // g if g in GROUP_SIZES else -1
        expected = {
            "qweight": ((kp // 4, np_ // 2), torch.int32),
            "qzeros": ((groups, np_ // 4), torch.int32),
            "scales": ((groups, 2 * np_), torch.float16),
        }
        bad = [
            f"{name} {tuple(tensors[name].shape)} {tensors[name].dtype} (expected {shape} {dtype})"
            for name, (shape, dtype) in expected.items()
            if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype
        ]
        if meta.get("bits", 4) != 4 or g not in GROUP_SIZES or kp % g or not (0 < n <= np_) or not (0 < k <= kp):
            bad.append(f"meta {meta} is not a valid quick-w4a16 record")
        if bad:
            raise LayoutError("quick-w4a16 tensors do not match their meta: " + "; ".join(bad))
        codes = deinterleave_codes(qweight)[:n]
        return QuantizedWeight(
            codes=codes.contiguous(),
            scale=unpack_scales(scales)[:n].to(torch.float32).contiguous(),
            zero=unpack_zeros(qzeros)[:n].contiguous(),
            bits=4,
            group_size=g,
            in_features=k,
            zero_mode="pre",
        )
