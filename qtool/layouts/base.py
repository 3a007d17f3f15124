"""Layout protocol and registry.

A layout is a named, versioned packer: it maps a canonical `QuantizedWeight` to the exact tensors a
runtime expects (`pack`) and back (`unpack`, the exact inverse). `check` lists plan-time problems for
one linear so the planner can report every incompatible linear before any weight is read.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Protocol

from torch import Tensor

from qtool.errors import LayoutError
from qtool.quant.qweight import QuantizedWeight, QuantSpec


class Layout(Protocol):
    name: ClassVar[str]
    version: ClassVar[int]

    def check(self, shape: tuple[int, int], spec: QuantSpec) -> list[str]:
        """Problems with packing a [N, K] weight quantized with `spec`; empty when fine."""

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        """Tensor-name suffix → tensor, e.g. {"qweight": ..., "scales": ..., "qzeros": ...}."""

    def unpack(self, tensors: dict[str, Tensor], meta: dict) -> QuantizedWeight:
        """Exact inverse of `pack`; `meta` holds what `pack_meta` recorded (shape, group, padding)."""

    def pack_meta(self, qw: QuantizedWeight) -> dict:
        """JSON-serialisable per-linear facts `unpack` needs (real shape, group size, padding)."""


def uint4_pre_zero_problems(qw: QuantizedWeight, group_sizes=(32, 64, 128), k_align: int = 1) -> list[str]:
    """Why `qw` is not an asymmetric 4-bit weight W = (q − z)·s with consistent group shapes (AWQ-style)."""
    problems = []
    if qw.bits != 4:
        problems.append(f"bits={qw.bits} (need 4)")
    if qw.zero is None or qw.zero_mode != "pre" or qw.scale2 is not None:
        problems.append("need asymmetric pre-scale zeros W = (q - z)·s (no symmetric, post-zero or scale2)")
    if qw.group_size not in group_sizes:
        problems.append(f"group_size={qw.group_size} (need {'/'.join(map(str, group_sizes))})")
    if problems:
        return problems
    n, kp = qw.codes.shape
    if kp % qw.group_size or kp % k_align or qw.scale.shape != (n, kp // qw.group_size):
        problems.append(
            f"codes {tuple(qw.codes.shape)} / scale {tuple(qw.scale.shape)} do not match "
            f"group_size {qw.group_size} (padded K must be a multiple of the group size)"
        )
    elif qw.zero.shape != qw.scale.shape:
        problems.append(f"zero {tuple(qw.zero.shape)} != scale {tuple(qw.scale.shape)}")
    elif qw.codes.numel() and (int(qw.codes.min()) < 0 or int(qw.codes.max()) > 15):
        problems.append("codes outside 0..15")
    elif qw.zero.numel() and (int(qw.zero.min()) < 0 or int(qw.zero.max()) > 15):
        problems.append("zero points outside 0..15")
    return problems


LAYOUTS: dict[str, Layout] = {}


def register_layout(cls):
    """Class decorator: register one instance under `cls.name`."""
    LAYOUTS[cls.name] = cls()
    return cls


def get_layout(name: str) -> Layout:
    _load_builtin_layouts()
    if name not in LAYOUTS:
        raise LayoutError(
            f"unknown layout {name!r}", f"known layouts: {', '.join(sorted(LAYOUTS)) or 'none'}"
        )
    return LAYOUTS[name]


def available_layouts() -> dict[str, Layout]:
    _load_builtin_layouts()
    return dict(LAYOUTS)


_BUILTIN_MODULES = (
    "qtool.layouts.unpacked",
    "qtool.layouts.quick_w4a16",
    "qtool.layouts.awq_gemm",
    "qtool.layouts.w8a8",
    "qtool.layouts.w4a8kv4",
)


def _load_builtin_layouts() -> None:
    import importlib
    import importlib.util

    for mod in _BUILTIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
