"""Lossless conversion between packed layouts, through the canonical `QuantizedWeight` (`qtool convert`).

Both QUICK and AutoAWQ-GEMM store uint4 codes, uint4 zero points and fp16 scales, so
quick-w4a16 ↔ awq-gemm is bit-exact in both directions for every linear both layouts can hold.
What awq-gemm cannot hold (a K padded by ``quant.pad``, out_features not a multiple of 8) is
refused with a `LayoutError`; QUICK's padded output rows are dropped on the way to awq-gemm and
re-created on the way back.
"""

from __future__ import annotations

from torch import Tensor

from qtool.layouts.awq_gemm import AwqGemmLayout
from qtool.layouts.base import get_layout
from qtool.layouts.quick_w4a16 import QuickW4A16Layout


def convert_layout(tensors: dict[str, Tensor], meta: dict, src: str, dst: str) -> tuple[dict[str, Tensor], dict]:
    """Unpack one linear's tensors from layout `src` and pack them into layout `dst`."""
    qw = get_layout(src).unpack(tensors, meta)
    out = get_layout(dst)
    return out.pack(qw), out.pack_meta(qw)


def quick_to_awq_gemm(tensors: dict[str, Tensor], meta: dict) -> tuple[dict[str, Tensor], dict]:
    """quick-w4a16 tensors + meta → awq-gemm tensors + meta (bit-exact)."""
    qw = QuickW4A16Layout().unpack(tensors, meta)
    awq = AwqGemmLayout()
    return awq.pack(qw), awq.pack_meta(qw)


def awq_gemm_to_quick(tensors: dict[str, Tensor], meta: dict) -> tuple[dict[str, Tensor], dict]:
    """awq-gemm tensors + meta → quick-w4a16 tensors + meta (bit-exact; N padded to 128)."""
    qw = AwqGemmLayout().unpack(tensors, meta)
    quick = QuickW4A16Layout()
    return quick.pack(qw), quick.pack_meta(qw)
