"""AWQ: activation-aware per-channel weight scaling and weight clipping (algorithms.md §1).

Per decoder block (llm-awq / AutoAWQ protocol, §1.2):

1. One forward over the block's cached FP inputs records, for every scale group, the input of the
   group's first linear (which is also the input of the group's `inspect` module): the mean of
   |x| per channel over *all* calibration tokens (fp32, chunked); for groups inspected through a
   sub-module (qkv → self_attn, gate/up → mlp) the first ``ceil(LOSS_TOKENS / seqlen)`` sequences;
   for single-linear groups (up→down, v→o) the Gram matrix Σ x xᵀ over all tokens; and
   ≤ ``n_sample_token`` tokens at a fixed stride for the clipping search.
2. Scale search per group (§1.3), every group on the *unscaled* weights and the same cached inputs:
   for r = i / grid (i = 0 .. grid-1), ``s = clamp(x_mean^r / (w_mean^(1-r) + 1e-4), 1e-4)``
   (duo scaling; ``x_mean^r`` otherwise), ``s ← s / sqrt(max(s)·min(s))``, non-finite → 1; the
   group's linears become ``Q(W·diag(s))·diag(s)⁻¹`` with the recipe's own quantizer (same bits,
   group, symmetry, padding), the inspect module runs on the cached inputs and the loss is the
   fp32 MSE against its FP output (computed once per group; outputs clamped to the dtype's finite
   range). Weights are restored after every candidate. No finite loss → s = 1 and a warning.
3. Clipping search (§1.5) on the scaled weights (computed on copies) with the scale-divided
   inputs: per output channel and quantization group, ratios 1.00, 0.95, … (``max_shrink``),
   symmetric clamp ±m, error = mean over the sampled tokens of the squared difference of the
   per-group partial dot products. q/k projections are not clipped.

`search` never leaves the block modified; it returns the artifacts

    <prefix>.<group.prev>.awq_scale   fp32 [width of prev's output]   one per scale group
    <prefix>.<linear>.awq_clip        fp32 [N, G]                     clamp bound per (row, group)

and `apply` folds them from the artifacts alone (so saved artifacts replay exactly, §1.7):
norm ``γ ← γ / s`` (and β), previous linear's last ``len(s)`` output rows and bias ``÷ s``,
the group's linears' input columns ``× s``; then ``W ← clamp(W, -m, m)`` per (row, group).

GQA (algorithms.md §6 pitfall 3): v→o cannot be scaled channel-for-channel when
``v_proj.out ≠ o_proj.in``. With ``passes.awq.gqa_vo: average`` the o_proj input scale is searched
per query-head channel, averaged over the query heads that share a KV head, and folded as
``v_proj`` rows ÷ s_kv and ``o_proj`` columns × s_kv repeated over each KV head's query heads
(HF ``repeat_kv`` order: query head h reads KV head ``h // (heads / kv_heads)``), which is exact in
FP because attention output channel (h, d) is linear in v channel (h // rep, d).

Speed (a 2-core CPU must quantize SmolLM2-135M in minutes): the sub-module losses (self_attn,
mlp) run on the first ``LOSS_TOKENS`` calibration tokens (whole sequences; calibration blocks are
drawn at random from the corpus, so these are a random subset), while x_mean uses every token.
For a single linear the output MSE over all T tokens is computed exactly without a forward:
``Σ_t Σ_n (x_t·d_n)² / (T·N) = Σ_n d_nᵀ H d_n / N`` with ``H = Σ_t x_t x_tᵀ / T`` and
``d_n = ŵ_n − w_n``; the clipping error uses the same identity per quantization group.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from qtool.algos.base import register_pass
from qtool.calib.runner import BlockContext
from qtool.errors import CalibrationError
from qtool.models.base import ScaleGroup
from qtool.quant.qweight import QuantSpec, fake_quantize, padded_size
from qtool.quant.weights import quantize_weight, spec_from_recipe

log = logging.getLogger("qtool.algos.awq")

SCALE_SUFFIX = "awq_scale"
CLIP_SUFFIX = "awq_clip"

# Tokens (rounded up to whole calibration sequences) on which the self_attn / mlp losses of the
# scale search are measured; x_mean always uses every calibration token. The 20-point search then
# costs ≈ 40 forwards of 4096 tokens per block (≈ 3 min for SmolLM2-135M on a 2-core CPU).
LOSS_TOKENS = 4096
# Single-linear groups (up→down, v→o) compute their loss from the input Gram matrix over *all*
# calibration tokens instead (exact, no forward per candidate) when K ≤ GRAM_MAX_K.
GRAM_MAX_K = 8192
_STAT_CHUNK = 8192  # rows per chunk for the fp32 |x| sums
_W_CHUNK = 4096  # rows per chunk for the duo-scaling weight statistic
_NO_CLIP_LEAVES = ("query", "key", "Wqkv", "qkv_proj")  # + anything starting with q_ / k_


# --------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class _Group:
    """A scale group as AWQ uses it; `gqa_rep > 1` marks the head-averaged GQA v→o group."""

    name: str
    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    inspect: Optional[str]
    gqa_rep: int = 1
    head_dim: int = 0

    @classmethod
    def of(cls, g: ScaleGroup) -> "_Group":
        return cls(g.name, g.prev, g.prev_kind, tuple(g.linears), g.inspect)


def _gqa_vo_group(ctx: BlockContext) -> Optional[_Group]:
    """The head-averaged v→o group, when v_proj.out ≠ o_proj.in because of GQA (else None)."""
    a = ctx.attention
    if any(g.prev == a.v for g in ctx.plan.groups):
        return None
    v_out = ctx.plan.linears.get(a.v, (None, None))[0]
    o_in = ctx.plan.linears.get(a.o, (None, None))[1]
    if v_out is None or o_in is None or v_out == o_in:
        return None
    if a.num_heads % a.num_kv_heads or v_out != a.num_kv_heads * a.head_dim or o_in != a.num_heads * a.head_dim:
        return None
    return _Group("v-o", a.v, "linear", (a.o,), None, gqa_rep=a.num_heads // a.num_kv_heads, head_dim=a.head_dim)


def _groups(ctx: BlockContext, gqa_vo: str, artifacts: Optional[dict] = None) -> list[_Group]:
    groups = [_Group.of(g) for g in ctx.plan.groups]
    gqa = _gqa_vo_group(ctx)
    if gqa is not None:
        wanted = gqa_vo == "average"
        if artifacts is not None:  # apply(): the artifacts decide (replay works whatever the recipe says)
            wanted = f"{ctx.prefix}.{gqa.prev}.{SCALE_SUFFIX}" in artifacts
        if wanted:
            # v→o goes after the qkv group, as in the plan of a non-GQA model.
            at = next((i + 1 for i, g in enumerate(groups) if g.prev_kind == "norm"), len(groups))
            groups.insert(at, gqa)
    return groups


def _expand(s: Tensor, g: _Group) -> Tensor:
    """Scale on prev's output channels → scale on the group linears' input channels."""
    if g.gqa_rep == 1:
        return s
    kv = s.view(-1, 1, g.head_dim)  # [kv_heads, 1, d]
    return kv.expand(-1, g.gqa_rep, -1).reshape(-1)


def _reduce(s: Tensor, g: _Group) -> Tensor:
    """Scale on the linears' input channels → scale on prev's output channels (GQA: head average)."""
    if g.gqa_rep == 1:
        return s
    return s.view(-1, g.gqa_rep, g.head_dim).mean(dim=1).reshape(-1)


def _quantized_names(ctx: BlockContext, recipe) -> set[str]:
    ignore = list(recipe.quant.ignore)
    out = set()
    for name in ctx.plan.linears:
        fqn = f"{ctx.prefix}.{name}"
        if not any(fnmatch.fnmatch(fqn, p) or fqn == p for p in ignore):
            out.add(name)
    return out


def _clippable(name: str, ctx: BlockContext) -> bool:
    if name in (ctx.attention.q, ctx.attention.k):
        return False
    leaf = name.split(".")[-1]
    return not (leaf.startswith(("q_", "k_")) or leaf in _NO_CLIP_LEAVES)


# ------------------------------------------------------------------------------- quantizer
def _spec_group(spec: QuantSpec, k: int) -> int:
    return k if spec.group_size == -1 else spec.group_size


def qdq_grouped(wg: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Fake-quantize groups along the last dim of `wg` ([..., g]) exactly as `quantize_rtn` does
    (same fp32 operations in the same order, done in place on one buffer for speed)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = wg.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5).div_(qmax)
        return wg.div(s).round_().clamp_(-qmax - 1, qmax).mul_(s)
    qmax = 2**bits - 1
    wmax = wg.amax(dim=-1, keepdim=True)
    wmin = wg.amin(dim=-1, keepdim=True)
    s = (wmax - wmin).clamp_(min=1e-5).div_(qmax)
    z = torch.clamp(-torch.round(wmin / s), 0, qmax)
    return wg.div(s).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s)


def _qdq(w: Tensor, recipe, spec: QuantSpec) -> Tensor:
    """The recipe's weight quantizer, quantize → dequantize ([N, K] fp32 in, fp32 out)."""
    if recipe.quant.scheme != "rtn":
        return quantize_weight(w, recipe).dequantize(torch.float32)
    n, k = w.shape
    g = _spec_group(spec, k)
    kp = padded_size(k, g)
    if kp != k and not spec.pad:
        return fake_quantize(w, spec)  # raises the quantizer's own error
    wg = _pad_cols(w, kp, replicate=True).reshape(n, kp // g, g)
    return qdq_grouped(wg, spec.bits, spec.symmetric).reshape(n, kp)[:, :k]


def _pad_cols(t: Tensor, kp: int, replicate: bool) -> Tensor:
    k = t.shape[-1]
    if kp == k:
        return t
    tail = t[..., -1:].expand(*t.shape[:-1], kp - k) if replicate else t.new_zeros(*t.shape[:-1], kp - k)
    return torch.cat([t, tail], dim=-1)


# ------------------------------------------------------------------------------- statistics
def weight_mean(weights: list[Tensor], spec: QuantSpec) -> Tensor:
    """Duo-scaling weight statistic (§1.3): |w| normalised by its quantization group's max
    (+1e-6), averaged over all output rows of all the group's linears. fp32 [K]."""
    k = weights[0].shape[1]
    g = _spec_group(spec, k)
    kp = padded_size(k, g)
    total = torch.zeros(kp, dtype=torch.float32, device=weights[0].device)
    rows = 0
    for w in weights:
        for start in range(0, w.shape[0], _W_CHUNK):
            c = _pad_cols(w[start : start + _W_CHUNK].detach().float().abs(), kp, replicate=True)
            cg = c.view(c.shape[0], kp // g, g)
            cg = cg / (cg.amax(dim=-1, keepdim=True) + 1e-6)
            total += cg.reshape(c.shape[0], kp).sum(dim=0)
            rows += c.shape[0]
    return (total / max(rows, 1))[:k]


def candidate_scale(x_mean: Tensor, w_mean: Optional[Tensor], ratio: float) -> Tensor:
    """One grid point of §1.3 (fp32): duo when `w_mean` is given, activation-only otherwise."""
    if w_mean is not None:
        s = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)
    else:
        s = x_mean.pow(ratio)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class _Inputs:
    """What the search keeps of one linear's input."""

    x_sum: Tensor  # fp32 [K], Σ|x| over all tokens
    count: int = 0
    gram: Optional[Tensor] = None  # fp32 [K, K], Σ x xᵀ over all tokens (single-linear groups)
    loss: list = field(default_factory=list)  # [b, L, K] tensors, aligned with the loss kwargs
    clip: list = field(default_factory=list)  # [t, K] sampled tokens

    @property
    def x_mean(self) -> Tensor:
        return self.x_sum / max(self.count, 1)

    def clip_tokens(self, n: int) -> Tensor:
        return torch.cat(self.clip, dim=0)[:n]


def _slice_rows(obj: Any, b: int, r: int, key: str = "") -> Any:
    """The first r rows of batch-sized tensors in block kwargs (cache_position has no batch dim)."""
    if r == b or key == "cache_position":
        return obj
    if isinstance(obj, Tensor):
        return obj[:r] if obj.dim() > 0 and obj.shape[0] == b and b > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice_rows(o, b, r) for o in obj)
    if isinstance(obj, list):
        return [_slice_rows(o, b, r) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_rows(v, b, r, k) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _collect(ctx: BlockContext, names: list[str], loss_names: set, gram_names: set,
             loss_tokens: int, n_clip: int):
    """One block forward over all calibration tokens. For every named linear: Σ|x| (fp32); for
    `loss_names` the first ceil(loss_tokens / seqlen) sequences; for `gram_names` Σ x xᵀ (fp32);
    ≤ n_clip tokens at a fixed stride. Also returns the block kwargs of the loss sequences."""
    tokens = [x.numel() // x.shape[-1] for x in ctx.inputs]
    total = sum(tokens)
    seqlen = ctx.inputs[0].shape[1] if ctx.inputs[0].dim() == 3 else 1
    rows_left = 0
    if loss_names and loss_tokens > 0:
        rows_left = min(-(-loss_tokens // seqlen), sum(x.shape[0] for x in ctx.inputs))
    stride = max(1, total // n_clip) if n_clip > 0 else 0
    out: dict[str, _Inputs] = {}
    loss_kw: list[dict] = []
    state = {"r": 0, "offset": 0}

    def record(name: str, x: Tensor) -> None:
        k = x.shape[-1]
        rec = out.get(name)
        if rec is None:
            rec = out[name] = _Inputs(torch.zeros(k, dtype=torch.float32, device=x.device))
            if name in gram_names:
                rec.gram = torch.zeros(k, k, dtype=torch.float32, device=x.device)
        flat = x.detach().reshape(-1, k)
        for start in range(0, flat.shape[0], _STAT_CHUNK):
            c = flat[start : start + _STAT_CHUNK].float()
            rec.x_sum += c.abs().sum(dim=0)
            if rec.gram is not None:
                rec.gram.addmm_(c.T, c)
        rec.count += flat.shape[0]
        if state["r"] > 0 and name in loss_names:
            rec.loss.append(x.detach()[: state["r"]].clone())
        if stride:
            first = (-state["offset"]) % stride
            rec.clip.append(flat[first::stride].float().clone())

    handles = []
    for n in names:
        def hook(module, args, kwargs, _n=n):
            record(_n, args[0] if args else kwargs.get("hidden_states"))

        handles.append(ctx.module(n).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for (x, kw), n_tok in zip(ctx.batches(), tokens):
            b = x.shape[0]
            r = min(b, rows_left)
            state["r"] = r
            if r > 0:
                loss_kw.append(_slice_rows(kw, b, r))
                rows_left -= r
            ctx.block(x, **kw)
            state["offset"] += n_tok
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in out]
    if missing:
        raise CalibrationError(f"AWQ: block {ctx.prefix} never called {', '.join(missing)} during calibration")
    return out, loss_kw


# ------------------------------------------------------------------------------- scale search
def _finite_clip(y: Tensor) -> Tensor:
    fi = torch.finfo(y.dtype) if y.is_floating_point() else torch.finfo(torch.float32)
    return y.clamp(min=fi.min, max=fi.max)


def _run(ctx: BlockContext, inspect: str, x: Tensor, kw: dict) -> Tensor:
    return _finite_clip(ctx.call(inspect, x.to(ctx.device), kw))


def _uses_gram(g: _Group, k: int) -> bool:
    """Single-linear groups (inspect None) measure their output MSE through the input Gram matrix."""
    return g.inspect is None and k <= GRAM_MAX_K


@torch.no_grad()
def _search_group(ctx, g: _Group, inp: _Inputs, loss_kw, pcfg, recipe, spec, quantized) -> Tensor:
    lins = {n: ctx.linear(n) for n in g.linears}
    qnames = [n for n in g.linears if n in quantized]
    x_mean = inp.x_mean.to(ctx.device)
    w_mean = weight_mean([lins[n].weight for n in g.linears], spec) if pcfg.duo_scaling else None
    inspect = g.inspect or g.linears[0]
    originals = {n: lins[n].weight.data for n in qnames}
    if inp.gram is not None:
        # Output MSE of a linear over all T tokens, exactly: Σ_t Σ_n (x_t·d_n)² / (T·N) with
        # d_n = ŵ_n - w_n, = Σ_n d_nᵀ H d_n / N, H = Σ_t x_t x_tᵀ / T (no forward per candidate).
        h = inp.gram.to(ctx.device) / max(inp.count, 1)
        rows = sum(lins[n].weight.shape[0] for n in g.linears)
        fp_out = None
    else:
        fp_out = [_run(ctx, inspect, x, kw) for x, kw in zip(inp.loss, loss_kw)]
    best_loss, best_s, best_i = math.inf, None, -1
    losses = []
    for i in range(pcfg.grid):
        s = _reduce(candidate_scale(x_mean, w_mean, i / pcfg.grid), g)
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        s_in = _expand(s, g)
        if fp_out is None:
            sq = 0.0
            for n in qnames:
                w = originals[n].float()
                d = _qdq(w * s_in, recipe, spec).div_(s_in).sub_(w)
                sq += ((d @ h) * d).sum().item()
            loss = sq / max(rows, 1)
        else:
            try:
                for n in qnames:
                    w = originals[n]
                    lins[n].weight.data = _qdq(w.float() * s_in, recipe, spec).div_(s_in).to(w.dtype)
                sq, numel = 0.0, 0
                for (x, kw), ref in zip(zip(inp.loss, loss_kw), fp_out):
                    y = _run(ctx, inspect, x, kw)
                    sq += (ref.float() - y.float()).pow(2).sum().item()
                    numel += ref.numel()
                loss = sq / max(numel, 1)
            finally:
                for n in qnames:
                    lins[n].weight.data = originals[n]
        losses.append(loss)
        if math.isfinite(loss) and loss < best_loss:
            best_loss, best_s, best_i = loss, s, i
    if best_s is None:
        msg = (f"AWQ: no finite loss for {ctx.prefix}.{g.prev} → {', '.join(g.linears)} "
               f"(inspect {ctx.prefix}.{inspect}); using scale 1 (non-finite activations or weights?)")
        log.warning(msg)
        ctx.notes.append(msg)
        n_out = x_mean.numel() // g.gqa_rep
        return torch.ones(n_out, dtype=torch.float32, device=x_mean.device)
    log.debug("AWQ %s.%s: best ratio %.2f, loss %.4g (ratio 0: %.4g)", ctx.prefix, g.name,
              best_i / pcfg.grid, best_loss, losses[0])
    return best_s.float()


# ------------------------------------------------------------------------------- clipping
@torch.no_grad()
def search_clip(w: Tensor, x: Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5,
                oc_batch: int = 256) -> Tensor:
    """Per (output row, group) clamp bound m minimising the mean over tokens of the squared error
    of the group's partial dot product (§1.5). w: [N, K] (scaled), x: [T, K] (scale-divided).
    Returns fp32 [N, G]; ratio 1.0 (m = max|w|) wins ties and non-finite errors.

    The error is evaluated exactly through each group's input Gram matrix:
    mean_t (x_t,g · d_g)² = d_gᵀ H_g d_g with H_g = Σ_t x_t,g x_t,gᵀ / T, d = ŵ - w."""
    w = w.detach().float()
    x = x.detach().float().to(w.device)
    n, k = w.shape
    g = _spec_group(spec, k)
    kp = padded_size(k, g)
    n_groups = kp // g
    wg = _pad_cols(w, kp, replicate=True).view(n, n_groups, g)
    xg = _pad_cols(x, kp, replicate=False).view(-1, n_groups, g).permute(1, 0, 2)  # [G, T, g]
    h = torch.bmm(xg.transpose(1, 2), xg) / max(xg.shape[1], 1)  # [G, g, g]
    steps = int(max_shrink * grid + 1e-9)
    if n % oc_batch:
        oc_batch = 64
    best_all = []
    for start in range(0, n, oc_batch):
        wb = wg[start : start + oc_batch]  # [nb, G, g]
        m0 = wb.abs().amax(dim=-1)  # [nb, G]
        best_m = m0.clone()
        best_err = torch.full_like(m0, math.inf)
        for i in range(steps):
            m = m0 * (1 - i / grid)
            cw = torch.maximum(torch.minimum(wb, m[..., None]), -m[..., None])
            d = qdq_grouped(cw, spec.bits, spec.symmetric).sub_(wb).transpose(0, 1)  # [G, nb, g]
            err = (torch.bmm(d, h) * d).sum(dim=-1).T  # [nb, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_m = torch.where(better, m, best_m)
        best_all.append(best_m)
    best = torch.cat(best_all, dim=0)
    return torch.where(torch.isfinite(best), best, torch.full_like(best, math.inf))


def clamp_weight(weight: Tensor, m: Tensor, group_size: int) -> Tensor:
    """W clamped to ±m per (row, group) (m: [N, G]); returns a new tensor in W's dtype."""
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    kp = padded_size(k, g)
    if m.shape != (n, kp // g):
        raise CalibrationError(
            f"AWQ clip artifact has shape {tuple(m.shape)}, expected {(n, kp // g)} for a {n}×{k} weight "
            f"with group_size {group_size}",
            "the artifacts were made with a different quant.group_size or model",
        )
    mm = m.to(weight.device, torch.float32).repeat_interleave(g, dim=1)[:, :k]
    w = weight.float()
    return torch.maximum(torch.minimum(w, mm), -mm).to(weight.dtype)


# ------------------------------------------------------------------------------- folding
def _scaled_weight(name: str, ctx: BlockContext, groups: list[_Group], scales: dict[str, Tensor]) -> Tensor:
    """A linear's weight (fp32 copy) after all the block's scales are folded in."""
    w = ctx.linear(name).weight.detach().float().clone()
    for g in groups:
        s = scales.get(g.name)
        if s is None:
            continue
        s = s.to(w.device)
        if name in g.linears:
            w *= _expand(s, g)[None, :]
        if g.prev == name:
            w[-s.numel():] /= s[:, None]
    return w


@torch.no_grad()
def _fold(ctx: BlockContext, g: _Group, s: Tensor) -> None:
    prev = ctx.module(g.prev)
    s = s.detach().float().to(prev.weight.device).reshape(-1)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise CalibrationError(f"AWQ scale for {ctx.prefix}.{g.prev} has non-finite or non-positive entries")
    n = s.numel()
    if g.prev_kind == "norm":
        if prev.weight.shape != (n,):
            raise CalibrationError(f"AWQ scale for {ctx.prefix}.{g.prev} has {n} entries, norm has {tuple(prev.weight.shape)}")
        prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    else:
        if prev.weight.shape[0] < n:
            raise CalibrationError(f"AWQ scale for {ctx.prefix}.{g.prev} has {n} entries, more than its {prev.weight.shape[0]} outputs")
        w = prev.weight.float()
        w[-n:] /= s[:, None]
        prev.weight.copy_(w.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            b = prev.bias.float()
            b[-n:] /= s
            prev.bias.copy_(b.to(prev.bias.dtype))
    s_in = _expand(s, g)
    for name in g.linears:
        lin = ctx.linear(name)
        if lin.weight.shape[1] != s_in.numel():
            raise CalibrationError(
                f"AWQ scale for {ctx.prefix}.{g.prev} gives {s_in.numel()} input scales, "
                f"{name} has {lin.weight.shape[1]} inputs")
        lin.weight.copy_((lin.weight.float() * s_in[None, :]).to(lin.weight.dtype))


# ------------------------------------------------------------------------------- the pass
@register_pass
class AWQPass:
    name = "awq"

    def check(self, recipe, adapter, cfg) -> list[str]:
        p = recipe.passes.awq
        q = recipe.quant
        problems = []
        if q.w_bits > 8:
            problems.append(f"passes.awq: quant.w_bits={q.w_bits} > 8 is not weight quantization AWQ can help")
        if q.a_bits != 16:
            problems.append(f"passes.awq is weight-only (quant.a_bits=16), got a_bits={q.a_bits}")
        if p is None:
            return problems
        if p.grid < 1:
            problems.append(f"passes.awq.grid={p.grid} must be ≥ 1")
        if p.clip and p.clip_grid < 1:
            problems.append(f"passes.awq.clip_grid={p.clip_grid} must be ≥ 1")
        if not 0 <= p.max_shrink < 1:
            problems.append(f"passes.awq.max_shrink={p.max_shrink} must be in [0, 1)")
        if p.clip and p.n_sample_token < 1:
            problems.append(f"passes.awq.n_sample_token={p.n_sample_token} must be ≥ 1")
        if p.gqa_vo not in ("skip", "average"):
            problems.append(f"passes.awq.gqa_vo={p.gqa_vo!r} must be skip or average")
        elif p.gqa_vo == "average":
            try:
                a = adapter.attention(cfg)
                bp = adapter.block_plan(cfg)
            except Exception as e:  # an adapter without attention geometry
                problems.append(f"passes.awq.gqa_vo=average needs the attention geometry: {e}")
            else:
                v_out = bp.linears.get(a.v, (None,))[0]
                o_in = bp.linears.get(a.o, (None, None))[1]
                if v_out != o_in and (
                    a.num_heads % a.num_kv_heads
                    or v_out != a.num_kv_heads * a.head_dim
                    or o_in != a.num_heads * a.head_dim
                ):
                    problems.append(
                        f"passes.awq.gqa_vo=average: v_proj.out {v_out} / o_proj.in {o_in} do not match "
                        f"{a.num_kv_heads} KV heads × {a.head_dim} / {a.num_heads} heads × {a.head_dim}")
        return problems

    def search(self, ctx: BlockContext, pcfg, recipe) -> dict[str, Tensor]:
        spec = spec_from_recipe(recipe)
        quantized = _quantized_names(ctx, recipe)
        groups = [g for g in _groups(ctx, pcfg.gqa_vo) if any(n in quantized for n in g.linears)]
        # Each linear's input is recorded once, under its group's first linear (or itself).
        source = {}
        for g in groups:
            for n in g.linears:
                source.setdefault(n, g.linears[0])
        clip_names = [n for n in ctx.plan.linears if pcfg.clip and n in quantized and _clippable(n, ctx)]
        for n in clip_names:
            source.setdefault(n, n)
        names = sorted(set(source.values()), key=list(ctx.plan.linears).index)
        if not names:
            return {}
        k_of = {n: ctx.linear(n).weight.shape[1] for n in names}
        gram_names = {g.linears[0] for g in groups if _uses_gram(g, k_of[g.linears[0]])}
        loss_names = {g.linears[0] for g in groups} - gram_names
        inputs, loss_kw = _collect(ctx, names, loss_names, gram_names, LOSS_TOKENS,
                                   pcfg.n_sample_token if clip_names else 0)
        arts: dict[str, Tensor] = {}
        scales: dict[str, Tensor] = {}
        for g in groups:
            s = _search_group(ctx, g, inputs[g.linears[0]], loss_kw, pcfg, recipe, spec, quantized)
            scales[g.name] = s
            arts[f"{ctx.prefix}.{g.prev}.{SCALE_SUFFIX}"] = s.detach().float().cpu()
        for n in clip_names:
            x = inputs[source[n]].clip_tokens(pcfg.n_sample_token).to(ctx.device)
            for g in groups:
                if n in g.linears and g.name in scales:
                    x = x / _expand(scales[g.name].to(x.device), g)[None, :]
            w = _scaled_weight(n, ctx, groups, scales)
            arts[f"{ctx.prefix}.{n}.{CLIP_SUFFIX}"] = search_clip(
                w, x, spec, pcfg.clip_grid, pcfg.max_shrink).cpu()
        return arts

    @torch.no_grad()
    def apply(self, ctx: BlockContext, artifacts: dict[str, Tensor], pcfg, recipe) -> None:
        mine = {k for k in artifacts if k.endswith((f".{SCALE_SUFFIX}", f".{CLIP_SUFFIX}"))}
        used = set()
        for g in _groups(ctx, pcfg.gqa_vo if pcfg is not None else "skip", artifacts):
            key = f"{ctx.prefix}.{g.prev}.{SCALE_SUFFIX}"
            if key in artifacts:
                _fold(ctx, g, artifacts[key])
                used.add(key)
        group_size = recipe.quant.group_size
        for name in ctx.plan.linears:
            key = f"{ctx.prefix}.{name}.{CLIP_SUFFIX}"
            if key in artifacts:
                lin = ctx.linear(name)
                lin.weight.copy_(clamp_weight(lin.weight, artifacts[key], group_size))
                used.add(key)
        unused = sorted(mine - used)
        if unused:
            raise CalibrationError(
                f"AWQ artifacts for {ctx.prefix} name modules this block has no scale group or linear for: "
                + ", ".join(unused[:5]) + (" …" if len(unused) > 5 else ""),
                "the artifacts were made for a different model")
