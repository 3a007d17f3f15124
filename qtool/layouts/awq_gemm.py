"""`awq-gemm`: the AutoAWQ GEMM checkpoint layout (algorithms.md §4a), loadable by transformers and vLLM.

Asymmetric uint4, W = (q - z) · s, K-major ("transposed") packing. Tensors per linear:

- ``qweight`` int32 ``[K, N/8]``: word ``(k, c)`` holds ``q[8c + o, k]`` (o = 0..7) in nibble
  ``p(o) = [0, 4, 1, 5, 2, 6, 3, 7][o]`` (bits 4p..4p+3); equivalently nibble i holds column
  offset ``[0, 2, 4, 6, 1, 3, 5, 7][i]``, i.e. ``i = 4·(o % 2) + o // 2``.
- ``qzeros`` int32 ``[G, N/8]``: the same packing of ``z[n, g]`` along N.
- ``scales`` fp16 ``[G, N]``: ``s[n, g]`` transposed.

No padding: ``N % 8 == 0`` and ``K % g == 0`` (real K; a K padded by ``quant.pad`` cannot be
expressed, foreign loaders derive K from ``qweight``). Group sizes 32/64/128 (what AutoAWQ kernels
and vLLM's awq/awq_marlin accept with zero points). Scales are rounded to fp16 at pack time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.errors import LayoutError
from qtool.layouts.base import register_layout, uint4_pre_zero_problems
from qtool.layouts.quick_w4a16 import pack_nibbles, unpack_nibbles
from qtool.quant.qweight import QuantizedWeight, QuantSpec

GROUP_SIZES = (32, 64, 128)


def _awq_order(t: Tensor) -> Tensor:
    """[..., N] → [..., N/8] int32: columns 8c+o packed into nibble 4·(o%2) + o//2 of word c."""
    lead, n = tuple(t.shape[:-1]), t.shape[-1]
    nib = t.reshape(*lead, n // 8, 4, 2).transpose(-1, -2).reshape(*lead, n // 8, 8)
    return pack_nibbles(nib)


def _awq_unorder(words: Tensor) -> Tensor:
    """[..., N/8] int32 → [..., N] uint8 (inverse of `_awq_order`)."""
    nib = unpack_nibbles(words)  # [..., N/8, 8]
    lead = tuple(nib.shape[:-1])
    return nib.reshape(*lead, 2, 4).transpose(-1, -2).reshape(*lead[:-1], lead[-1] * 8)


def awq_quantization_config(bits: int = 4, group_size: int = 128, modules_to_not_convert=None) -> dict:
    """The `quantization_config` of config.json for an AutoAWQ-GEMM checkpoint (transformers, vLLM)."""
    if bits != 4:
        raise LayoutError(f"awq-gemm checkpoints are 4-bit (bits={bits})")
    if group_size not in GROUP_SIZES:
        raise LayoutError(f"awq-gemm needs group_size 32, 64 or 128 (got {group_size})")
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": list(modules_to_not_convert or []),
    }


@register_layout
class AwqGemmLayout:
    name = "awq-gemm"
    version = 1

    def check(self, shape: tuple[int, int], spec: QuantSpec) -> list[str]:
        n, k = shape
        problems = []
        if spec.bits != 4:
            problems.append(f"awq-gemm holds 4-bit weights only (bits={spec.bits})")
        if spec.symmetric:
            problems.append("awq-gemm needs asymmetric quantization (symmetric=false): it stores zero points")
        if spec.group_size not in GROUP_SIZES:
            problems.append(f"awq-gemm needs group_size 32, 64 or 128 (got {spec.group_size})")
        elif k % spec.group_size:
            fits = [g for g in GROUP_SIZES if k % g == 0]
            problems.append(
                f"awq-gemm cannot pad: in_features {k} is not a multiple of group_size {spec.group_size}"
                + (f" (use group_size {max(fits)})" if fits else " (use another layout)")
            )
        if n % 8:
            problems.append(f"awq-gemm needs out_features % 8 == 0 (got {n})")
        return problems

    def _validate(self, qw: QuantizedWeight) -> None:
        problems = uint4_pre_zero_problems(qw, GROUP_SIZES)
        if not problems:
            n, kp = qw.codes.shape
            if kp != qw.in_features:
                problems.append(f"K was padded ({qw.in_features} → {kp}); awq-gemm cannot hold padded K")
            if n % 8:
                problems.append(f"out_features {n} is not a multiple of 8")
        if problems:
            raise LayoutError("cannot pack as awq-gemm: " + "; ".join(problems))

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        self._validate(qw)
        scales = qw.scale.to(torch.float16).t().contiguous()
        if not torch.isfinite(scales).all():
            raise LayoutError("cannot pack as awq-gemm: a scale overflows fp16")
        return {
            "qweight": _awq_order(qw.codes.to(torch.uint8).t()).contiguous(),
            "qzeros": _awq_order(qw.zero.to(torch.uint8).t()).contiguous(),
            "scales": scales,
        }

    def pack_meta(self, qw: QuantizedWeight) -> dict:
        return {
            "bits": 4,
            "group_size": qw.group_size,
            "in_features": qw.in_features,
            "out_features": qw.codes.shape[0],
        }

    def unpack(self, tensors: dict[str, Tensor], meta: dict) -> QuantizedWeight:
        missing = {"qweight", "qzeros", "scales"} - set(tensors)
        if missing:
            raise LayoutError(f"awq-gemm tensors missing: {sorted(missing)}")
        g, n, k = meta["group_size"], meta["out_features"], meta["in_features"]
        groups = k // g if g in GROUP_SIZES else -1
        expected = {
            "qweight": ((k, n // 8), torch.int32),
            "qzeros": ((groups, n // 8), torch.int32),
            "scales": ((groups, n), torch.float16),
        }
        bad = [
            f"{name} {tuple(tensors[name].shape)} {tensors[name].dtype} (expected {shape} {dtype})"
            for name, (shape, dtype) in expected.items()
            if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype
        ]
        if meta.get("bits", 4) != 4 or g not in GROUP_SIZES or k % g or n % 8 or n <= 0:
            bad.append(f"meta {meta} is not a valid awq-gemm record")
        if bad:
            raise LayoutError("awq-gemm tensors do not match their meta: " + "; ".join(bad))
        return QuantizedWeight(
            codes=_awq_unorder(tensors["qweight"]).t().contiguous(),
            scale=tensors["scales"].t().to(torch.float32).contiguous(),
            zero=_awq_unorder(tensors["qzeros"]).t().contiguous(),
            bits=4,
            group_size=g,
            in_features=k,
            zero_mode="pre",
        )


def _hf_quantization_config(self, recipe=None, metas=None, qcfg=None) -> dict:
    """config.json `quantization_config` that transformers and vLLM read for an AWQ-GEMM checkpoint."""
    metas = metas or {}
    groups = {m["group_size"] for m in metas.values()} or {128}
    if len(groups) != 1:
        from qtool.errors import LayoutError

        raise LayoutError(f"awq-gemm needs one group size for all linears, found {sorted(groups)}")
    ignore = list((qcfg or {}).get("modules_to_not_convert") or (recipe.quant.ignore if recipe else ["lm_head"]))
    return awq_quantization_config(4, groups.pop(), ignore)


AwqGemmLayout.hf_quantization_config = _hf_quantization_config
