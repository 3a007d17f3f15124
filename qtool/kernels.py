"""The only doorway to native kernels: op dispatch and backend choice, made once per process.

Every quantized op has a pure-PyTorch reference implementation (registered with `reference_op`),
which runs on any device and is what CUDA kernels are tested against. The `cuda` backend maps the
same op names to `torch.ops.qtool_cuda.*` from the optional `kernels_cuda` extension, imported
lazily here and nowhere else.

    backend = select_backend("auto")      # logs its choice once
    y = backend.op("w4a16_gemm")(x, qweight, scales, qzeros, group_size)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal

from qtool.errors import KernelUnavailableError

log = logging.getLogger("qtool.kernels")

REFERENCE_OPS: dict[str, Callable] = {}
_REFERENCE_MODULES = ("qtool.nn",)


def reference_op(name: str):
    """Decorator: register the pure-PyTorch reference implementation of op `name`."""

    def deco(fn):
        REFERENCE_OPS[name] = fn
        return fn

    return deco


def _load_reference_ops() -> None:
    import importlib

    for mod in _REFERENCE_MODULES:
        importlib.import_module(mod)


@dataclass
class Backend:
    name: Literal["reference", "cuda"]
    reason: str = ""
    ops: dict[str, Callable] = field(default_factory=dict)

    def op(self, name: str) -> Callable:
        if name in self.ops:
            return self.ops[name]
        if self.name == "cuda":
            # An op without a CUDA kernel yet runs its reference on the same device; say so once.
            if name not in _warned:
                _warned.add(name)
                log.warning("no CUDA kernel for op %r: using the PyTorch reference", name)
        _load_reference_ops()
        if name not in REFERENCE_OPS:
            raise KeyError(f"unknown op {name!r}; known: {sorted(REFERENCE_OPS)}")
        return REFERENCE_OPS[name]


_warned: set[str] = set()
_selected: dict[str, Backend] = {}


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    try:
        from kernels_cuda import ops  # noqa: F401  (builds/loads the extension lazily)

        ops.load()
    except Exception as e:  # any failure to build or load is reported, never swallowed silently
        return f"the kernels_cuda extension could not be loaded: {type(e).__name__}: {e}"
    return None


def select_backend(requested: str = "auto") -> Backend:
    """Choose the kernel backend; cached per request string."""
    if requested in _selected:
        return _selected[requested]
    if requested not in ("auto", "reference", "cuda"):
        raise KernelUnavailableError(
            f"unknown backend {requested!r}", "use --backend auto, reference or cuda"
        )
    if requested == "reference":
        backend = Backend("reference", "requested")
    else:
        reason = cuda_unavailable_reason()
        if reason is None:
            from kernels_cuda import ops

            backend = Backend("cuda", "CUDA GPU and kernels_cuda available", dict(ops.cuda_ops()))
        elif requested == "cuda":
            raise KernelUnavailableError(
                f"--backend cuda is not available: {reason}",
                "run on a machine with an NVIDIA GPU and nvcc, or use --backend reference",
            )
        else:
            backend = Backend("reference", reason)
        if requested == "auto":
            log.info("kernel backend: %s (%s)", backend.name, backend.reason)
    _selected[requested] = backend
    return backend
