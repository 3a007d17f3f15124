"""Activation-aware channel reordering for per-group weight quantization (`algorithms.md` §3.5).

Metric ``inputs_absmax`` (deepcompressor ``InputsAbsMax``, index mode ``Sequential``): per input
channel of a linear, max_t |x[t, j]| over the calibration tokens; the permutation is the plain
ascending ``argsort`` (stable), so channels of similar salience share a quantization group.
Everything is applied offline as permutations, exact in floating point:

- **down_proj**: input columns ``W[:, idx]``, and the same permutation of the output rows (and
  biases) of every linear producing the down_proj input: the group's `prev` (up_proj) and its
  siblings in the norm scale group with the same output width (gate_proj, for SwiGLU's
  act(gate) ⊙ up).
- **o_proj** (per head, GQA-aware): the metric is reduced (max) over the query heads that share a
  KV head, one permutation `p_g` of head_dim channels per KV head g; o_proj's input columns of
  every query head h of group g are permuted by `p_g` and v_proj's output rows (and bias) of KV
  head g by the same `p_g` (query head h reads KV head h // (heads / kv_heads), HF `repeat_kv`).
- Residual-stream channels (qkv / gate / up inputs) are not reordered (deepcompressor
  ``skips: residual``).

Artifacts (int64, "new column j is old column idx[j]"):
``<prefix>.<down_proj>.reorder_index`` [intermediate] and ``<prefix>.<o_proj>.reorder_index``
[heads · head_dim] (absolute column indices; v_proj's row permutation is derived from it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.algos.base import register_pass
from qtool.calib.runner import BlockContext
from qtool.errors import CalibrationError

SUFFIX = "reorder_index"
METRICS = ("inputs_absmax",)


def _down_groups(plan, attention) -> list:
    return [g for g in plan.groups if g.prev_kind == "linear" and attention.o not in g.linears]


def producers(plan, group) -> list[str]:
    """Linears whose output rows must follow the group's input-channel permutation."""
    width = plan.linears[group.linears[0]][1]
    out = [group.prev]
    for g in plan.groups:
        if g.prev_kind == "norm" and group.prev in g.linears:
            out += [n for n in g.linears if n != group.prev and plan.linears[n][0] == width]
    return out


