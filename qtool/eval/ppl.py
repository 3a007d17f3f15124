"""Token perplexity with the GPTQ-style protocol (algorithms.md §5.1).

The text is tokenized once; `n = T // seqlen` non-overlapping windows `ids[i*L:(i+1)*L]` are
evaluated (tail dropped, no BOS re-inserted, no stride); per window the logits are cast to fp32
and the mean cross-entropy over the `L - 1` shifted targets is taken; the perplexity is
`exp(mean over windows of the window mean losses)`. This is the number llm-awq, AutoAWQ,
smoothquant and deepcompressor report as "wikitext2 ppl" — here computed on whichever text is
given, and always to be reported with its seqlen and text name.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from qtool.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("qtool.eval.ppl")


@dataclass
class PplResult:
    ppl: float
    nll_mean: float  # mean over windows of the per-window mean NLL (nats/token)
    n_windows: int
    n_tokens: int  # tokens in the evaluated windows (n_windows * seqlen)
    seqlen: int
    seconds: float
    total_tokens: int = 0  # tokens in the whole text (tail included)


def tokenize_text(tokenizer: Any, text: str) -> "torch.Tensor":
    """Tokenize a whole text in one call → 1-D LongTensor (default special tokens only)."""
    import torch

    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _model_device(model: Any) -> "torch.device":
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def token_nll(model: Any, inputs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Per-token NLL [B, T] of `targets` [B, T] under `model` fed `inputs` [B, ≥ T] (on its device):
    position t's logits score targets[:, t]. Call under `torch.inference_mode()`."""
    import torch.nn.functional as F

    out = model(input_ids=inputs, use_cache=False)
    logits = (out.logits if hasattr(out, "logits") else out[0]).float()[:, : targets.shape[1], :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           reduction="none").view(targets.shape)


def perplexity(
    model: Any,
    input_ids: "torch.Tensor",
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PplResult:
    """GPTQ-style chunked perplexity of `model` on `input_ids` (`[T]` or `[1, T]`).

    Runs on the device the model is on. `max_windows` evaluates only the first windows;
    `batch_size` windows go through the model per forward; `progress(i, n)` is called after each
    forward with the number of windows done.
    """
    import torch
    import torch.nn.functional as F

    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [T] or [1, T], got {tuple(input_ids.shape)}")
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [T] or [1, T], got {tuple(input_ids.shape)}")
    if seqlen < 2:
        raise ConfigError(f"perplexity seqlen must be at least 2, got {seqlen}")
    if batch_size < 1:
        raise ConfigError(f"perplexity batch_size must be positive, got {batch_size}")
    total = int(input_ids.numel())
    n = total // seqlen
    if n == 0:
        raise ConfigError(
            f"text has {total} tokens, fewer than one perplexity window of seqlen={seqlen}",
            "use a shorter eval.seqlen or a longer text",
        )
    if max_windows is not None:
        if max_windows < 1:
            raise ConfigError(f"max_windows must be positive, got {max_windows}")
        n = min(n, max_windows)

    device = _model_device(model)
    windows = input_ids[: n * seqlen].to(torch.long).view(n, seqlen)
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = windows[start:start + batch_size].to(device)
            nll = token_nll(model, batch, batch[:, 1:])
            losses.extend(nll.mean(dim=1).double().cpu().tolist())
            del nll
            if progress is not None:
                progress(len(losses), n)
    seconds = time.perf_counter() - t0
    nll_mean = math.fsum(losses) / n
    ppl = math.exp(nll_mean)
    log.info("perplexity %.4f over %d windows of %d tokens (%.1f s)", ppl, n, seqlen, seconds)
    return PplResult(ppl=ppl, nll_mean=nll_mean, n_windows=n, n_tokens=n * seqlen, seqlen=seqlen,
                     seconds=seconds, total_tokens=total)
