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
