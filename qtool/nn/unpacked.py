"""Runtime module for the `unpacked` layout: dequantize once per forward, then a plain matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtool.kernels import reference_op
from qtool.layouts.unpacked import UnpackedLayout
from qtool.nn import register_runtime


@reference_op("dequant_gemm")
def dequant_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x · Wᵀ + b with W already dequantized; fp32 accumulation, output in x's dtype."""
    y = F.linear(x.to(torch.float32), weight.to(torch.float32), None if bias is None else bias.float())
    return y.to(x.dtype)


@register_runtime("unpacked")
class UnpackedLinear(nn.Module):
    def __init__(self, qw, bias, backend):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.codes.shape[0]
        self.register_buffer("weight", qw.dequantize(torch.float32), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._op = backend.op("dequant_gemm")

    layout = UnpackedLayout()

    @classmethod
    def from_packed(cls, tensors, meta, bias, backend):
        return cls(cls.layout.unpack(tensors, meta), bias, backend)

    def forward(self, x: Tensor) -> Tensor:
        return self._op(x, self.weight, self.bias)


def generic_runtime(layout) -> type:
    """A runtime module class for any layout: unpack to the canonical weight, dequantize, matmul."""
    return type(f"DequantLinear[{layout.name}]", (UnpackedLinear,), {"layout": layout})