def head_index(metric: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """Absolute o_proj column index [heads·d]: per-KV-head argsort of the group-max metric."""
    d = metric.numel() // num_heads
    rep = num_heads // num_kv_heads
    m = metric.float().view(num_kv_heads, rep, d).amax(dim=1)
    rel = torch.argsort(m, dim=-1, stable=True)  # [kv, d]
    rel_q = rel.repeat_interleave(rep, dim=0)  # [heads, d]
    return (rel_q + torch.arange(num_heads, device=rel.device)[:, None] * d).reshape(-1).to(torch.int64)


def v_index_from_o(o_idx: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """v_proj row index [kv·d] from o_proj's column index; checks the query heads of a group agree."""
    d = o_idx.numel() // num_heads
    rep = num_heads // num_kv_heads
    rel = o_idx.view(num_heads, d) - torch.arange(num_heads, device=o_idx.device)[:, None] * d
    if bool((rel < 0).any()) or bool((rel >= d).any()):
        raise CalibrationError("o_proj reorder index permutes channels across heads")
    g = rel.view(num_kv_heads, rep, d)
    if not bool((g == g[:, :1]).all()):
        raise CalibrationError("o_proj reorder index differs between query heads that share a KV head")
    return (g[:, 0] + torch.arange(num_kv_heads, device=o_idx.device)[:, None] * d).reshape(-1)


def _check_perm(idx: Tensor, n: int, what: str) -> Tensor:
    idx = idx.to(torch.int64).reshape(-1)
    if idx.numel() != n or not torch.equal(torch.sort(idx).values, torch.arange(n, device=idx.device)):
        raise CalibrationError(f"reorder index for {what} is not a permutation of {n} channels",
                               "the artifacts were made for a different model")
    return idx


@torch.no_grad()
def permute_inputs(lin, idx: Tensor) -> None:
    lin.weight.copy_(lin.weight[:, idx.to(lin.weight.device)])


@torch.no_grad()
def permute_outputs(lin, idx: Tensor) -> None:
    i = idx.to(lin.weight.device)
    lin.weight.copy_(lin.weight[i])
    if getattr(lin, "bias", None) is not None:
        lin.bias.copy_(lin.bias[i])


@torch.no_grad()
def _input_absmax(ctx: BlockContext, names: list[str]) -> dict[str, Tensor]:
    acc: dict[str, Tensor] = {}

    def fn(name, x):
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        acc[name] = torch.maximum(acc[name], m) if name in acc else m

    ctx.collect(names, fn)
    missing = [n for n in names if n not in acc]
    if missing:
        raise CalibrationError(f"reorder: {ctx.prefix} never called {', '.join(missing)} during calibration")
    return acc


@register_pass
class ReorderPass:
    name = "reorder"

    def check(self, recipe, adapter, cfg) -> list[str]:
        p = recipe.passes.reorder
        problems = []
        if p is not None and p.metric not in METRICS:
            problems.append(f"passes.reorder.metric={p.metric!r} must be one of {', '.join(METRICS)}")
        try:
            a = adapter.attention(cfg)
            bp = adapter.block_plan(cfg)
        except Exception as e:
            return problems + [f"passes.reorder needs the block plan and attention geometry: {e}"]
        if a.num_heads % a.num_kv_heads:
            problems.append(f"passes.reorder: {a.num_heads} heads not a multiple of {a.num_kv_heads} KV heads")
        if bp.linears.get(a.o, (0, 0))[1] != a.num_heads * a.head_dim:
            problems.append(f"passes.reorder: o_proj input width is not {a.num_heads} heads × {a.head_dim}")
        return problems

    def search(self, ctx: BlockContext, pcfg, recipe) -> dict[str, Tensor]:
        a = ctx.attention
        groups = _down_groups(ctx.plan, a)
        names = [g.linears[0] for g in groups] + [a.o]
        stats = _input_absmax(ctx, names)
        arts = {}
        for g in groups:
            for n in g.linears:
                arts[f"{ctx.prefix}.{n}.{SUFFIX}"] = torch.argsort(stats[g.linears[0]], stable=True).cpu()
        arts[f"{ctx.prefix}.{a.o}.{SUFFIX}"] = head_index(stats[a.o], a.num_heads, a.num_kv_heads).cpu()
        return arts

    def apply(self, ctx: BlockContext, artifacts: dict[str, Tensor], pcfg, recipe) -> None:
        a = ctx.attention
        for g in _down_groups(ctx.plan, a):
            key = f"{ctx.prefix}.{g.linears[0]}.{SUFFIX}"
            if key not in artifacts:
                continue
            for n in g.linears[1:]:
                other = artifacts.get(f"{ctx.prefix}.{n}.{SUFFIX}")
                if other is None or not torch.equal(other.to(torch.int64), artifacts[key].to(torch.int64)):
                    raise CalibrationError(f"reorder: {ctx.prefix} linears of one group need the same index")
            idx = _check_perm(artifacts[key], ctx.plan.linears[g.linears[0]][1], f"{ctx.prefix}.{g.linears[0]}")
            for n in g.linears:
                permute_inputs(ctx.linear(n), idx)
            for n in producers(ctx.plan, g):
                permute_outputs(ctx.linear(n), idx)
        key = f"{ctx.prefix}.{a.o}.{SUFFIX}"
        if key in artifacts:
            o_idx = _check_perm(artifacts[key], a.num_heads * a.head_dim, f"{ctx.prefix}.{a.o}")
            v_idx = v_index_from_o(o_idx, a.num_heads, a.num_kv_heads)
            permute_inputs(ctx.linear(a.o), o_idx)
            permute_outputs(ctx.linear(a.v), v_idx)
