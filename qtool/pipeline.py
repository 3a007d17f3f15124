"""The quantization pipeline: plan → load → calibrate block by block → pack → save.

`plan()` reads only config.json (and checks files and shapes); `run_quantize()` does the work.
Passes fold their artifacts into FP weights; then each linear is quantized, packed by the layout,
and its weight replaced by the exact dequantization of what the checkpoint holds, so the model
left in memory is the fake-quant model of the checkpoint.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from qtool.errors import ConfigError, IncompatibleModelError, LayoutError

log = logging.getLogger("qtool.pipeline")


@dataclass
class Plan:
    recipe: Any
    source: Any
    hf_config: Any
    adapter: Any
    block_plan: Any
    layout: Any
    linears: list[tuple[str, tuple[int, int]]]  # fqn, (N, K) of every linear to quantize
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def summary(self) -> dict:
        r = self.recipe
        return {
            "model": self.source.path,
            "model_kind": self.source.kind,
            "architecture": (getattr(self.hf_config, "architectures", None) or ["?"])[0],
            "adapter": self.adapter.name,
            "blocks": self.adapter.num_blocks(self.hf_config),
            "layout": f"{self.layout.name}@{self.layout.version}",
            "quant": {
                "w_bits": r.quant.w_bits,
                "group_size": r.quant.group_size,
                "symmetric": r.quant.symmetric,
                "scheme": r.quant.scheme,
                "a_bits": r.quant.a_bits,
                "kv_bits": r.quant.kv_bits,
                "pad": r.quant.pad,
            },
            "passes": [n for n, _ in _enabled(r)],
            "scale_groups": [
                f"{g.prev} → {', '.join(g.linears)}" for g in self.block_plan.groups
            ],
            "linears_per_block": {k: list(v) for k, v in self.block_plan.linears.items()},
            "n_linears": len(self.linears),
            "skipped": self.skipped,
            "notes": self.notes,
            "output": r.output.dir,
            "recipe_sha256": self.fingerprint,
        }


def _enabled(recipe):
    from qtool.algos.base import enabled_passes

    return enabled_passes(recipe)


def _ignored(fqn: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(fqn, p) or fqn == p for p in patterns)


def plan(recipe, *, need_output: bool = True) -> Plan:
    """Check model/recipe/layout compatibility and the output without reading weights or data."""
    from qtool.algos.base import get_pass
    from qtool.io.checkpoint import check_output_dir
    from qtool.io.hf import load_config, resolve_source
    from qtool.layouts.base import get_layout
    from qtool.models.base import adapter_for
    from qtool.quant.weights import spec_from_recipe
    from qtool.recipe import fingerprint

    source = resolve_source(recipe.model.path)
    cfg = load_config(source)
    adapter = adapter_for(cfg, recipe.model.adapter)
    bp = adapter.block_plan(cfg)
    layout = get_layout(recipe.layout)
    spec = spec_from_recipe(recipe)
    problems: list[str] = []
    linears, skipped = [], []
    for i in range(adapter.num_blocks(cfg)):
        for name, shape in bp.linears.items():
            fqn = f"{adapter.block_prefix(i)}.{name}"
            if _ignored(fqn, recipe.quant.ignore):
                skipped.append(f"{fqn}: matches quant.ignore")
                continue
            linears.append((fqn, shape))
    # Layout checks per distinct shape (identical blocks repeat the same shapes).
    by_shape: dict[tuple[int, int], list[str]] = {}
    for fqn, shape in linears:
        by_shape.setdefault(shape, []).append(fqn)
    for shape, fqns in by_shape.items():
        for prob in layout.check(shape, spec):
            names = sorted({f.split(".")[-1] for f in fqns})
            problems.append(f"{'/'.join(names)} [{shape[0]}×{shape[1]}]: {prob}")
    if problems:
        raise LayoutError(
            f"layout {layout.name} cannot hold {len(problems)} linear shape(s): " + "; ".join(problems)
        )
    for name, pcfg in _enabled(recipe):
        p = get_pass(name)
        if p is None:
            raise ConfigError(f"pass {name!r} is not available in this qtool build")
        problems.extend(p.check(recipe, adapter, cfg))
    if problems:
        raise IncompatibleModelError("; ".join(problems))
    if recipe.passes.rotation is not None:
        from qtool.algos.rotation import check_rotation

        rot_problems = check_rotation(adapter, cfg, recipe.passes.rotation)
        if rot_problems:
            raise IncompatibleModelError("rotation: " + "; ".join(rot_problems))
    if need_output:
        if not recipe.output.dir:
            raise ConfigError("output.dir is not set", "pass --output DIR or output.dir=DIR")
        out_problems = check_output_dir(Path(recipe.output.dir), recipe.output.overwrite)
        if out_problems:
            from qtool.errors import CheckpointError

            raise CheckpointError(out_problems[0])
    notes = list(bp.skipped)
    return Plan(recipe, source, cfg, adapter, bp, layout, linears, skipped, notes, fingerprint(recipe))


@dataclass
class QuantizeResult:
    output: Optional[Path]
    model: Any  # the fake-quant model left in memory
    tokenizer: Any
    files: dict
    timings: dict
    calib_sha256: str
    peak_rss_mb: float
    artifacts: dict


def _peak_rss_mb() -> float:
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def run_quantize(
    p: Plan,
    *,
    model=None,
    tokenizer=None,
    on_stage: Optional[Callable[[str], None]] = None,
    on_block: Optional[Callable[[int, int], None]] = None,
    save: bool = True,
) -> QuantizeResult:
    import torch

    from qtool.algos.base import get_pass
    from qtool.calib.data import calibration_blocks
    from qtool.calib.runner import resolve_device, walk_blocks
    from qtool.io.hf import load_model

    recipe = p.recipe
    stage = on_stage or (lambda s: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.calib.device)
    if model is None:
        stage("loading model")
        model, tokenizer = load_model(p.source, recipe.model.dtype, "cpu")
    timings["load_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    stage("preparing calibration data")
    calib = calibration_blocks(tokenizer, recipe.calib)
    timings["calib_data_s"] = time.perf_counter() - t1

    if recipe.passes.rotation is not None:
        stage("rotating the residual stream")
        from qtool.algos.rotation import apply_rotation

        apply_rotation(model, p.adapter, p.hf_config, recipe.passes.rotation, device=device)

    artifacts: dict[str, torch.Tensor] = {}
    replay: dict[str, torch.Tensor] = {}
    if recipe.artifacts.load:
        from safetensors.torch import load_file

        replay = load_file(recipe.artifacts.load)
    passes = [(name, pcfg, get_pass(name)) for name, pcfg in _enabled(recipe)]
    quantized = {fqn for fqn, _ in p.linears}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    metas: dict[str, dict] = {}
    static_scales: dict[str, torch.Tensor] = {}

    def process(ctx):
        for name, pcfg, ps in passes:
            prefix = ctx.prefix + "."
            mine = {k: v for k, v in replay.items() if k.startswith(prefix)}
            arts = mine if mine else ps.search(ctx, pcfg, recipe)
            ps.apply(ctx, arts, pcfg, recipe)
            artifacts.update({k: v.detach().cpu() for k, v in arts.items()})
        names = [n for n in ctx.plan.linears if f"{ctx.prefix}.{n}" in quantized]
        if recipe.quant.a_static:
            stats: dict[str, torch.Tensor] = {}

            def observe(name, x):
                m = x.detach().abs().amax().float().cpu()
                stats[name] = torch.maximum(stats.get(name, m), m)

            ctx.collect(names, observe)
            for n in names:
                static_scales[f"{ctx.prefix}.{n}"] = (stats[n].clamp(min=1e-5) / 127).reshape(1)
        hess = _collect_hessians(ctx, names) if recipe.quant.gptq is not None else {}
        for n in names:
            lin = ctx.linear(n)
            fqn = f"{ctx.prefix}.{n}"
            if n in hess:
                from qtool.quant.gptq import gptq_quantize

                qw = gptq_quantize(lin.weight.data, hess[n], recipe)
            else:
                qw = _quantize(lin.weight.data, recipe)
            if fqn in static_scales:
                qw.meta["input_scale"] = static_scales[fqn]
            tensors = p.layout.pack(qw)
            meta = p.layout.pack_meta(qw)
            back = p.layout.unpack(tensors, meta)
            lin.weight.data.copy_(back.dequantize(torch.float32).to(lin.weight.dtype))
            packed[fqn] = {k: v.cpu() for k, v in tensors.items()}
            metas[fqn] = meta

    t2 = time.perf_counter()
    stage("calibrating")
    walk_blocks(
        model,
        p.adapter,
        p.hf_config,
        calib.ids,
        process,
        device=device,
        batch_size=recipe.calib.batch_size,
        offload=recipe.calib.offload,
        propagate=recipe.calib.propagate,
        on_block=on_block,
    )
    timings["calibrate_s"] = time.perf_counter() - t2

    if recipe.artifacts.save and artifacts:
        from safetensors.torch import save_file

        Path(recipe.artifacts.save).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in artifacts.items()}, recipe.artifacts.save)

    # The fake-quant model also quantizes activations / KV cache as the recipe asks.
    if recipe.quant.a_bits == 8:
        from qtool.quant.fakequant import install_activation_fake_quant

        install_activation_fake_quant(model, sorted(quantized), static_scales or None)
    if recipe.quant.kv_bits == 4:
        from qtool.nn.kv4_attention import enable_kv4

        enable_kv4(model)

    files = {}
    out = None
    if save:
        t3 = time.perf_counter()
        stage("writing checkpoint")
        out, files = _save(p, model, tokenizer, packed, metas, calib)
        timings["save_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    return QuantizeResult(out, model, tokenizer, files, timings, calib.sha256, _peak_rss_mb(), artifacts)


def _quantize(weight, recipe):
    from qtool.quant.weights import quantize_weight

    return quantize_weight(weight, recipe)


def _collect_hessians(ctx, names):
    """H = 2/n Σ xᵀx per linear input (fp32), for GPTQ."""
    import torch

    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def acc(name, x):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        h = x2.T @ x2
        hs[name] = hs.get(name, 0) + h
        counts[name] = counts.get(name, 0) + x2.shape[0]

    ctx.collect(names, acc)
    return {n: 2 * hs[n] / counts[n] for n in hs}


def quantization_config(p: Plan, metas: dict) -> dict:
    r = p.recipe
    return {
        "quant_method": "qtool",
        "layout": p.layout.name,
        "layout_version": p.layout.version,
        "bits": r.quant.w_bits,
        "group_size": r.quant.group_size,
        "symmetric": r.quant.symmetric,
        "scheme": r.quant.scheme,
        "a_bits": r.quant.a_bits,
        "a_granularity": r.quant.a_granularity,
        "a_static": r.quant.a_static,
        "kv_bits": r.quant.kv_bits,
        "modules_to_not_convert": list(r.quant.ignore),
        "modules": metas,
    }


def _save(p: Plan, model, tokenizer, packed, metas, calib):
    import json
    import tempfile

    import qtool
    from qtool.io.checkpoint import write_checkpoint
    from qtool.recipe import to_yaml

    r = p.recipe
    tensors = {}
    for fqn, ts in packed.items():
        for suffix, t in ts.items():
            tensors[f"{fqn}.{suffix}"] = t
    state = model.state_dict()
    fp_dtype = None if r.output.fp_dtype == "auto" else getattr(__import__("torch"), r.output.fp_dtype)
    tied = p.adapter.tied_embeddings(p.hf_config) and getattr(model.config, "tie_word_embeddings", True)
    for name, t in state.items():
        owner = name.rsplit(".", 1)[0]
        if owner in packed and name.endswith(".weight"):
            continue
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.to(fp_dtype) if fp_dtype is not None and t.is_floating_point() else t
    qcfg = quantization_config(p, metas)
    export = getattr(p.layout, "hf_quantization_config", None)
    config = model.config.to_dict()
    config["quantization_config"] = export(r, metas) if export else qcfg
    config["use_cache"] = True
    extra = {
        "recipe.resolved.yaml": to_yaml(r),
        "qtool_quant.json": json.dumps(qcfg, indent=2, sort_keys=True),
    }
    with tempfile.TemporaryDirectory() as td:
        tokenizer.save_pretrained(td)
        copy = [f for f in Path(td).iterdir() if f.is_file()]
        res = write_checkpoint(
            r.output.dir,
            tensors,
            config,
            layout=f"{p.layout.name}@{p.layout.version}",
            overwrite=r.output.overwrite,
            shard_size=r.output.shard_size,
            extra_files=extra,
            copy_files=copy,
            manifest_extra={
                "recipe_sha256": p.fingerprint,
                "calib_sha256": calib.sha256,
                "seed": r.seed,
                "model_source": {"path": p.source.path, "kind": p.source.kind},
                "tool": f"qtool {qtool.__version__}",
            },
        )
    return res.path, res.files
