"""Library entry points; the CLI is a thin shell over these. No printing, no sys.exit here."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


def load_target(target: str, backend_name: str = "auto", verify: bool = True, dtype: str = "auto",
                device: str | None = None):
    """(model, tokenizer, description) for an FP model source or a qtool checkpoint directory.

    The model runs on `device` (default: cuda for the cuda backend, else cpu); the reference
    backend runs on any device, so `device="cuda"` with `backend_name="reference"` isolates the
    kernels' contribution on a GPU.
    """
    import torch

    from qtool.errors import KernelUnavailableError
    from qtool.io.qmodel import is_qtool_checkpoint
    from qtool.kernels import select_backend

    backend = select_backend(backend_name)
    device = device or ("cuda" if backend.name == "cuda" else "cpu")
    if backend.name == "cuda" and not device.startswith("cuda"):
        raise KernelUnavailableError(f"--backend cuda needs a CUDA device, got --device {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KernelUnavailableError(f"--device {device} requested but no CUDA GPU is visible")
    if is_qtool_checkpoint(target):
        from qtool.io.checkpoint import open_checkpoint
        from qtool.io.qmodel import load_quantized_model

        ckpt = open_checkpoint(target, verify=verify)
        tdtype = torch.float16 if device.startswith("cuda") else torch.float32
        model, tok = load_quantized_model(ckpt, backend, device=device, dtype=tdtype)
        info = {"kind": "checkpoint", "layout": ckpt.manifest["layout"], "path": str(ckpt.path),
                "bytes": sum(f["bytes"] for f in ckpt.manifest["files"].values())}
    else:
        from qtool.io.hf import load_model, resolve_source

        src = resolve_source(target)
        model, tok = load_model(src, dtype, device)
        info = {"kind": "fp-model", "source": src.kind, "path": src.path}
    info["backend"] = backend.name
    info["backend_reason"] = backend.reason
    return model, tok, info


@dataclass
class PplRow:
    dataset: str
    ppl: float
    seqlen: int
    n_windows: int
    n_tokens: int
    seconds: float


def perplexities(
    model, tokenizer, datasets: list[str], seqlen: int = 2048, max_windows: Optional[int] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> list[PplRow]:
    from qtool.calib.data import load_text
    from qtool.eval.ppl import perplexity, tokenize_text

    rows = []
    for spec in datasets:
        name, text = load_text(spec)
        ids = tokenize_text(tokenizer, text)
        cb = (lambda i, n, _name=name: progress(_name, i, n)) if progress else None
        r = perplexity(model, ids, seqlen=seqlen, max_windows=max_windows, progress=cb)
        rows.append(PplRow(name, r.ppl, r.seqlen, r.n_windows, r.n_tokens, r.seconds))
    return rows
