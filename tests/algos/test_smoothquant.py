"""SmoothQuant pass (algorithms.md §2): family α, the scale formula by hand, exactness of the fold
(block and whole-model outputs unchanged in fp32), robustness (zero weight columns), α search
leaves the block untouched and prefers smoothing under outliers, W8A8 error with vs without
smoothing on outlier channels, artifact checks, and end to end through the pipeline."""

from __future__ import annotations

import copy
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from helpers import SAMPLE_TEXT, save_tiny, tiny_llama
from qtool.algos.base import get_pass
from qtool.algos.smoothquant import (
    ALPHA_SUFFIX,
    SCALE_SUFFIX,
    default_alpha,
    resolve_alpha,
    smooth_scale,
    weight_absmax,
)
from qtool.calib.runner import BlockContext, capture_block0_inputs, walk_blocks
from qtool.errors import CalibrationError, ConfigError, IncompatibleModelError
from qtool.models.base import adapter_for
from qtool.quant.activations import fake_quant_per_token
from qtool.quant.qweight import QuantSpec, fake_quantize
from qtool.recipe import QuantCfg, Recipe, SmoothQuantCfg, load_recipe

SQ = get_pass("smoothquant")
W8 = QuantSpec(8, -1, True)
CPU = torch.device("cpu")


def _recipe(alpha=None, search=False, grid=None, **quant) -> Recipe:
    r = Recipe()
    r.quant = QuantCfg(w_bits=8, group_size=-1, symmetric=True, a_bits=8, **quant)
    r.passes.smoothquant = SmoothQuantCfg(alpha=alpha, search=search, **({"grid": grid} if grid else {}))
    return r


