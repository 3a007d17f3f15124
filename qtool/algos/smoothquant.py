"""SmoothQuant: migrate activation outliers into the weights before W8A8 (algorithms.md §2).

Per decoder block, for every scale group whose `prev` is a norm (Llama family: ``input_layernorm``
→ q/k/v and ``post_attention_layernorm`` → gate/up; ``o_proj`` and ``down_proj`` have no preceding
norm, are never smoothed, §2.2, and are still quantized W8A8 by the pipeline):

1. Statistics (§2.1). One forward over the block's cached FP inputs records, per channel j of the
   group's input (the input of its first linear), the running ``max|X_j|`` over every calibration
   token, in fp32. The weight statistic is ``max|W_j| = max over the group's linears and their
   output rows of |W[i, j]|``.
2. Smoothing factor (§2.2, ``smoothquant/smooth.py::smooth_ln_fcs``)::

       s_j = clamp( max|X_j|^α / max|W_j|^(1−α), min=1e-5 )

   Channels where this cannot be used get ``s_j = 1`` and a warning (algorithms.md §6 pitfall 1):
   a zero weight column (``0^(1−α)`` in the denominator), non-finite statistics, or a factor whose
   fold would overflow the model's dtype.
3. Fold (exact in floating point): norm ``γ ← γ / s`` (and its bias, if any), every linear of the
   group ``W[:, j] ← W[:, j] · s_j``. Biases of the group's linears (Qwen2 q/k/v) are untouched:
   they add to the output, which smoothing does not change.

α. ``passes.smoothquant.alpha``, or when it is ``None`` the model family's default from the HF
config (``default_alpha``), which ``check`` and ``search`` resolve the same way:

==========  =====  ==========================================================================
family      α      source (algorithms.md §2.2)
==========  =====  ==========================================================================
llama       0.85   SmoothQuant README / ``examples/ppl_eval.sh``: Llama-2-7B/13B and Llama-3-8B/70B
                   (Llama-2-70B uses 0.9: set ``passes.smoothquant.alpha=0.9`` for it);
                   deepcompressor ``scripts/smoothquant.sh`` the same
mistral     0.80   SmoothQuant README / ``ppl_eval.sh``: Mistral-7B (and Mixtral-8x7B); deepcompressor 0.8/0.2
qwen2       0.85   no published per-family value: deepcompressor's model-independent default
                   (``smoothquant-{dynamic,static}.yaml``: Manual α 0.85, β 0.15); Qwen2's block
                   is the Llama block (plus q/k/v biases)
other       0.50   SmoothQuant's own default (``smooth_lm(alpha=0.5)``, ``ppl_eval.py --alpha``)
==========  =====  ==========================================================================

The family is the config's ``model_type`` (``architectures`` as a fallback). In ``search`` the
config is read from the block itself (HF attention / MLP modules keep a reference to it); if the
block carries none, from ``model.path`` (config.json only); failing both, 0.5 with a warning.

α search (``passes.smoothquant.search: true``). For every α of ``grid`` and every smoothed group:
the group's linears get the weights ``Q_w(W·diag(s))`` (the recipe's own weight quantizer, int8
per-channel symmetric for W8A8) and their inputs ``Q_a(x / s)`` (int8: per-token dynamic; with
``quant.a_static`` the static per-tensor scale the pipeline will calibrate, which after smoothing is
exactly ``max_j(max|X_j| / s_j) / 127``); the group's ``inspect`` module (``self_attn`` with the
block's kwargs, ``mlp``) runs on the first ``LOSS_TOKENS`` calibration tokens (whole micro-batches)
and the fp32 MSE against its FP output is the loss. Only the group's own linears are quantized in
the search (AWQ's protocol). The lowest finite loss wins per group; no finite loss → the default α
and a warning. The block is restored exactly (same weight tensors, hooks removed) after every
candidate, even on error.

``quant.a_granularity=per_tensor`` without ``a_static`` is evaluated per token by qtool's
fake-quant model (``qtool.quant.fakequant``), so the search measures it per token too.

Artifacts (fp32, CPU), replayable by ``apply`` on their own::

    <prefix>.<group.name>.smooth_scale   [width of the group's input]   e.g. model.layers.3.qkv.smooth_scale
    <prefix>.<group.name>.smooth_alpha   0-d                             the α the scale was made with
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
from typing import Any, Optional

import torch
from torch import Tensor

from qtool.algos.base import register_pass
from qtool.calib.runner import BlockContext
from qtool.errors import CalibrationError
from qtool.models.base import ScaleGroup

log = logging.getLogger("qtool.algos.smoothquant")

SCALE_SUFFIX = "smooth_scale"
ALPHA_SUFFIX = "smooth_alpha"
MIN_SCALE = 1e-5  # SmoothQuant's clamp of s
# Tokens (whole calibration micro-batches, at least one) on which the α-search loss is measured.
# The activation statistic always uses every calibration token.
LOSS_TOKENS = 8192

# model_type → (α, where it comes from). See the module docstring.
FAMILY_ALPHA: dict[str, tuple[float, str]] = {
    "llama": (0.85, "SmoothQuant README/ppl_eval.sh: Llama-2-7B/13B, Llama-3"),
    "mistral": (0.8, "SmoothQuant README/ppl_eval.sh: Mistral-7B"),
    "qwen2": (0.85, "deepcompressor smoothquant default (Manual α 0.85); no published Qwen2 value"),
}
DEFAULT_ALPHA = (0.5, "SmoothQuant default smooth_lm(alpha=0.5)")
_ARCH_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


# ------------------------------------------------------------------------------- α
def default_alpha(cfg: Any) -> tuple[float, str]:
    """(α, source) for a HF config: by `model_type`, else by `architectures`, else 0.5."""
    if cfg is not None:
        mt = getattr(cfg, "model_type", None)
        if mt in FAMILY_ALPHA:
            return FAMILY_ALPHA[mt]
        for arch in getattr(cfg, "architectures", None) or []:
            if arch in _ARCH_FAMILY:
                return FAMILY_ALPHA[_ARCH_FAMILY[arch]]
    return DEFAULT_ALPHA


def resolve_alpha(pcfg: Any, cfg: Any) -> float:
    """The α a run uses: the recipe's, or the family default when the recipe leaves it None."""
    a = getattr(pcfg, "alpha", None) if pcfg is not None else None
    return float(a) if a is not None else default_alpha(cfg)[0]


