"""Runtime for the `w4a8kv4` layout: W4A8 GEMM and KV4 cache quantization reference ops.

Reference ops (pure PyTorch, any device; `qtool.kernels` maps the same names to CUDA kernels):

- ``w4a8_gemm``: QServe's W4A8 GEMM on the packed checkpoint tensors (`algorithms.md` §3.2, §4c)::

      per-group:   y = s_x * s1 * sum_k x8 * W8,  W8 = q4 * s2 + s2_zeros  (int8, exact)
      per-channel: y = s1 * s_x * sum_k q4 * x8 - sz * x_sum

  The integer sums are exact: they run in fp32 when every partial sum provably stays below 2^24
  (K * 127 * max|w| < 2^24; inputs are small integers, exact even under TF32) and in fp64
  otherwise. The epilogue is fp32; the result is fp32 [M, N], or that value rounded once to
  ``out_dtype`` (float16 / bfloat16: what a layer returns, without a separate cast).
- ``kv4_quantize`` / ``kv4_dequantize``: QServe's KV4 cache format, per token per KV head
  (`algorithms.md` §3.6; `applyBiasRopeUpdateKVCache.h`, `decoderMaskedMultiheadAttentionUtils.h`)::

      scale = fp16((max - min) / 15)
      zero  = fp16(-15 * min / (max - min))          (not rounded: a fractional zero point)
      q     = clamp(round_half_even(x * (1 / scale) + zero), 0, 15)        (uint8, one code per byte)
      x^    = fp16(q * scale + fp16(-scale * zero))  (QServe's fp16 fma; bit-exact here via fp64)

  Guard (QServe divides by zero for constant vectors and loses its zero point in fp16 when
  |zero| grows past 2^10): where (max - min) / 15 < max(|min| / 2^10, 2^-24) — max == min included —
  the scale becomes the power of two s = 2^ceil(log2(max(|min| / 2^10, 2^-24))) and zero = -min / s
  (exact in fp16). Codes still lie in [0, 15] and a constant fp16 vector reconstructs exactly.
  Every other vector gets QServe's values.

`W4A8Linear` (registered for `w4a8kv4`) quantizes activations per token to int8 (symmetric,
scale = max|x| / 127, `qtool.quant.activations`), then calls ``w4a8_gemm``. For the per-channel
zero correction it passes x_sum = s_x * sum_k x8 (the sum of the *dequantized* activations), which
makes the module equal to ``fake_quant_per_token(x) @ W^T`` exactly. QServe's fused RMSNorm kernel
sums the un-quantized normalized activations instead; the difference is one rounding of the
activations times sz.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtool.kernels import reference_op
from qtool.layouts.w4a8kv4 import W4A8KV4Layout, unpack_qweight, unpack_s2
from qtool.nn import register_runtime

_FP32_EXACT = 2**24
KV4_LEVELS = 15
_KV_ZERO_LIMIT = 2.0**10
_KV_MIN_SCALE = 2.0**-24
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _exact_int_matmul(a: Tensor, b: Tensor, bound: int) -> Tensor:
    """a [M, K] @ b [N, K]^T for integer-valued a, b; exact when |a| * |b| * K <= `bound` per sum."""
    dtype = torch.float32 if bound < _FP32_EXACT else torch.float64
    return a.to(dtype) @ b.to(dtype).t()


@reference_op("w4a8_gemm")
def w4a8_gemm(
    xq: Tensor,
    x_scale: Tensor,
    x_sum: Tensor | None,
    qweight: Tensor,
    s1_scales: Tensor,
    s1_szeros: Tensor | None,
    s2_scales: Tensor | None,
    s2_zeros: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """QServe W4A8 GEMM on packed tensors: xq int8 [M, Kp], x_scale [M, 1] -> [M, N] in out_dtype
    (default float32; float16 / bfloat16 round the fp32 epilogue value once).

    Per-group (s2_scales/s2_zeros given): s_x * s1 * sum_k x8 * (q4 * s2 + s2_zeros).
    Per-channel (s1_szeros given): s1 * s_x * sum_k q4 * x8 - sz * x_sum, with x_sum [M, 1] the
    per-token activation sum (computed from xq and x_scale when None).
    """
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"w4a8_gemm: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    q4 = unpack_qweight(qweight).to(torch.int32)  # [N, Kp]
    n, kp = q4.shape
    if xq.shape[-1] != kp:
        raise ValueError(f"activations have {xq.shape[-1]} channels, the weight {kp} (pad activations with zeros)")
    x8 = xq.to(torch.int32)
    sx = x_scale.to(torch.float32).reshape(-1, 1)
    s1 = s1_scales.to(torch.float32).reshape(1, n)
    per_group = s2_scales is not None
    if per_group:
        if s2_zeros is None or s1_szeros is not None:
            raise ValueError("w4a8_gemm per-group needs s2_scales and s2_zeros and no s1_szeros")
        s2 = unpack_s2(s2_scales).to(torch.int32)  # [N, G]
        z = unpack_s2(s2_zeros).to(torch.int32)
        groups = s2.shape[1]
        if group_size * groups != kp:
            raise ValueError(f"group_size {group_size} x {groups} groups != K {kp}")
        w8 = q4 * s2.repeat_interleave(group_size, dim=1) + z.repeat_interleave(group_size, dim=1)
        wmax = int(w8.abs().max()) if w8.numel() else 0
        acc = _exact_int_matmul(x8, w8, kp * 128 * wmax)
        y = acc.to(torch.float32) * sx * s1
    else:
        if s1_szeros is None or s2_zeros is not None:
            raise ValueError("w4a8_gemm per-channel needs s1_szeros and no s2 tensors")
        acc = _exact_int_matmul(x8, q4, kp * 128 * 15)
        if x_sum is None:
            x_sum = x8.to(torch.float32).sum(dim=-1, keepdim=True) * sx
        y = acc.to(torch.float32) * sx * s1 - x_sum.to(torch.float32).reshape(-1, 1) * s1_szeros.to(
            torch.float32
        ).reshape(1, n)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def _quantize_per_token_fn(backend):
    """The per-token int8 activation quantizer: the backend's op if it has one, else qtool's reference."""
    if "quantize_per_token" in getattr(backend, "ops", {}):
        return backend.ops["quantize_per_token"]
    from qtool.quant.activations import quantize_per_token

    return quantize_per_token


@register_runtime("w4a8kv4")
class W4A8Linear(nn.Module):
    """QServe W4A8 linear built from `w4a8kv4` tensors: per-token int8 activations x 4-bit weights."""

    def __init__(self, tensors: dict[str, Tensor], meta: dict, bias: Tensor | None, backend):
        super().__init__()
        W4A8KV4Layout().unpack(tensors, meta)  # validates names, shapes and groups once
        self.in_features = meta["in_features"]
        self.out_features = meta["out_features"]
        self.padded_in_features = meta.get("padded_in_features", self.in_features)
        self.group_size = meta["group_size"]
        for name in ("qweight", "s1_scales", "s1_szeros", "s2_scales", "s2_zeros"):
            self.register_buffer(name, tensors.get(name), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._quant = _quantize_per_token_fn(backend)
        self._gemm = backend.op("w4a8_gemm")

    @classmethod
    def from_packed(cls, tensors, meta, bias, backend):
        return cls(tensors, meta, bias, backend)

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.padded_in_features > self.in_features:
            x2 = F.pad(x2, (0, self.padded_in_features - self.in_features))
        xq, xs = self._quant(x2)
        x_sum = None
        if self.per_channel:
            x_sum = xq.to(torch.float32).sum(dim=-1, keepdim=True) * xs.to(torch.float32)
        # the GEMM writes the layer's dtype itself (one rounding of its fp32 epilogue, no separate cast)
        out_dtype = x.dtype if x.dtype in _OUT_DTYPES else torch.float32
        y = self._gemm(
            xq, xs, x_sum, self.qweight, self.s1_scales, self.s1_szeros, self.s2_scales, self.s2_zeros,
            self.group_size, self.bias, out_dtype,
        )
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# ----------------------------------------------------------------------------------------------
# KV cache quantization (QServe KV4; KV8 uses the same formulas with 255 levels)
# ----------------------------------------------------------------------------------------------


def _kv_quantize(x: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    xf = x.to(torch.float32)
    vmax = xf.amax(dim=-1, keepdim=True)
    vmin = xf.amin(dim=-1, keepdim=True)
    rng = vmax - vmin
    scale_f = rng / levels
    floor = torch.clamp(vmin.abs() / _KV_ZERO_LIMIT, min=_KV_MIN_SCALE)
    degenerate = scale_f < floor  # includes max == min
    pow2 = torch.exp2(torch.ceil(torch.log2(floor)))
    safe_rng = torch.where(degenerate, torch.ones_like(rng), rng)
    zero_f = torch.where(degenerate, -vmin / pow2, -levels * vmin / safe_rng)
    scale_f = torch.where(degenerate, pow2, scale_f)
    scale = scale_f.to(torch.float16)
    zero = zero_f.to(torch.float16)
    inv = 1.0 / scale.to(torch.float32)
    q = torch.clamp(torch.round(xf * inv + zero.to(torch.float32)), 0, levels).to(torch.uint8)
    return q, scale, zero


def _kv_dequantize(q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    s = scale.to(torch.float64)
    c = (-(s * zero.to(torch.float64))).to(torch.float16).to(torch.float64)
    return (q.to(torch.float64) * s + c).to(torch.float16).to(dtype)


@reference_op("kv4_quantize")
def kv4_quantize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [..., head_dim] -> (q uint8 [..., head_dim] in [0, 15], scale fp16 [..., 1], zero fp16 [..., 1])."""
    return _kv_quantize(x, KV4_LEVELS)


@reference_op("kv4_dequantize")
def kv4_dequantize(q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float16) -> Tensor:
    """(q, scale, zero) from `kv4_quantize` -> fp16(q * scale - scale * zero), returned as `dtype`."""
    return _kv_dequantize(q, scale, zero, dtype)


def fake_quant_kv(x: Tensor, bits: int = 4) -> Tensor:
    """Quantize per vector of the last dim (per token per KV head) and dequantize; keeps x's dtype."""
    if bits not in (4, 8):
        raise ValueError(f"KV cache quantization supports 4 or 8 bits, got {bits}")
    q, s, z = _kv_quantize(x, 2**bits - 1)
    return _kv_dequantize(q, s, z, x.dtype)


def fake_quant_kv4(x: Tensor) -> Tensor:
    """QServe KV4 fake quantization of x [..., head_dim] (per token per KV head); keeps x's dtype."""
    return fake_quant_kv(x, 4)
