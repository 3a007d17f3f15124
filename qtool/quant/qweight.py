"""The canonical quantized weight and the round-to-nearest (RTN) quantizer.

`QuantizedWeight` is layout-independent: unpacked integer codes plus scales and zeros. Every layout
packs from it and unpacks back to it exactly; its `dequantize()` is the numerical reference that
layouts, runtime modules and kernels are tested against.

Reconstruction formulas (W has shape [N, K], groups of `group_size` consecutive input channels):

- ``zero_mode == "pre"``  (AWQ / QUICK / AutoAWQ):   W = (q - z) * s
- ``zero_mode == "post"`` (QoQ per-channel):         W = q * s - z          (z is a float)
- ``scale2 is not None``  (QoQ progressive):         W = s * (q * s2 - z)   (s: [N, 1] fp, s2, z: [N, G] ints)
- symmetric (``zero is None``):                      W = q * s              (q signed, stored as int8)

`codes` may be wider than the real weight when K was padded to a multiple of the group size;
`in_features` is the real K, and `dequantize()` returns only the real columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

from qtool.errors import LayoutError


@dataclass(frozen=True)
class QuantSpec:
    """What one linear's weight quantization looks like (bits, grouping, symmetry)."""

    bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    pad: bool = False  # pad K up to a multiple of group_size instead of refusing

    def groups(self, in_features: int) -> int:
        if self.group_size == -1:
            return 1
        return padded_size(in_features, self.group_size) // self.group_size


def padded_size(k: int, g: int) -> int:
    return k if g == -1 else -(-k // g) * g


def check_spec(shape: tuple[int, int], spec: QuantSpec) -> list[str]:
    """Plan-time problems of quantizing a weight of `shape` ([N, K]) with `spec`; empty when fine."""
    problems = []
    n, k = shape
    if spec.bits not in (2, 3, 4, 5, 6, 7, 8):
        problems.append(f"bits={spec.bits} is not supported (use 2..8)")
    g = spec.group_size
    if g != -1 and g <= 0:
        problems.append(f"group_size={g} must be positive or -1 (per-channel)")
    elif g != -1 and k % g != 0 and not spec.pad:
        problems.append(
            f"in_features {k} is not a multiple of group_size {g}: use group_size "
            f"{_suggest_group(k)} or -1, or set quant.pad=true to pad K"
        )
    return problems


def _suggest_group(k: int) -> int:
    for g in (128, 64, 32):
        if k % g == 0:
            return g
    return -1


@dataclass(frozen=True)
class QuantizedWeight:
    codes: Tensor  # [N, Kp] uint8 (asymmetric) or int8 (symmetric)
    scale: Tensor  # [N, G] float32 (per-channel: G == 1)
    zero: Optional[Tensor]  # [N, G]; integer-valued for "pre", float for "post"; None = symmetric
    bits: int
    group_size: int  # -1 = per-channel
    in_features: int  # real K (codes may be padded beyond it)
    zero_mode: Literal["pre", "post"] = "pre"
    scale2: Optional[Tensor] = None  # QoQ progressive: integer per-group scale [N, G]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.in_features)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def padded_in_features(self) -> int:
        return self.codes.shape[1]

    def _expand(self, t: Tensor) -> Tensor:
        """[N, G] → [N, Kp] by repeating each group value over its channels."""
        kp = self.codes.shape[1]
        if t.shape[1] == 1:
            return t.expand(-1, kp)
        return t.repeat_interleave(kp // t.shape[1], dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = self.codes.to(torch.float32)
        s = self._expand(self.scale.to(torch.float32))
        if self.scale2 is not None:
            s2 = self._expand(self.scale2.to(torch.float32))
            z = self._expand(self.zero.to(torch.float32))
            w = s * (q * s2 - z)
        elif self.zero is None:
            w = q * s
        elif self.zero_mode == "post":
            w = q * s - self._expand(self.zero.to(torch.float32))
        else:
            w = (q - self._expand(self.zero.to(torch.float32))) * s
        return w[:, : self.in_features].to(dtype)


def _grouped(w: Tensor, spec: QuantSpec) -> tuple[Tensor, int]:
    """Reshape [N, K] → [N, G, g] without ever forming groups across rows; pads K if allowed.

    Padding replicates the last real column, so each group's min/max is computed over real
    channels only (the padded codes are multiplied by zero-padded activations at run time).
    """
    n, k = w.shape
    problems = check_spec((n, k), spec)
    if problems:
        raise LayoutError("; ".join(problems))
    g = k if spec.group_size == -1 else spec.group_size
    kp = padded_size(k, g)
    if kp != k:
        w = torch.cat([w, w[:, -1:].expand(n, kp - k)], dim=1)
    return w.reshape(n, kp // g, g), kp


def quantize_rtn(weight: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight (statistics in fp32).

    Asymmetric (AWQ's quantizer): s = max(max - min, 1e-5) / (2^b - 1), z = clamp(-round(min / s)),
    q = clamp(round(w / s) + z, 0, 2^b - 1). Symmetric: s = max(absmax, 1e-5) / (2^(b-1) - 1),
    q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1).
    """
    n, k = weight.shape
    wg, kp = _grouped(weight.detach().to(torch.float32), spec)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        s = wg.abs().amax(dim=2, keepdim=True).clamp(min=1e-5) / qmax
        q = torch.clamp(torch.round(wg / s), -qmax - 1, qmax)
        codes = q.reshape(n, kp).to(torch.int8)
        zero = None
    else:
        qmax = 2**spec.bits - 1
        wmax = wg.amax(dim=2, keepdim=True)
        wmin = wg.amin(dim=2, keepdim=True)
        s = (wmax - wmin).clamp(min=1e-5) / qmax
        z = torch.clamp(-torch.round(wmin / s), 0, qmax)
        q = torch.clamp(torch.round(wg / s) + z, 0, qmax)
        codes = q.reshape(n, kp).to(torch.uint8)
        zero = z.squeeze(2).to(torch.uint8)
    return QuantizedWeight(
        codes=codes,
        scale=s.squeeze(2),
        zero=zero,
        bits=spec.bits,
        group_size=spec.group_size,
        in_features=k,
    )


def fake_quantize(weight: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize then dequantize, in the weight's dtype (the fake-quant model's weights)."""
    return quantize_rtn(weight, spec).dequantize(weight.dtype)
