"""QoQ projection smoothing of the down_proj inputs (`algorithms.md` §3.1, deepcompressor
``smooth proj`` with ``skips: qkv_proj, up_proj, out_proj``).

After rotation the block inputs (qkv/gate/up) are already outlier-free; what remains is the
down_proj input, the SwiGLU product. Per input channel j of down_proj:

    a_j = max_t |X[t, j]|                (down_proj input, every calibration token, fp32)
    b_j = max_n |W_down[n, j]|           (over all output rows)
    s_j = a_j^α / b_j^β                  (α = 0.3, β = 0.7 by default)
    s_j = 1 where it is 0; any NaN/Inf ⇒ all ones (deepcompressor's `get_smooth_scale` rule)

Fold (exact in FP: act(gate) ⊙ up is linear in each up channel): up_proj output rows (and bias)
``÷ s``, down_proj input columns ``× s``. The group is the adapter's scale group whose `prev` is a
linear and whose only linear is the MLP's down projection (not attention's o_proj).

Artifact: ``<prefix>.<up_proj>.smooth_proj_scale`` fp32 [intermediate_size].
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.algos.base import register_pass
from qtool.calib.runner import BlockContext
from qtool.errors import CalibrationError

SUFFIX = "smooth_proj_scale"


def smooth_scale(a: Tensor, b: Tensor, alpha: float, beta: float) -> Tensor:
    """s = a^α / b^β (fp32); 1 where 0; all ones if anything is NaN/Inf."""
    s = torch.ones_like(a, dtype=torch.float32)
    if alpha != 0:
        s = s * a.float().pow(alpha)
    if beta != 0:
        s = s / b.float().pow(beta)
    s = torch.where(s == 0, torch.ones_like(s), s)
    if not bool(torch.isfinite(s).all()):
        return torch.ones_like(s)
    return s


def proj_groups(plan, attention) -> list:
    """The scale groups projection smoothing acts on: linear → down_proj (never v → o)."""
    return [g for g in plan.groups if g.prev_kind == "linear" and attention.o not in g.linears]


@torch.no_grad()
def input_absmax(ctx: BlockContext, name: str) -> Tensor:
    """max_t |x[t, j]| of a linear's input over every calibration token (fp32)."""
    acc: dict[str, Tensor] = {}

    def fn(_, x):
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        acc["m"] = torch.maximum(acc["m"], m) if "m" in acc else m

    ctx.collect([name], fn)
    if "m" not in acc:
        raise CalibrationError(f"{ctx.prefix}.{name} was never called during calibration")
    return acc["m"]


@torch.no_grad()
def fold_proj_scale(prev, linears, s: Tensor) -> None:
    """prev's output rows (and bias) ÷ s, each linear's input columns × s."""
    s = s.detach().float().reshape(-1)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise CalibrationError("smooth_proj scale has non-finite or non-positive entries")
    if prev.weight.shape[0] != s.numel() or any(l.weight.shape[1] != s.numel() for l in linears):
        raise CalibrationError(
            f"smooth_proj scale has {s.numel()} entries; prev has {prev.weight.shape[0]} outputs, linears have "
            f"{[l.weight.shape[1] for l in linears]} inputs", "the artifacts were made for a different model")
    sp = s.to(prev.weight.device)
    prev.weight.copy_((prev.weight.float() / sp[:, None]).to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.copy_((prev.bias.float() / sp).to(prev.bias.dtype))
    for lin in linears:
        sl = s.to(lin.weight.device)
        lin.weight.copy_((lin.weight.float() * sl[None, :]).to(lin.weight.dtype))


@register_pass
class SmoothProjPass:
    name = "smooth_proj"

    def check(self, recipe, adapter, cfg) -> list[str]:
        p = recipe.passes.smooth_proj
        problems = []
        try:
            groups = proj_groups(adapter.block_plan(cfg), adapter.attention(cfg))
        except Exception as e:
            return [f"passes.smooth_proj needs the block plan: {e}"]
        if not groups:
            problems.append("passes.smooth_proj: the model has no linear → down_proj scale group")
        if p is not None:
            for k in ("alpha", "beta"):
                v = getattr(p, k)
                if v < 0:
                    problems.append(f"passes.smooth_proj.{k}={v} must be ≥ 0 (search codes are not implemented)")
        return problems

    def search(self, ctx: BlockContext, pcfg, recipe) -> dict[str, Tensor]:
        arts = {}
        for g in proj_groups(ctx.plan, ctx.attention):
            a = input_absmax(ctx, g.linears[0])
            b = torch.stack([ctx.linear(n).weight.detach().abs().amax(dim=0).float() for n in g.linears]).amax(0)
            arts[f"{ctx.prefix}.{g.prev}.{SUFFIX}"] = smooth_scale(a, b.to(a.device), pcfg.alpha, pcfg.beta).cpu()
        return arts

    def apply(self, ctx: BlockContext, artifacts: dict[str, Tensor], pcfg, recipe) -> None:
        for g in proj_groups(ctx.plan, ctx.attention):
            key = f"{ctx.prefix}.{g.prev}.{SUFFIX}"
            if key in artifacts:
                fold_proj_scale(ctx.module(g.prev), [ctx.linear(n) for n in g.linears], artifacts[key])
