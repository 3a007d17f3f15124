"""Offline Hadamard rotation of the residual stream (QuaRot-style, `algorithms.md` §3.3).

`apply_rotation(model, adapter, cfg, rcfg)` runs once on the FP model, before block-wise
calibration, and leaves the model's function unchanged (fp32 round-off only):

1. **Untie** tied embeddings (pitfall 5): `lm_head.weight` becomes its own Parameter (a clone of
   the embedding) and `tie_word_embeddings` is set to False on both the model's config and `cfg`,
   so checkpoint writers keep both tensors and loaders do not re-tie them.
2. **Fold every RMSNorm weight** into the linears that read the norm's output
   (`W ← W·diag(γ)`, `γ ← 1`): input_layernorm → q/k/v, post_attention_layernorm → gate/up,
   final norm → lm_head. RMSNorm(x) = x / rms(x) is then rotation-invariant: rms(x·R) = rms(x)
   for orthogonal R (the eps term is untouched, HF computes the norm in fp32).
3. **Rotate the residual stream** with R = H / sqrt(n), a normalised Hadamard of size
   `hidden_size`, computed in float64 (row-vector convention, `y = x Wᵀ + b`):
   embeddings `E ← E·R`; readers of the stream (q, k, v, gate, up, lm_head) `W ← W·R`;
   writers to the stream (o_proj, down_proj) `W ← Rᵀ·W`, `b ← b·R`.
4. **Per-head v/o rotation** (`rcfg.per_head_vo`, deepcompressor `transforms: [out_proj]`):
   with a head_dim Hadamard Hh, v_proj output rows of every KV head `W_v,h ← Hhᵀ·W_v,h`
   (bias too) and o_proj input columns of every query head `W_o[:, h] ← W_o[:, h]·Hh`. The same Hh
   for all heads makes this GQA-safe: query head h reads KV head h // (heads / kv_heads), and the
   attention output of a head is a linear mix of its KV head's values, so it comes out rotated by
   Hh and o_proj's columns undo it.

Which linears read or write the stream comes from the adapter's block plan: the linears of the
"norm" scale groups read it; every other linear whose output width is `hidden_size` writes it.
Any linear in neither class is refused (the rotation would not be exact).

Hadamard matrices of any order (`hadamard(n)`): n = 2^k uses Sylvester's construction; other n
use a Kronecker product ``Sylvester(2^k) ⊗ P`` with a Paley matrix P built from a prime q
(Paley I: order q + 1 for q ≡ 3 mod 4; Paley II: order 2(q + 1) for q ≡ 1 mod 4), falling back to
products of several Paley matrices. Kronecker products of Hadamard matrices are Hadamard, so the
result is exactly orthogonal after scaling by 1/sqrt(n). Among the decompositions the one with the
smallest non-power-of-two factor is chosen, e.g. 576 (SmolLM2-135M) = 16 ⊗ 36 (Paley II, q = 17),
960 = 16 ⊗ 60 (Paley I, q = 59), 896 = 32 ⊗ 28 (Paley II, q = 13), 1536 = 128 ⊗ 12 (Paley I,
q = 11). A Hadamard matrix of order n > 2 needs 4 | n; orders whose every decomposition needs a
Paley order of a prime *power* (e.g. 52 = 2(25 + 1)) are not covered and raise `ValueError`
naming the order. Any orthogonal matrix would keep the model exact; Hadamard is what QoQ uses
because it spreads outliers evenly (|R_ij| = 1/sqrt(n)).

The weights are multiplied with `hadamard_transform`, which applies the Kronecker factors one axis at
a time (O(n · Σ factor orders) per row, float64) instead of forming the dense n×n matrix, so
hidden sizes of 8192 and more rotate in seconds; `hadamard(n)` gives the dense matrix (tests, reference).
`check_rotation(adapter, cfg, rcfg)` reports the same problems from the config alone (plan time).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from qtool.errors import ConfigError, IncompatibleModelError

log = logging.getLogger("qtool.algos.rotation")

_CHUNK_ROWS = 4096  # rows per float64 chunk when rotating large matrices (embeddings, lm_head)
_PALEY_MAX_PRIME = 2000


# ------------------------------------------------------------------------------- Hadamard
def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return [i for i in range(limit + 1) if sieve[i]]


@functools.lru_cache(maxsize=None)
def _paley_orders() -> dict[int, tuple[str, int]]:
    """order → ("I" | "II", prime q) for every Paley construction with a prime q (orders > 2)."""
    out: dict[int, tuple[str, int]] = {}
    for q in _primes(_PALEY_MAX_PRIME):
        if q % 4 == 3:
            out.setdefault(q + 1, ("I", q))
        elif q % 4 == 1:
            out.setdefault(2 * (q + 1), ("II", q))
    return out


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q (χ(0) = 0)."""
    residues = torch.zeros(q, dtype=torch.float64)
    residues[[(x * x) % q for x in range(1, q)]] = 1
    chi = 2 * residues - 1
    chi[0] = 0
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(order: int) -> Tensor:
    kind, q = _paley_orders()[order]
    jq = _jacobsthal(q)
    one = torch.ones(q, dtype=torch.float64)
    if kind == "I":  # H = I + S, S = [[0, 1ᵀ], [−1, Q]] skew (q ≡ 3 mod 4)
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:] = one
        s[1:, 0] = -one
        s[1:, 1:] = jq
        return torch.eye(q + 1, dtype=torch.float64) + s
    # Paley II: C = [[0, 1ᵀ], [1, Q]] symmetric conference matrix (q ≡ 1 mod 4)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = one
    c[1:, 0] = one
    c[1:, 1:] = jq
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h, h2)
    return h


