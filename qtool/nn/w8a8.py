"""Runtime module for the `w8a8` layout and its reference ops.

    y = (q_x · q_wᵀ) · s_x · s_wᵀ + b

with q_x the int8 activations (per-token dynamic scales s_x [M, 1], or one static per-tensor
scale), q_w the int8 weight [N, K] and s_w its per-channel scale [N]. The reference GEMM forms
the integer product exactly (float64 holds every int32 accumulator exactly: |acc| <= K·127² <
2^53), applies the scales in float64, adds the bias in fp32 and casts to the output dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from qtool.kernels import reference_op
from qtool.layouts.w8a8 import W8A8Layout
from qtool.nn import register_runtime
from qtool.quant import activations


@reference_op("quantize_per_token")
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] → (q int8 [M, K], scale fp32 [M, 1]); see `qtool.quant.activations`."""
    return activations.quantize_per_token(x)


@reference_op("quantize_per_tensor")
def quantize_per_tensor(x: Tensor, scale: Tensor) -> Tensor:
    """x [M, K], static scale (one element) → q int8 [M, K]."""
    return activations.quantize_per_tensor(x, scale)


def check_w8a8_gemm_args(xq: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor) -> None:
    """The operand checks every w8a8_gemm backend makes (the CUDA op raises the same errors)."""
    if xq.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"w8a8_gemm needs int8 operands, got {xq.dtype} and {w.dtype}")
    if xq.dim() != 2 or w.dim() != 2 or xq.shape[1] != w.shape[1]:
        raise ValueError(f"w8a8_gemm shapes do not match: x {tuple(xq.shape)}, w {tuple(w.shape)}")
    m, n = xq.shape[0], w.shape[0]
    if x_scale.numel() not in (1, m):
        raise ValueError(f"x_scale has {x_scale.numel()} elements, need 1 or {m}")
    if w_scale.numel() != n:
        raise ValueError(f"w_scale has {w_scale.numel()} elements, need {n}")


@reference_op("w8a8_gemm")
def w8a8_gemm(
    xq: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    out_dtype: torch.dtype,
) -> Tensor:
    """xq int8 [M, K], x_scale [M, 1] (or one element), w int8 [N, K], w_scale [N] or [N, 1],
    bias [N] or None → [M, N] in `out_dtype`."""
    check_w8a8_gemm_args(xq, x_scale, w, w_scale)
    n = w.shape[0]
    acc = xq.to(torch.float64) @ w.to(torch.float64).t()  # exact int32 accumulator values
    y = acc * x_scale.to(torch.float64).reshape(-1, 1) * w_scale.to(torch.float64).reshape(1, n)
    y = y.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


@register_runtime("w8a8")
class W8A8Linear(nn.Module):
    """int8 × int8 linear: per-token dynamic activations, or static per-tensor when the
    QuantizedWeight has `meta["input_scale"]` (or `input_scale` is given). Accepts x [..., K]."""

    def __init__(self, qw, bias: Optional[Tensor], backend, input_scale: Tensor | float | None = None):
        super().__init__()
        if qw.bits != 8 or qw.zero is not None or qw.group_size != -1 or qw.codes.dtype != torch.int8:
            raise ValueError(
                "W8A8Linear needs an 8-bit symmetric per-channel QuantizedWeight (int8 codes)"
            )
        if input_scale is None:
            input_scale = qw.meta.get("input_scale")
        self.out_features, self.in_features = qw.codes.shape[0], qw.in_features
        self.register_buffer("weight", qw.codes.contiguous(), persistent=False)
        self.register_buffer(
            "weight_scale", qw.scale.detach().to(torch.float32).reshape(-1).contiguous(), persistent=False
        )
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer(
            "input_scale",
            None if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float32).reshape(1),
            persistent=False,
        )
        self._gemm = backend.op("w8a8_gemm")
        if self.input_scale is None:
            self._quant = backend.op("quantize_per_token")
        else:
            self._quant = backend.op("quantize_per_tensor")

    @classmethod
    def from_packed(cls, tensors, meta, bias, backend):
        return cls(W8A8Layout().unpack(tensors, meta), bias, backend)

    @property
    def static(self) -> bool:
        return self.input_scale is not None

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            xq, xs = self._quant(x2)
        else:
            xq, xs = self._quant(x2, self.input_scale), self.input_scale
        y = self._gemm(xq, xs, self.weight, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        act = "static per-tensor" if self.static else "per-token dynamic"
        return f"in_features={self.in_features}, out_features={self.out_features}, act={act}"
