"""Runtime for the `quick-w4a16` layout: the `w4a16_gemm` reference op and `QuickLinear`.

`w4a16_gemm(x, qweight, scales, qzeros, group_size)` is the op contract shared with the CUDA kernel
(same name, same signature): x [M, Kp] fp16/fp32 (already zero-padded along K), QUICK tensors as
packed by `qtool.layouts.quick_w4a16`; returns x · W^T [M, Np] (padded outputs included) in x's
dtype. The reference computes it in fp32 by unpacking the layout (the unpack geometry is cached
per shape).

`QuickLinear` holds the packed buffers and, on a non-reference backend, zero-pads activations from
in_features to padded_in, calls the op, slices the padded outputs off and adds the bias. On the
reference backend it instead dequantizes the packed weight ONCE, on first use, and keeps the fp32
[out_features, in_features] result in the module (`_w_cache`, about 4 bytes per weight) so that a
CPU forward is one matmul and never re-unpacks; the cache is rebuilt when the buffers move to
another device and can be dropped with `clear_cache()`. The cached path and the op path compute
the same product: the padded K columns meet zero activations and the padded rows are sliced off.
Set `cache_dequantized = False` on an instance to force the op path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtool.errors import LayoutError
from qtool.kernels import reference_op
from qtool.layouts.quick_w4a16 import quick_dequantize
from qtool.nn import register_runtime


@reference_op("w4a16_gemm")
def w4a16_gemm(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, group_size: int) -> Tensor:
    """y[M, Np] = x[M, Kp] · dequant(W)[Np, Kp]^T, fp32 accumulation, output in x's dtype."""
    w = quick_dequantize(qweight, scales, qzeros, group_size)
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"w4a16_gemm: x must be [M, {w.shape[1]}], got {tuple(x.shape)}")
    return (x.to(torch.float32) @ w.to(x.device).t()).to(x.dtype)


@register_runtime("quick-w4a16")
class QuickLinear(nn.Module):
    cache_dequantized = True  # reference backend only; see the module docstring

    def __init__(self, tensors: dict[str, Tensor], meta: dict, bias: Tensor | None, backend):
        super().__init__()
        self.in_features = int(meta["in_features"])
        self.out_features = int(meta["out_features"])
        self.padded_in = int(meta["padded_in"])
        self.padded_out = int(meta["padded_out"])
        self.group_size = int(meta["group_size"])
        qweight, scales, qzeros = tensors["qweight"], tensors["scales"], tensors["qzeros"]
        if tuple(qweight.shape) != (self.padded_in // 4, self.padded_out // 2):
            raise LayoutError(
                f"quick-w4a16 qweight {tuple(qweight.shape)} does not match padded_in={self.padded_in}, "
                f"padded_out={self.padded_out}"
            )
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise LayoutError(f"bias {tuple(bias.shape)} does not match out_features={self.out_features}")
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("qzeros", qzeros, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._op = backend.op("w4a16_gemm")
        self._is_reference = self._op is w4a16_gemm
        self._w_cache: Tensor | None = None

    @classmethod
    def from_packed(cls, tensors, meta, bias, backend) -> "QuickLinear":
        return cls(tensors, meta, bias, backend)

    def clear_cache(self) -> None:
        self._w_cache = None

    def _dequantized(self) -> Tensor:
        w = self._w_cache
        if w is None or w.device != self.qweight.device:
            full = quick_dequantize(self.qweight, self.scales, self.qzeros, self.group_size)
            w = full[: self.out_features, : self.in_features].contiguous()
            self._w_cache = w
        return w

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuickLinear expects {self.in_features} input features, got {x.shape[-1]}")
        if self._is_reference and self.cache_dequantized:
            bias = None if self.bias is None else self.bias.to(torch.float32)
            return F.linear(x.to(torch.float32), self._dequantized(), bias).to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        y = self._op(x2.contiguous(), self.qweight, self.scales, self.qzeros, self.group_size)
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, padded_in={self.padded_in}, "
            f"padded_out={self.padded_out}, group_size={self.group_size}, bias={self.bias is not None}"
        )