@functools.lru_cache(maxsize=None)
def _decompose(n: int) -> tuple[int, ...] | None:
    """Paley orders whose product times a power of two is n (fewest / smallest first), or None."""
    if _is_pow2(n):
        return ()
    if n % 4:
        return None
    best = None
    for order in sorted(_paley_orders()):
        if order > n:
            break
        if _is_pow2(order) or n % order:
            continue
        rest = _decompose(n // order)
        if rest is not None:
            cand = tuple(sorted((order,) + rest))
            if best is None or (len(cand), cand) < (len(best), best):
                best = cand
    return best


_SYLVESTER_BLOCK = 128  # Sylvester(2^k) = Sylvester(2^a) ⊗ Sylvester(2^b): factors of at most this order


def _no_hadamard(n: int) -> ValueError:
    odd = n
    while odd % 2 == 0:
        odd //= 2
    why = (
        "a Hadamard matrix of order n > 2 needs n divisible by 4"
        if n > 2 and n % 4
        else f"no product of Paley orders (prime q < {_PALEY_MAX_PRIME}) times a power of two gives it"
    )
    return ValueError(f"no Hadamard matrix of order {n} (odd factor {odd}) is available: {why}")


@functools.lru_cache(maxsize=32)
def _paley_checked(order: int) -> Tensor:
    p = _paley(order)
    # Integer arithmetic in float64 is exact: this only fires on a construction bug. Kronecker
    # products of Hadamard matrices are Hadamard, so checking the factors checks the whole.
    if not torch.equal(p @ p.T, order * torch.eye(order, dtype=torch.float64)):
        raise RuntimeError(f"Paley matrix of order {order} is not Hadamard")
    return p


@functools.lru_cache(maxsize=64)
def _factors(n: int) -> tuple[Tensor, ...]:
    """±1 float64 matrices F1..Ft with H(n) = F1 ⊗ … ⊗ Ft (Sylvester blocks first, then Paley)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    parts = _decompose(n)
    if parts is None:
        raise _no_hadamard(n)
    out = []
    pow2 = n // math.prod(parts)
    while pow2 > 1:
        b = min(pow2, _SYLVESTER_BLOCK)
        out.append(_sylvester(b))
        pow2 //= b
    for order in parts:
        out.append(_paley_checked(order))
    return tuple(out) if out else (torch.ones(1, 1, dtype=torch.float64),)


def hadamard(n: int, normalized: bool = True) -> Tensor:
    """A dense Hadamard matrix of order n in float64 (entries ±1, or ±1/sqrt(n) when normalized).

    Raises ValueError when n has no Hadamard matrix this module can build (see module docstring).
    For applying it to large matrices use `hadamard_transform` (no n×n matrix is formed).
    """
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in _factors(n):
        h = torch.kron(h, f)
    return h / math.sqrt(n) if normalized else h


def hadamard_factors(n: int) -> tuple[int, ...]:
    """Orders of the Kronecker factors of hadamard(n): (power of two, Paley orders...)."""
    parts = _decompose(n) if isinstance(n, int) and n >= 1 else None
    if parts is None:
        _factors(n)  # raises the descriptive error
    return (n // math.prod(parts),) + parts


def hadamard_transform(x: Tensor, n: int | None = None) -> Tensor:
    """x @ R along the last dim, R = hadamard(n) normalised, in float64 (returns float64).

    Uses the Kronecker structure R = F1 ⊗ … ⊗ Ft (Sylvester blocks of ≤ 128, Paley factors): with x
    reshaped to [..., f1, …, ft], each factor contracts its own axis (a BLAS matmul), so the cost is
    O(numel · Σ fi) instead of O(numel · n) and no n×n matrix is built. (Measured faster on CPU than
    a butterfly Walsh–Hadamard transform for the power-of-two part.)
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"last dim {x.shape[-1]} != Hadamard order {n}")
    facs = _factors(n)
    lead = x.shape[:-1]
    y = x.to(torch.float64).reshape(-1, *[f.shape[0] for f in facs])
    for i, f in enumerate(facs):
        # contract axis i+1 with f: y[..., k, ...] → Σ_k y[..., k, ...] f[k, j]
        y = torch.tensordot(y, f.to(y.device), dims=([i + 1], [0])).movedim(-1, i + 1)
    return (y / math.sqrt(n)).reshape(*lead, n)


