"""SmoothAttention (QoQ, `algorithms.md` §3.4): move key outliers into the queries before KV4.

Statistic over the calibration tokens, on **post-RoPE** queries and keys (fp32):

    kmax[c] = max_t |K[t, c]|        per KV head and channel
    qmax[c] = max_t |Q[t, c]|        per query head, then max over the query heads of each KV group
    both shared over RoPE pairs:     "half": c ↔ c + d/2 (HF rotate_half); "interleaved": 2i ↔ 2i+1
    λ = kmax^α / qmax^β              (α = 0.5, β = 0 by default ⇒ λ = sqrt(kmax))
    λ = 1 where it is 0; any NaN/Inf ⇒ all ones (deepcompressor's `get_smooth_scale` rule)

Fold: q_proj output rows (and bias) ``× λ`` repeated for every query head of the KV group (HF
``repeat_kv`` order: query head h reads KV head h // (heads / kv_heads)); k_proj output rows (and
bias, Qwen2 — pitfall 15) ``÷ λ``. Because λ is equal on both channels of every RoPE pair, the
diagonal scale commutes with each pair's 2×2 rotation, so RoPE(λ·q)·RoPE(k/λ)ᵀ = RoPE(q)·RoPE(k)ᵀ:
attention scores are unchanged in floating point, while K's outlier channels shrink for KV4.

Capture: forward hooks on q_proj / k_proj give the pre-RoPE projections; a pre-hook on the
attention module gives the `position_embeddings` (cos, sin) the block passes to it; RoPE is then
applied with the modeling module's own `apply_rotary_pos_emb` when the convention is "half" (it is
what the attention itself calls), or with the hand-written interleaved formula otherwise.

Artifact: ``<prefix>.<attention module>.smooth_attention_scale`` fp32 [num_kv_heads · head_dim].
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from qtool.algos.base import register_pass
from qtool.calib.runner import BlockContext
from qtool.errors import CalibrationError

SUFFIX = "smooth_attention_scale"


# ------------------------------------------------------------------------------- RoPE helpers
def rotate_half(x: Tensor) -> Tensor:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, …) → (−x1, x0, −x3, x2, …): the GPT-J / interleaved RoPE partner."""
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rope: str) -> Tensor:
    """x·cos + partner(x)·sin with x [b, heads, L, d] and cos/sin [b, L, d] in the matching layout."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    partner = rotate_half(x) if rope == "half" else rotate_interleaved(x)
    return x * cos + partner * sin


def share_rope_pairs(stat: Tensor, rope: Optional[str]) -> Tensor:
    """Max of a per-channel statistic [..., d] over each RoPE pair, written to both channels."""
    if rope is None:
        return stat
    d = stat.shape[-1]
    if d % 2:
        raise CalibrationError(f"SmoothAttention: head_dim {d} is odd, RoPE pairs are undefined")
    if rope == "half":
        m = stat.view(*stat.shape[:-1], 2, d // 2).amax(dim=-2)
        return torch.cat((m, m), dim=-1)
    if rope == "interleaved":
        m = stat.view(*stat.shape[:-1], d // 2, 2).amax(dim=-1, keepdim=True)
        return m.expand(*m.shape[:-1], 2).reshape(stat.shape)
    raise CalibrationError(f"SmoothAttention: unknown RoPE convention {rope!r}")


def smooth_scale(kmax: Tensor, qmax: Tensor, alpha: float, beta: float) -> Tensor:
    """λ = kmax^α / qmax^β; 1 where 0; all ones if anything is NaN/Inf."""
    s = torch.ones_like(kmax, dtype=torch.float32)
    if alpha != 0:
        s = s * kmax.float().pow(alpha)
    if beta != 0:
        s = s / qmax.float().pow(beta)
    s = torch.where(s == 0, torch.ones_like(s), s)
    if not bool(torch.isfinite(s).all()):
        return torch.ones_like(s)
    return s


def attention_scale(kmax: Tensor, qmax: Tensor, num_kv_heads: int, rope: Optional[str],
                    alpha: float, beta: float) -> Tensor:
    """λ [kv_heads·d] from per-channel absmax of post-RoPE keys [kv·d] and queries [heads·d]."""
    k = kmax.float().view(num_kv_heads, -1)
    d = k.shape[1]
    q = qmax.float().view(num_kv_heads, -1, d).amax(dim=1)  # GQA: max over the group's query heads
    return smooth_scale(share_rope_pairs(k, rope), share_rope_pairs(q, rope), alpha, beta).reshape(-1)


def _model_rope(attn_module) -> Optional[Callable]:
    fn = getattr(sys.modules.get(type(attn_module).__module__), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else None


# ------------------------------------------------------------------------------- capture
@torch.no_grad()
def collect_qk_absmax(ctx: BlockContext) -> tuple[Tensor, Tensor]:
    """Per-channel max |·| of post-RoPE queries [heads·d] and keys [kv_heads·d] over all tokens."""
    a = ctx.attention
    attn = ctx.module(a.module)
    q_mod, k_mod = ctx.module(a.q), ctx.module(a.k)
    model_rope = _model_rope(attn) if a.rope == "half" else None
    state: dict[str, Any] = {}

    def pre(module, args, kwargs):
        state["pe"] = kwargs.get("position_embeddings")
        state.pop("q", None)
        state.pop("k", None)

    def out_hook(name):
        def hook(module, args, out):
            state[name] = out.detach()
            if "q" in state and "k" in state:
                _observe()
        return hook

    def _observe():
        q, k = state.pop("q"), state.pop("k")
        b, L = q.shape[0], q.shape[1]
        qh = q.view(b, L, a.num_heads, a.head_dim).transpose(1, 2).float()
        kh = k.view(b, L, a.num_kv_heads, a.head_dim).transpose(1, 2).float()
        if a.rope is not None:
            pe = state.get("pe")
            if pe is None:
                raise CalibrationError(
                    f"SmoothAttention: {ctx.prefix}.{a.module} was called without position_embeddings; "
                    "post-RoPE statistics need them (transformers ≥ 4.48 passes them)")
            cos, sin = pe[0].float(), pe[1].float()
            if model_rope is not None:
                qh, kh = model_rope(qh, kh, cos, sin)
            else:
                qh, kh = apply_rope(qh, cos, sin, a.rope), apply_rope(kh, cos, sin, a.rope)
        qm = qh.abs().amax(dim=(0, 2)).reshape(-1)
        km = kh.abs().amax(dim=(0, 2)).reshape(-1)
        state["qmax"] = torch.maximum(state["qmax"], qm) if "qmax" in state else qm
        state["kmax"] = torch.maximum(state["kmax"], km) if "kmax" in state else km

    handles = [
        attn.register_forward_pre_hook(pre, with_kwargs=True),
        q_mod.register_forward_hook(out_hook("q")),
        k_mod.register_forward_hook(out_hook("k")),
    ]
    try:
        for x, kw in ctx.batches():
            ctx.block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    if "kmax" not in state:
        raise CalibrationError(f"SmoothAttention: {ctx.prefix}.{a.module} was never called during calibration")
    return state["qmax"], state["kmax"]


# ------------------------------------------------------------------------------- folding
@torch.no_grad()
def fold_attention_scale(block, a, lam: Tensor) -> None:
    """q rows (and bias) × λ per query head of each group, k rows (and bias) ÷ λ."""
    q, k = block.get_submodule(a.q), block.get_submodule(a.k)
    lam = lam.detach().float().reshape(-1)
    if lam.numel() != a.num_kv_heads * a.head_dim or k.weight.shape[0] != lam.numel():
        raise CalibrationError(
            f"SmoothAttention scale has {lam.numel()} entries; k_proj has {k.weight.shape[0]} outputs "
            f"({a.num_kv_heads} KV heads × {a.head_dim})", "the artifacts were made for a different model")
    if not bool(torch.isfinite(lam).all()) or bool((lam <= 0).any()):
        raise CalibrationError("SmoothAttention scale has non-finite or non-positive entries")
    lam_q = lam.view(a.num_kv_heads, 1, a.head_dim).expand(-1, a.kv_groups, -1).reshape(-1)
    for lin, s, op in ((q, lam_q, torch.mul), (k, lam, torch.div)):
        s = s.to(lin.weight.device)
        lin.weight.copy_(op(lin.weight.float(), s[:, None]).to(lin.weight.dtype))
        if getattr(lin, "bias", None) is not None:
            lin.bias.copy_(op(lin.bias.float(), s).to(lin.bias.dtype))


# ------------------------------------------------------------------------------- the pass
@register_pass
class SmoothAttentionPass:
    name = "smooth_attention"

    def check(self, recipe, adapter, cfg) -> list[str]:
        problems = []
        if recipe.quant.kv_bits >= 16:
            problems.append("passes.smooth_attention needs quant.kv_bits < 16")
        try:
            a = adapter.attention(cfg)
        except Exception as e:  # an adapter without attention geometry
            return problems + [f"passes.smooth_attention needs the attention geometry: {e}"]
        if a.num_heads % a.num_kv_heads:
            problems.append(f"passes.smooth_attention: {a.num_heads} heads not a multiple of {a.num_kv_heads} KV heads")
        if a.rope is not None and a.head_dim % 2:
            problems.append(f"passes.smooth_attention: head_dim {a.head_dim} is odd (RoPE pairs)")
        if a.rope not in (None, "half", "interleaved"):
            problems.append(f"passes.smooth_attention: unknown RoPE convention {a.rope!r}")
        return problems

    def search(self, ctx: BlockContext, pcfg, recipe) -> dict[str, Tensor]:
        a = ctx.attention
        qmax, kmax = collect_qk_absmax(ctx)
        lam = attention_scale(kmax, qmax, a.num_kv_heads, a.rope, pcfg.alpha, pcfg.beta)
        return {f"{ctx.prefix}.{a.module}.{SUFFIX}": lam.cpu()}

    def apply(self, ctx: BlockContext, artifacts: dict[str, Tensor], pcfg, recipe) -> None:
        key = f"{ctx.prefix}.{ctx.attention.module}.{SUFFIX}"
        if key in artifacts:
            fold_attention_scale(ctx.block, ctx.attention, artifacts[key])