def _block_config(block: torch.nn.Module) -> Any:
    """The HF config a decoder block (or one of its sub-modules) keeps a reference to, or None."""
    for m in block.modules():
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "model_type", None) is not None:
            return c
    return None


def _config_for(ctx: BlockContext, recipe) -> Any:
    cfg = _block_config(ctx.block)
    if cfg is not None:
        return cfg
    try:
        from qtool.io.hf import load_config, resolve_source

        return load_config(resolve_source(recipe.model.path), recipe.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 — only the default α depends on it
        _warn(ctx, f"SmoothQuant: cannot read the model config for the family α ({e}); using α 0.5")
        return None


def _warn(ctx: BlockContext, msg: str) -> None:
    log.warning(msg)
    ctx.notes.append(msg)


# ------------------------------------------------------------------------------- groups
def smoothed_groups(groups, quantized: Optional[set[str]] = None) -> list[ScaleGroup]:
    """The norm-preceded groups (the only ones SmoothQuant smooths), optionally only those with at
    least one quantized linear."""
    out = [g for g in groups if g.prev_kind == "norm"]
    if quantized is not None:
        out = [g for g in out if any(n in quantized for n in g.linears)]
    return out


def _quantized_names(ctx: BlockContext, recipe) -> set[str]:
    ignore = list(recipe.quant.ignore)
    return {
        n for n in ctx.plan.linears
        if not any(fnmatch.fnmatch(f"{ctx.prefix}.{n}", p) or f"{ctx.prefix}.{n}" == p for p in ignore)
    }


# ------------------------------------------------------------------------------- statistics
def weight_absmax(weights: list[Tensor]) -> Tensor:
    """max over all rows of all weights of |W[:, j]|, fp32 [K]."""
    out = None
    for w in weights:
        m = w.detach().abs().amax(dim=0).float()
        out = m if out is None else torch.maximum(out, m)
    return out


def smooth_scale(x_absmax: Tensor, w_absmax: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """s = clamp(x^α / w^(1−α), min=1e-5) in fp32, and the mask of channels forced to s = 1
    (zero weight column, non-finite statistic or non-finite result)."""
    x = x_absmax.float()
    w = w_absmax.to(x.device).float()
    s = (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=MIN_SCALE)
    bad = (w <= 0) | ~torch.isfinite(x) | ~torch.isfinite(w) | ~torch.isfinite(s)
    if alpha == 1.0:  # w^0 = 1 even for zero columns: the formula is defined there
        bad = ~torch.isfinite(x) | ~torch.isfinite(s)
    return torch.where(bad, torch.ones_like(s), s), bad


def _fold_safe(s: Tensor, norm_w: Tensor, weights: list[Tensor]) -> Tensor:
    """Channels whose folded norm weight or linear columns would not be finite in their dtype."""
    bad = ~torch.isfinite((norm_w.detach().float() / s).to(norm_w.dtype)).reshape(-1)
    for w in weights:
        bad |= ~torch.isfinite((w.detach().float().abs().amax(dim=0) * s).to(w.dtype))
    return bad


@torch.no_grad()
def _statistics(ctx: BlockContext, groups: list[ScaleGroup], cache_inspect: bool):
    """One block forward: per group the per-channel running max|x| (fp32) of its input and, when
    asked, the inspect module's inputs for the first LOSS_TOKENS tokens (whole micro-batches)."""
    first = {g.linears[0]: g.name for g in groups}
    inspect = {g.inspect: g.name for g in groups if g.inspect} if cache_inspect else {}
    xmax: dict[str, Tensor] = {}
    cached: dict[str, list[Tensor]] = {g.name: [] for g in groups}
    seen: dict[str, int] = {}

    def fn(name: str, x: Tensor) -> None:
        if name in first:
            g = first[name]
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            xmax[g] = m if g not in xmax else torch.maximum(xmax[g], m)
        if name in inspect:
            g = inspect[name]
            if seen.get(g, 0) < LOSS_TOKENS:
                cached[g].append(x.detach().clone())
                seen[g] = seen.get(g, 0) + x.numel() // x.shape[-1]

    names = list(dict.fromkeys(list(first) + list(inspect)))
    ctx.collect(names, fn)
    missing = [g.name for g in groups if g.name not in xmax]
    if missing:
        raise CalibrationError(f"SmoothQuant: block {ctx.prefix} never ran the linears of group(s) {', '.join(missing)}")
    return xmax, cached


def _compute_scale(ctx: BlockContext, g: ScaleGroup, x_absmax: Tensor, alpha: float, warn: bool = True) -> Tensor:
    lins = [ctx.linear(n) for n in g.linears]
    norm = ctx.module(g.prev)
    w_absmax = weight_absmax([lin.weight for lin in lins])
    s, bad = smooth_scale(x_absmax.to(w_absmax.device), w_absmax, alpha)
    overflow = _fold_safe(s, norm.weight, [lin.weight for lin in lins]) & ~bad
    if overflow.any():
        s = torch.where(overflow, torch.ones_like(s), s)
    if warn and (bad.any() or overflow.any()):
        why = []
        if bad.any():
            why.append(f"{int(bad.sum())} with a zero weight column or non-finite statistics")
        if overflow.any():
            why.append(f"{int(overflow.sum())} whose fold would overflow {norm.weight.dtype}")
        _warn(ctx, f"SmoothQuant: {ctx.prefix}.{g.prev} → {', '.join(g.linears)}: scale 1 on "
                   f"{' and '.join(why)} of {s.numel()} channels")
    return s


# ------------------------------------------------------------------------------- α search
def _fake_act(x: Tensor, static_scale: Optional[Tensor]) -> Tensor:
    from qtool.quant.activations import fake_quant_per_tensor, fake_quant_per_token

    return fake_quant_per_token(x) if static_scale is None else fake_quant_per_tensor(x, static_scale)


def _qdq_weight(w: Tensor, recipe) -> Tensor:
    from qtool.quant.weights import quantize_weight

    return quantize_weight(w, recipe).dequantize(torch.float32)


def _finite(y: Tensor) -> Tensor:
    fi = torch.finfo(y.dtype)
    return y.clamp(min=fi.min, max=fi.max)


@torch.no_grad()
def _search_group(ctx: BlockContext, g: ScaleGroup, x_absmax: Tensor, xs: list[Tensor], kws: list[dict],
                  grid: list[float], fallback: float, recipe, quantized: set[str]) -> tuple[Tensor, float]:
    """Best (s, α) of the grid by the inspect module's output MSE with the group W8A8-fake-quantized."""
    inspect = g.inspect
    lins = {n: ctx.linear(n) for n in g.linears}
    qnames = [n for n in g.linears if n in quantized]
    static = bool(recipe.quant.a_static)
    ref = [_finite(ctx.call(inspect, x, kw)).float() for x, kw in zip(xs, kws)]
    originals = {n: lins[n].weight.data for n in g.linears}
    best = (math.inf, None, None)
    losses = []
    for alpha in grid:
        s = _compute_scale(ctx, g, x_absmax, alpha, warn=False)
        s_dev = s.to(ctx.device)
        act_scale = (x_absmax.to(ctx.device).float() / s_dev).amax().clamp(min=1e-5) / 127 if static else None
        handles = []
        try:
            for n in g.linears:
                w = originals[n]
                ws = w.float() * s_dev[None, :]
                new = _qdq_weight(ws, recipe) if n in qnames else ws
                lins[n].weight.data = new.to(w.dtype)

                def pre(mod, args, _q=n in qnames):
                    x = (args[0].float() / s_dev).to(args[0].dtype)
                    return (_fake_act(x, act_scale) if _q else x,) + tuple(args[1:])

                handles.append(lins[n].register_forward_pre_hook(pre))
            sq, numel = 0.0, 0
            for x, kw, r in zip(xs, kws, ref):
                y = _finite(ctx.call(inspect, x, kw)).float()
                sq += (r - y).pow(2).sum().item()
                numel += r.numel()
            loss = sq / max(numel, 1)
        finally:
            for h in handles:
                h.remove()
            for n in g.linears:
                lins[n].weight.data = originals[n]
        losses.append(loss)
        if math.isfinite(loss) and loss < best[0]:
            best = (loss, s, alpha)
    log.debug("SmoothQuant %s.%s: losses %s", ctx.prefix, g.name,
              ", ".join(f"α{a:g}={l:.4g}" for a, l in zip(grid, losses)))
    if best[1] is None:
        _warn(ctx, f"SmoothQuant: no finite α-search loss for {ctx.prefix}.{g.name} "
                   f"(inspect {inspect}); using α {fallback:g}")
        return _compute_scale(ctx, g, x_absmax, fallback), fallback
    _compute_scale(ctx, g, x_absmax, best[2])  # warnings for the chosen scale only
    return best[1], best[2]


# ------------------------------------------------------------------------------- folding
@torch.no_grad()
def fold(ctx: BlockContext, g: ScaleGroup, s: Tensor) -> None:
    """γ ← γ / s (and β), each group linear's W[:, j] ← W[:, j]·s_j; computed in fp32."""
    norm = ctx.module(g.prev)
    s = s.detach().float().to(norm.weight.device).reshape(-1)
    where = f"{ctx.prefix}.{g.name}.{SCALE_SUFFIX}"
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise CalibrationError(f"SmoothQuant scale {where} has non-finite or non-positive entries")
    if norm.weight.shape != s.shape:
        raise CalibrationError(f"SmoothQuant scale {where} has {s.numel()} entries, "
                               f"{ctx.prefix}.{g.prev} has {tuple(norm.weight.shape)}",
                               "the artifacts were made for a different model")
    lins = [ctx.linear(n) for n in g.linears]
    for n, lin in zip(g.linears, lins):
        if lin.weight.shape[1] != s.numel():
            raise CalibrationError(f"SmoothQuant scale {where} has {s.numel()} entries, "
                                   f"{ctx.prefix}.{n} has {lin.weight.shape[1]} inputs",
                                   "the artifacts were made for a different model")
    new = [(norm.weight, (norm.weight.float() / s).to(norm.weight.dtype))]
    if getattr(norm, "bias", None) is not None:
        new.append((norm.bias, (norm.bias.float() / s).to(norm.bias.dtype)))
    for lin in lins:
        new.append((lin.weight, (lin.weight.float() * s[None, :]).to(lin.weight.dtype)))
    if not all(torch.isfinite(t).all() for _, t in new):
        raise CalibrationError(f"SmoothQuant scale {where} makes folded weights non-finite in "
                               f"{norm.weight.dtype}")
    for p, t in new:
        p.copy_(t)


# ------------------------------------------------------------------------------- the pass
@register_pass
class SmoothQuantPass:
    name = "smoothquant"

    def check(self, recipe, adapter, cfg) -> list[str]:
        p = recipe.passes.smoothquant
        problems = []
        if recipe.quant.a_bits != 8:
            problems.append(f"passes.smoothquant needs quant.a_bits=8, got {recipe.quant.a_bits}")
        if p is None:
            return problems
        if p.alpha is not None and not 0.0 <= p.alpha <= 1.0:
            problems.append(f"passes.smoothquant.alpha={p.alpha} must be in [0, 1]")
        if p.search:
            if not p.grid:
                problems.append("passes.smoothquant.search=true needs a non-empty passes.smoothquant.grid")
            bad = [a for a in p.grid if not 0.0 <= a <= 1.0]
            if bad:
                problems.append(f"passes.smoothquant.grid values {bad} must be in [0, 1]")
        try:
            bp = adapter.block_plan(cfg)
        except Exception as e:  # noqa: BLE001
            problems.append(f"passes.smoothquant needs the block plan: {e}")
            return problems
        groups = smoothed_groups(bp.groups)
        if not groups:
            problems.append("passes.smoothquant: the model's blocks have no norm → linear groups to smooth")
        for g in groups:
            if g.inspect is None and p.search:
                problems.append(f"passes.smoothquant.search: group {g.name} has no inspect module")
        if not problems:
            a = resolve_alpha(p, cfg)
            src = "recipe" if p.alpha is not None else default_alpha(cfg)[1]
            log.info("SmoothQuant α %g (%s)%s; groups: %s", a, src, ", searched per group" if p.search else "",
                     "; ".join(f"{g.prev} → {', '.join(g.linears)}" for g in groups))
        return problems

    def search(self, ctx: BlockContext, pcfg, recipe) -> dict[str, Tensor]:
        quantized = _quantized_names(ctx, recipe)
        groups = smoothed_groups(ctx.plan.groups, quantized)
        if not groups:
            return {}
        alpha = pcfg.alpha if pcfg.alpha is not None else default_alpha(_config_for(ctx, recipe))[0]
        xmax, cached = _statistics(ctx, groups, cache_inspect=bool(pcfg.search))
        arts: dict[str, Tensor] = {}
        for g in groups:
            if pcfg.search:
                xs = cached[g.name]
                kws = [kw for _, kw in itertools.islice(ctx.batches(), len(xs))]
                s, a = _search_group(ctx, g, xmax[g.name], xs, kws, list(pcfg.grid), alpha, recipe, quantized)
            else:
                s, a = _compute_scale(ctx, g, xmax[g.name], alpha), alpha
            arts[f"{ctx.prefix}.{g.name}.{SCALE_SUFFIX}"] = s.detach().float().cpu()
            arts[f"{ctx.prefix}.{g.name}.{ALPHA_SUFFIX}"] = torch.tensor(float(a), dtype=torch.float32)
        return arts

    @torch.no_grad()
    def apply(self, ctx: BlockContext, artifacts: dict[str, Tensor], pcfg, recipe) -> None:
        mine = {k for k in artifacts if k.startswith(ctx.prefix + ".")
                and k.endswith((f".{SCALE_SUFFIX}", f".{ALPHA_SUFFIX}"))}
        used = set()
        for g in smoothed_groups(ctx.plan.groups):
            key = f"{ctx.prefix}.{g.name}.{SCALE_SUFFIX}"
            if key in artifacts:
                fold(ctx, g, artifacts[key])
                used |= {key, f"{ctx.prefix}.{g.name}.{ALPHA_SUFFIX}"}
        unused = sorted(mine - used)
        if unused:
            raise CalibrationError(
                f"SmoothQuant artifacts for {ctx.prefix} name groups this block does not smooth: "
                + ", ".join(unused[:5]) + (" …" if len(unused) > 5 else ""),
                "the artifacts were made for a different model")