# ------------------------------------------------------------------------------- folding helpers
@torch.no_grad()
def _set(param: nn.Parameter, value64: Tensor) -> None:
    param.data.copy_(value64.to(param.device, param.dtype))


def _f64(t: Tensor, device) -> Tensor:
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


@torch.no_grad()
def _rotate_input_side(lin: nn.Module, n: int, gamma: Tensor | None, device=None) -> None:
    """W ← (W·diag(γ))·R, row chunks in float64 (on `device` when given)."""
    w = lin.weight
    g = _f64(gamma, device if device is not None else w.device) if gamma is not None else None
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        c = _f64(w.data[start : start + _CHUNK_ROWS], device)
        if g is not None:
            c = c * g[None, :]
        w.data[start : start + _CHUNK_ROWS] = hadamard_transform(c, n).to(w.device, w.dtype)


@torch.no_grad()
def _rotate_output_side(lin: nn.Module, n: int, device=None) -> None:
    """W ← Rᵀ·W, b ← b·R (the output, a row vector, becomes y·R): rotate W's columns."""
    w = lin.weight
    for start in range(0, w.shape[1], _CHUNK_ROWS):
        c = _f64(w.data[:, start : start + _CHUNK_ROWS].T, device)
        w.data[:, start : start + _CHUNK_ROWS] = hadamard_transform(c, n).T.to(w.device, w.dtype)
    if getattr(lin, "bias", None) is not None:
        _set(lin.bias, hadamard_transform(_f64(lin.bias.data, device), n))


def _norm_weight(norm: nn.Module, where: str) -> Tensor:
    w = getattr(norm, "weight", None)
    if w is None or "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
        raise IncompatibleModelError(
            f"rotation needs RMSNorm (weight only) at {where}, found {type(norm).__name__}",
            "only RMSNorm models can be rotated (LayerNorm conversion is not implemented)",
        )
    return w.detach().to(torch.float64)


# ------------------------------------------------------------------------------- untie
@torch.no_grad()
def untie_embeddings(model, adapter, cfg: Any = None) -> bool:
    """Give lm_head its own weight (a clone of the embedding) and mark configs untied.

    Returns True when the embeddings were tied. Safe to call on untied models.
    """
    emb = adapter.embed_tokens(model).weight
    head = adapter.lm_head(model)
    shared = head.weight is emb or head.weight.data_ptr() == emb.data_ptr()
    tied_cfg = bool(getattr(model.config, "tie_word_embeddings", False)) or (
        cfg is not None and adapter.tied_embeddings(cfg)
    )
    if shared:
        head.weight = nn.Parameter(emb.detach().clone(), requires_grad=head.weight.requires_grad)
    for c in {id(model.config): model.config, id(cfg): cfg}.values():
        if c is not None and hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
        elif c is not None:
            setattr(c, "tie_word_embeddings", False)
    text_cfg = getattr(model.config, "get_text_config", None)
    if callable(text_cfg):
        tc = text_cfg()
        if tc is not model.config and hasattr(tc, "tie_word_embeddings"):
            tc.tie_word_embeddings = False
    return shared or tied_cfg


# ------------------------------------------------------------------------------- the transform
def check_rotation(adapter, cfg: Any, rcfg: Any = None) -> list[str]:
    """Plan-time problems (config only): Hadamard sizes and linear placement."""
    problems = []
    kind = getattr(rcfg, "kind", "hadamard") if rcfg is not None else "hadamard"
    if kind != "hadamard":
        problems.append(f"passes.rotation.kind={kind!r} is not supported (use hadamard)")
    sizes = [("hidden_size", cfg.hidden_size)]
    if rcfg is None or getattr(rcfg, "per_head_vo", True):
        sizes.append(("head_dim", adapter.attention(cfg).head_dim))
    for what, n in sizes:
        try:
            hadamard_factors(n)
        except ValueError as e:
            problems.append(f"{what}: {e}")
    try:
        _classify(adapter, cfg)
    except IncompatibleModelError as e:
        problems.append(e.message)
    return problems