def _ids(n=4, seqlen=24, seed=0):
    return torch.randint(3, 100, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _ctx0(model, ids, batch_size=2) -> BlockContext:
    adapter = adapter_for(model.config)
    hidden, kwargs, cb = capture_block0_inputs(model, adapter, ids, CPU, batch_size, offload=True)
    return BlockContext(
        index=0, prefix=adapter.block_prefix(0), block=adapter.blocks(model)[0],
        plan=adapter.block_plan(model.config), attention=adapter.attention(model.config),
        inputs=hidden, kwargs=kwargs, captured_batch=cb, device=CPU,
    )


def _inject_outliers(model, factor=30.0, frac=0.1, seed=0):
    """Scale ~10% of the norm weights' channels (torchao ToyLinearModel style): the inputs of
    q/k/v and gate/up get outlier channels."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    idx = torch.randperm(hidden, generator=g)[: max(1, int(frac * hidden))]
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[idx] *= factor
    return idx


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------- α


def test_family_default_alpha():
    from helpers import tiny_config

    assert default_alpha(tiny_config("llama"))[0] == 0.85
    assert default_alpha(tiny_config("mistral"))[0] == 0.8
    assert default_alpha(tiny_config("qwen2"))[0] == 0.85
    assert default_alpha(SimpleNamespace(model_type="gpt2"))[0] == 0.5
    assert default_alpha(None)[0] == 0.5
    # architectures are the fallback when model_type is unknown
    assert default_alpha(SimpleNamespace(model_type=None, architectures=["MistralForCausalLM"]))[0] == 0.8
    # the recipe wins over the family
    assert resolve_alpha(SmoothQuantCfg(alpha=0.6), tiny_config("llama")) == 0.6
    assert resolve_alpha(SmoothQuantCfg(), tiny_config("mistral")) == 0.8


@pytest.mark.parametrize("arch, expected", [("llama", 0.85), ("mistral", 0.8), ("qwen2", 0.85)])
def test_search_uses_family_alpha_from_the_block(arch, expected):
    model = tiny_llama(arch)
    ctx = _ctx0(model, _ids(2))
    arts = SQ.search(ctx, SmoothQuantCfg(), _recipe())
    assert arts[f"model.layers.0.qkv.{ALPHA_SUFFIX}"].item() == pytest.approx(expected)
    assert arts[f"model.layers.0.gate-up.{ALPHA_SUFFIX}"].shape == ()


def test_family_alpha_without_a_config_on_the_block(tiny_dir):
    from qtool.algos.smoothquant import _block_config, _config_for

    assert _block_config(torch.nn.Linear(2, 2)) is None
    model = tiny_llama("mistral")
    ctx = _ctx0(model, _ids(2))
    for m in ctx.block.modules():  # a block that keeps no config: α comes from model.path
        if hasattr(m, "config"):
            del m.config
    assert _block_config(ctx.block) is None
    r = _recipe()
    r.model.path = str(tiny_dir)  # a saved tiny *llama*
    assert _config_for(ctx, r).model_type == "llama"
    r.model.path = str(tiny_dir / "missing")
    assert _config_for(ctx, r) is None and any("α 0.5" in n for n in ctx.notes)


# ---------------------------------------------------------------------------- scale formula


def test_scale_formula_by_hand():
    x = torch.tensor([4.0, 1.0, 16.0, 9.0, 0.0])
    w = torch.tensor([1.0, 4.0, 4.0, 1.0, 2.0])
    s, bad = smooth_scale(x, w, 0.5)
    # sqrt(x) / sqrt(w); a zero activation channel hits the 1e-5 floor
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 2.0, 3.0, 1e-5]))
    assert not bad.any()
    s, _ = smooth_scale(torch.tensor([8.0, 1.0]), torch.tensor([1.0, 8.0]), 1 / 3)
    # 8^(1/3) / 1^(2/3) = 2;  1 / 8^(2/3) = 1/4
    torch.testing.assert_close(s, torch.tensor([2.0, 0.25]))
    # zero weight column and non-finite statistics → s = 1, flagged
    s, bad = smooth_scale(torch.tensor([4.0, float("nan"), float("inf"), 4.0]),
                          torch.tensor([0.0, 1.0, 1.0, 1.0]), 0.5)
    assert s.tolist() == [1.0, 1.0, 1.0, 2.0] and bad.tolist() == [True, True, True, False]
    # weight statistic: max over rows of all linears of |W|
    w1 = torch.tensor([[1.0, -5.0], [-3.0, 2.0]])
    w2 = torch.tensor([[-4.0, 0.5]])
    assert weight_absmax([w1, w2]).tolist() == [4.0, 5.0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_scale_matches_hand_computed_statistics(arch):
    model = tiny_llama(arch)
    _inject_outliers(model)
    ids = _ids(3)
    ctx = _ctx0(model, ids, batch_size=2)
    arts = SQ.search(ctx, SmoothQuantCfg(alpha=0.7), _recipe())
    blk = model.model.layers[0]
    with torch.no_grad():
        h = torch.cat(ctx.inputs, dim=0)  # block-0 inputs (embeddings), all micro-batches
        x1 = blk.input_layernorm(h).abs().reshape(-1, h.shape[-1]).amax(0)
        a = blk.self_attn
        w1 = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).abs().amax(0)
        # the MLP input: residual after attention, through post_attention_layernorm
        outs = [ctx.call("self_attn", blk.input_layernorm(x), kw) + x for x, kw in ctx.batches()]
        h2 = torch.cat(outs, dim=0)
        x2 = blk.post_attention_layernorm(h2).abs().reshape(-1, h.shape[-1]).amax(0)
        w2 = torch.cat([blk.mlp.gate_proj.weight, blk.mlp.up_proj.weight]).abs().amax(0)
    for name, x, w in (("qkv", x1, w1), ("gate-up", x2, w2)):
        expected = (x.pow(0.7) / w.pow(0.3)).clamp(min=1e-5)
        torch.testing.assert_close(arts[f"model.layers.0.{name}.{SCALE_SUFFIX}"], expected, rtol=1e-5, atol=0)
        assert arts[f"model.layers.0.{name}.{ALPHA_SUFFIX}"].item() == pytest.approx(0.7)
    assert len(arts) == 4


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothing_is_exact_in_fp32_for_the_block(arch):
    model = tiny_llama(arch)
    _inject_outliers(model)
    ctx = _ctx0(model, _ids(4))
    ref = ctx.run_block()
    before = _state(ctx.block)
    arts = SQ.search(ctx, SmoothQuantCfg(), _recipe())
    SQ.apply(ctx, arts, SmoothQuantCfg(), _recipe())
    out = ctx.run_block()
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    after = _state(ctx.block)
    # the fold really happened: norms and the smoothed linears changed, o/down did not
    for k in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
              "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):
        assert not torch.allclose(before[k], after[k]), k
    for k in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert torch.equal(before[k], after[k]), k
    if arch == "qwen2":  # biases add to the output: untouched
        for k in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
            assert torch.equal(before[k], after[k])
    # the fold is γ/s and W·s exactly as the artifact says
    s = arts[f"model.layers.0.qkv.{SCALE_SUFFIX}"]
    torch.testing.assert_close(after["input_layernorm.weight"], before["input_layernorm.weight"] / s)
    torch.testing.assert_close(after["self_attn.k_proj.weight"], before["self_attn.k_proj.weight"] * s)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothing_every_block_leaves_logits_unchanged(arch):
    model = tiny_llama(arch)
    _inject_outliers(model)
    ids = _ids(4, 32)
    with torch.no_grad():
        ref = model(ids).logits
    adapter = adapter_for(model.config)
    search = arch == "qwen2"  # the searched scales are folded the same way; search once, keep it fast
    grid = [0.5, 0.85]
    recipe, pcfg = _recipe(search=search, grid=grid), SmoothQuantCfg(search=search, grid=grid)
    n_arts = []

    def process(ctx):
        arts = SQ.search(ctx, pcfg, recipe)
        n_arts.append(len(arts))
        SQ.apply(ctx, arts, pcfg, recipe)

    walk_blocks(model, adapter, model.config, ids, process, device=CPU, batch_size=2, offload=True)
    assert n_arts == [4, 4]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_zero_weight_column_gets_scale_one_and_stays_exact():
    model = tiny_llama("llama")
    blk = model.model.layers[0]
    with torch.no_grad():
        for p in (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj):
            p.weight[:, 5] = 0
    ctx = _ctx0(model, _ids(2))
    ref = ctx.run_block()
    arts = SQ.search(ctx, SmoothQuantCfg(), _recipe())
    s = arts[f"model.layers.0.qkv.{SCALE_SUFFIX}"]
    assert s[5].item() == 1.0 and torch.isfinite(s).all() and (s != 1).sum() >= s.numel() - 1
    assert any("scale 1" in n and "zero weight column" in n for n in ctx.notes)
    SQ.apply(ctx, arts, SmoothQuantCfg(), _recipe())
    for r, o in zip(ref, ctx.run_block()):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- search


def test_search_leaves_the_block_unchanged():
    model = tiny_llama("qwen2")
    _inject_outliers(model)
    ctx = _ctx0(model, _ids(4))
    ref = ctx.run_block()
    before = _state(ctx.block)
    params_before = {k: v.data_ptr() for k, v in ctx.block.named_parameters()}
    grid = [0.3, 0.5, 0.8]
    arts = SQ.search(ctx, SmoothQuantCfg(search=True, grid=grid), _recipe(search=True, grid=grid))
    after = _state(ctx.block)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {k: v.data_ptr() for k, v in ctx.block.named_parameters()} == params_before
    for m in ctx.block.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    for r, o in zip(ref, ctx.run_block()):
        assert torch.equal(r, o)
    for g in ("qkv", "gate-up"):
        a = arts[f"model.layers.0.{g}.{ALPHA_SUFFIX}"].item()
        assert any(math.isclose(a, x, rel_tol=1e-6) for x in grid)


def test_search_prefers_smoothing_over_weight_only_migration_under_outliers():
    # α = 0 puts all the difficulty on the weights (s = 1/max|W|): the activation outliers stay
    # and per-token int8 of the q/k/v input loses the small channels; α = 0.5 must win.
    model = tiny_llama("llama")
    _inject_outliers(model, factor=100.0)
    ctx = _ctx0(model, _ids(4))
    grid = [0.0, 0.5]
    arts = SQ.search(ctx, SmoothQuantCfg(search=True, grid=grid), _recipe(search=True, grid=grid))
    assert arts[f"model.layers.0.qkv.{ALPHA_SUFFIX}"].item() == 0.5
    # the searched scale is the formula's scale for the chosen α
    plain = SQ.search(ctx, SmoothQuantCfg(alpha=0.5), _recipe(alpha=0.5))
    torch.testing.assert_close(arts[f"model.layers.0.qkv.{SCALE_SUFFIX}"],
                               plain[f"model.layers.0.qkv.{SCALE_SUFFIX}"])


# ------------------------------------------------------------------- quality on outliers


def _sqnr(ref, got):
    return 20 * math.log10(ref.norm() / (ref - got).norm())


def test_smoothing_beats_no_smoothing_on_a_linear_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    k, n, t = 256, 128, 512
    x = torch.randn(t, k, generator=g)
    outl = torch.randperm(k, generator=g)[: k // 10]
    x[:, outl] *= 30.0  # 10% of the input channels ×30
    w = torch.randn(n, k, generator=g) * 0.05
    ref = x @ w.T
    plain = fake_quant_per_token(x) @ fake_quantize(w, W8).T
    s, bad = smooth_scale(x.abs().amax(0), w.abs().amax(0), 0.5)
    assert not bad.any()
    smoothed_fp = (x / s) @ (w * s).T
    torch.testing.assert_close(smoothed_fp, ref, rtol=1e-4, atol=1e-3)  # exact before quantization
    smoothed = fake_quant_per_token(x / s) @ fake_quantize(w * s, W8).T
    q_plain, q_smooth = _sqnr(ref, plain), _sqnr(ref, smoothed)
    assert q_smooth > q_plain + 6.0, (q_plain, q_smooth)


def _w8a8_logits_error(model, ids, smooth: bool, static: bool = False) -> float:
    from qtool.quant.fakequant import install_activation_fake_quant

    model = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(ids).logits
    adapter = adapter_for(model.config)
    extra = {"a_granularity": "per_tensor", "a_static": True} if static else {}
    recipe = _recipe(alpha=0.5, **extra)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in adapter.block_plan(model.config).linears]
    scales = {}

    def process(ctx):
        if smooth:
            SQ.apply(ctx, SQ.search(ctx, recipe.passes.smoothquant, recipe), recipe.passes.smoothquant, recipe)
        if static:
            stats = {}
            ctx.collect(list(ctx.plan.linears), lambda n, x: stats.__setitem__(
                n, torch.maximum(stats.get(n, torch.tensor(0.0)), x.abs().amax())))
            for n, m in stats.items():
                scales[f"{ctx.prefix}.{n}"] = (m.clamp(min=1e-5) / 127).reshape(1)
        with torch.no_grad():
            for n in ctx.plan.linears:
                lin = ctx.linear(n)
                lin.weight.copy_(fake_quantize(lin.weight, W8))

    walk_blocks(model, adapter, model.config, ids, process, device=CPU, batch_size=2, offload=True)
    install_activation_fake_quant(model, names, scales or None)
    with torch.no_grad():
        return (model(ids).logits - ref).pow(2).mean().item()


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static-per-tensor"])
def test_w8a8_model_error_is_lower_with_smoothing(static):
    model = tiny_llama("llama", hidden=128, inter=256)
    _inject_outliers(model, factor=50.0)
    ids = _ids(4, 32)
    e_plain = _w8a8_logits_error(model, ids, smooth=False, static=static)
    e_smooth = _w8a8_logits_error(model, ids, smooth=True, static=static)
    assert e_smooth < 0.5 * e_plain, (e_plain, e_smooth)


# ------------------------------------------------------------------------------ artifacts


def test_apply_rejects_foreign_artifacts():
    model = tiny_llama("llama")
    ctx = _ctx0(model, _ids(2))
    arts = SQ.search(ctx, SmoothQuantCfg(), _recipe())
    before = _state(ctx.block)
    bad = dict(arts)
    bad["model.layers.0.qkv.smooth_scale"] = torch.ones(7)
    with pytest.raises(CalibrationError, match="7 entries"):
        SQ.apply(ctx, bad, SmoothQuantCfg(), _recipe())
    with pytest.raises(CalibrationError, match="non-positive"):
        SQ.apply(ctx, {**arts, "model.layers.0.qkv.smooth_scale": torch.zeros(64)}, SmoothQuantCfg(), _recipe())
    with pytest.raises(CalibrationError, match="does not smooth"):
        SQ.apply(ctx, {"model.layers.0.v-o.smooth_scale": torch.ones(64)}, SmoothQuantCfg(), _recipe())
    for k, v in _state(ctx.block).items():  # failed applies left nothing half-folded
        assert torch.equal(v, before[k])
    # replay: applying the artifacts to an identical fresh model gives identical weights
    SQ.apply(ctx, arts, SmoothQuantCfg(), _recipe())
    twin = tiny_llama("llama")
    ctx2 = _ctx0(twin, _ids(2))
    SQ.apply(ctx2, arts, None, _recipe())
    for k, v in _state(ctx.block).items():
        assert torch.equal(v, _state(ctx2.block)[k])


def test_plan_time_checks(tiny_dir, tmp_path):
    from qtool import pipeline

    base = [f"model.path={tiny_dir}", f"output.dir={tmp_path / 'o'}", "quant.w_bits=8", "quant.group_size=-1",
            "quant.symmetric=true", "quant.a_bits=8", "layout=unpacked"]
    p = pipeline.plan(load_recipe([], base + ["passes.smoothquant.alpha=0.7"]))
    assert "smoothquant" in p.summary()["passes"]
    with pytest.raises(IncompatibleModelError, match="alpha=1.5"):
        pipeline.plan(load_recipe([], base + ["passes.smoothquant.alpha=1.5"]))
    with pytest.raises(IncompatibleModelError, match="non-empty"):
        pipeline.plan(load_recipe([], base + ["passes.smoothquant.search=true", "passes.smoothquant.grid=[]"]))
    with pytest.raises(ConfigError, match="a_bits=8"):
        load_recipe([], base[:-2] + ["passes.smoothquant.alpha=0.5"])


# ----------------------------------------------------------------------------- end to end


def _layout():
    return "w8a8" if importlib.util.find_spec("qtool.layouts.w8a8") else "unpacked"


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_pipeline_end_to_end(tmp_path, static):
    from qtool import api, pipeline

    model = tiny_llama("qwen2")
    _inject_outliers(model)
    d = save_tiny(model, tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 40)
    ov = [f"model.path={d}", f"output.dir={tmp_path / 'out'}", f"calib.data={tmp_path / 'text.txt'}",
          "calib.n_samples=4", "calib.seqlen=32", "calib.batch_size=3", f"layout={_layout()}",
          "quant.w_bits=8", "quant.group_size=-1", "quant.symmetric=true", "quant.a_bits=8",
          "passes.smoothquant.grid=[0.5,0.85]"]
    if static:
        ov += ["quant.a_granularity=per_tensor", "quant.a_static=true"]
    else:
        ov += ["passes.smoothquant.search=true"]
    p = pipeline.plan(load_recipe([], ov + [f"artifacts.save={tmp_path / 'arts.safetensors'}"]))
    res = pipeline.run_quantize(p)
    assert sorted(res.artifacts) == sorted(
        f"model.layers.{i}.{g}.{suf}" for i in range(2) for g in ("qkv", "gate-up")
        for suf in (SCALE_SUFFIX, ALPHA_SUFFIX))
    ids = _ids(2, 40)
    with torch.no_grad():
        got = res.model(ids).logits
        fp = model(ids).logits
        loaded, _, info = api.load_target(str(res.output), "reference")
        back = loaded(ids).logits
    assert info["kind"] == "checkpoint"
    torch.testing.assert_close(back, got, rtol=1e-3, atol=1e-3)
    if not static:  # per-token W8A8 on a smoothed model stays close to FP (static: off-distribution ids)
        assert (got - fp).pow(2).mean() < 1e-2 * fp.pow(2).mean()
    # replay from the saved artifacts reproduces the same fake-quant model
    r2 = load_recipe([], ov + [f"output.dir={tmp_path / 'out2'}",
                                    f"artifacts.load={tmp_path / 'arts.safetensors'}"])
    res2 = pipeline.run_quantize(pipeline.plan(r2), save=False)
    with torch.no_grad():
        torch.testing.assert_close(res2.model(ids).logits, got, rtol=0, atol=0)