def _classify(adapter, cfg) -> tuple[dict[str, str], list[str]]:
    """(reader linear → norm it reads, writer linears) from the adapter's block plan."""
    bp = adapter.block_plan(cfg)
    readers: dict[str, str] = {}
    for g in bp.groups:
        if g.prev_kind == "norm":
            for n in g.linears:
                readers[n] = g.prev
    hidden = cfg.hidden_size
    writers = [n for n, (out_f, _) in bp.linears.items() if n not in readers and out_f == hidden]
    other = [n for n in bp.linears if n not in readers and n not in writers]
    if other:
        raise IncompatibleModelError(
            f"rotation cannot place linears {other}: they neither read a norm's output nor write the "
            f"{hidden}-wide residual stream"
        )
    return readers, writers


@torch.no_grad()
def apply_rotation(model, adapter, cfg: Any, rcfg: Any = None, *, device=None) -> dict[str, Any]:
    """Untie, fold norms, Hadamard-rotate the residual stream (and v/o per head) in place.

    `cfg` is the model's HF config (as used by the adapter), `rcfg` a `RotationCfg`
    (kind "hadamard", per_head_vo). `device`: where the float64 products are computed (e.g. the
    calibration GPU for a model kept on the CPU); default: each weight's own device. Weights stay
    where they are. Returns a summary dict (sizes, factors) for logs.
    """
    kind = getattr(rcfg, "kind", "hadamard") if rcfg is not None else "hadamard"
    per_head = bool(getattr(rcfg, "per_head_vo", True)) if rcfg is not None else True
    if kind != "hadamard":
        raise ConfigError(f"passes.rotation.kind={kind!r} is not supported", "use kind: hadamard")
    problems = check_rotation(adapter, cfg, rcfg)
    if problems:
        raise IncompatibleModelError("rotation: " + "; ".join(problems))
    hidden = cfg.hidden_size
    readers, writers = _classify(adapter, cfg)
    att = adapter.attention(cfg)

    untied = untie_embeddings(model, adapter, cfg)

    # Embeddings: E ← E·R.
    _rotate_input_side(adapter.embed_tokens(model), hidden, None, device)
    for block in adapter.blocks(model):
        gammas = {}
        for lin_name, norm_name in readers.items():
            if norm_name not in gammas:
                gammas[norm_name] = _norm_weight(block.get_submodule(norm_name), norm_name)
            _rotate_input_side(block.get_submodule(lin_name), hidden, gammas[norm_name], device)
        for norm_name in gammas:
            block.get_submodule(norm_name).weight.data.fill_(1.0)
        for lin_name in writers:
            _rotate_output_side(block.get_submodule(lin_name), hidden, device)
        if per_head:
            _rotate_vo_heads(block, att, device)
    final = adapter.final_norm(model)
    _rotate_input_side(adapter.lm_head(model), hidden, _norm_weight(final, "final norm"), device)
    final.weight.data.fill_(1.0)
    info = {"hidden": hidden, "factors": hadamard_factors(hidden), "untied": untied,
            "per_head_vo": per_head, "head_factors": hadamard_factors(att.head_dim) if per_head else None}
    log.info("rotation: Hadamard %s, per-head v/o %s, untied embeddings %s", info["factors"], per_head, untied)
    return info


@torch.no_grad()
def _rotate_vo_heads(block: nn.Module, att, device=None) -> None:
    """v rows per KV head: W_v,h ← Hhᵀ·W_v,h (bias b_h ← b_h·Hh); o columns per query head ← ·Hh."""
    d = att.head_dim
    v = block.get_submodule(att.v)
    o = block.get_submodule(att.o)
    if v.weight.shape[0] != att.num_kv_heads * d or o.weight.shape[1] != att.num_heads * d:
        raise IncompatibleModelError(
            f"per-head v/o rotation: v_proj has {v.weight.shape[0]} outputs and o_proj {o.weight.shape[1]} "
            f"inputs, expected {att.num_kv_heads}×{d} and {att.num_heads}×{d}"
        )
    # Hhᵀ·W_v,h = (W_v,hᵀ·Hh)ᵀ: rotate each column of W_v within its head's block of d rows.
    k = v.weight.shape[1]
    wv = _f64(v.weight.data, device).view(att.num_kv_heads, d, k).transpose(1, 2)  # [h, K, d]
    _set(v.weight, hadamard_transform(wv, d).transpose(1, 2).reshape(v.weight.shape))
    if getattr(v, "bias", None) is not None:
        _set(v.bias, hadamard_transform(_f64(v.bias.data, device).view(att.num_kv_heads, d), d).reshape(-1))
    wo = _f64(o.weight.data, device).view(o.weight.shape[0], att.num_heads, d)
    _set(o.weight, hadamard_transform(wo, d).reshape(o.weight.shape))
