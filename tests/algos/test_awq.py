"""AWQ pass (qtool/algos/awq.py): exact folding, pure search, quality against RTN on outlier
channels, NaN/Inf fallback, clipping against a brute-force reference, artifact replay, end to end.

Everything runs on tiny random Llama models (hidden 64) on the CPU in a few seconds."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from helpers import tiny_llama

from qtool.algos.awq import (
    CLIP_SUFFIX,
    _qdq,
    SCALE_SUFFIX,
    AWQPass,
    candidate_scale,
    qdq_grouped,
    search_clip,
    weight_mean,
)
from qtool.algos.base import get_pass
from qtool.calib.runner import walk_blocks
from qtool.models.base import adapter_for
from qtool.quant.qweight import QuantSpec, fake_quantize
from qtool.recipe import AWQCfg, Recipe

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: a second OpenMP thread only adds barrier waits on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _recipe(bits=4, group=32, **awq) -> Recipe:
    r = Recipe()
    r.quant.w_bits = bits
    r.quant.group_size = group
    r.passes.awq = AWQCfg(**awq)
    return r


def _ids(model, n=6, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, seqlen), generator=g)


def _walk(model, fn, ids=None, batch_size=4, only=None):
    """Run fn(ctx) inside the real block runner for every block (or block `only`)."""
    adapter = adapter_for(model.config)

    def process(ctx):
        if only is None or ctx.index == only:
            fn(ctx)

    walk_blocks(model, adapter, model.config, _ids(model) if ids is None else ids, process,
                device=CPU, batch_size=batch_size, offload=True)


def _sqnr(ref, y) -> float:
    return 20 * math.log10(ref.norm().item() / (ref - y).norm().item())


def _state(block):
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _rand_scale(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(0.7 * torch.randn(n, generator=g))


# --------------------------------------------------------------------------- folding is exact

GROUP_PREV = {
    "qkv": "input_layernorm",
    "v-o": "self_attn.v_proj",
    "gate-up": "post_attention_layernorm",
    "up-down": "mlp.up_proj",
}


@pytest.mark.parametrize("which", ["qkv", "v-o", "gate-up", "up-down", "all"])
def test_scale_folding_is_exact_in_fp(which):
    model = tiny_llama(heads=4, kv_heads=4, layers=1)  # no GQA: v→o is a plan group
    r = _recipe()
    awq = get_pass("awq")
    seen = []

    def check(ctx):
        assert [g.name for g in ctx.plan.groups] == ["qkv", "v-o", "gate-up", "up-down"]
        before = torch.cat(ctx.run_block())
        old = _state(ctx.block)
        widths = {"qkv": 64, "v-o": 64, "gate-up": 64, "up-down": 128}
        names = list(GROUP_PREV) if which == "all" else [which]
        arts = {f"{ctx.prefix}.{GROUP_PREV[n]}.{SCALE_SUFFIX}": _rand_scale(widths[n], i)
                for i, n in enumerate(names)}
        awq.apply(ctx, arts, r.passes.awq, r)
        after = torch.cat(ctx.run_block())
        torch.testing.assert_close(after, before, rtol=1e-4, atol=2e-5)
        new = ctx.block.state_dict()
        # the folds really happened (checked against the formulas, not the code under test)
        if "qkv" in names:
            s = arts[f"{ctx.prefix}.input_layernorm.{SCALE_SUFFIX}"]
            torch.testing.assert_close(new["input_layernorm.weight"], old["input_layernorm.weight"] / s)
            torch.testing.assert_close(new["self_attn.k_proj.weight"], old["self_attn.k_proj.weight"] * s)
        if "up-down" in names:
            s = arts[f"{ctx.prefix}.mlp.up_proj.{SCALE_SUFFIX}"]
            torch.testing.assert_close(new["mlp.down_proj.weight"], old["mlp.down_proj.weight"] * s)
            if "gate-up" not in names:
                torch.testing.assert_close(new["mlp.up_proj.weight"], old["mlp.up_proj.weight"] / s[:, None])
        seen.append(ctx.index)

    _walk(model, check)
    assert seen == [0]


def test_qwen2_bias_fold_is_exact():
    """v→o with a q/k/v-biased model: v_proj's bias is divided too."""
    model = tiny_llama(arch="qwen2", heads=4, kv_heads=4, layers=1)
    r = _recipe()

    def check(ctx):
        before = torch.cat(ctx.run_block())
        arts = {f"{ctx.prefix}.self_attn.v_proj.{SCALE_SUFFIX}": _rand_scale(64, 3),
                f"{ctx.prefix}.input_layernorm.{SCALE_SUFFIX}": _rand_scale(64, 4)}
        get_pass("awq").apply(ctx, arts, r.passes.awq, r)
        torch.testing.assert_close(torch.cat(ctx.run_block()), before, rtol=1e-4, atol=2e-5)

    _walk(model, check)


def test_gqa_head_averaged_vo_fold_is_exact():
    model = tiny_llama(heads=4, kv_heads=2, layers=1)  # head_dim 16, 2 query heads per KV head
    r = _recipe(gqa_vo="average")
    awq = get_pass("awq")

    def check(ctx):
        assert all(g.prev != "self_attn.v_proj" for g in ctx.plan.groups)  # dropped by the plan
        before = torch.cat(ctx.run_block())
        old = _state(ctx.block)
        s_kv = _rand_scale(32, 7)
        awq.apply(ctx, {f"{ctx.prefix}.self_attn.v_proj.{SCALE_SUFFIX}": s_kv}, r.passes.awq, r)
        torch.testing.assert_close(torch.cat(ctx.run_block()), before, rtol=1e-4, atol=2e-5)
        # o_proj column of query head h, dim d is scaled by s_kv of KV head h // 2, dim d
        s_o = torch.cat([s_kv[(h // 2) * 16:(h // 2 + 1) * 16] for h in range(4)])
        torch.testing.assert_close(ctx.block.self_attn.o_proj.weight, old["self_attn.o_proj.weight"] * s_o)
        torch.testing.assert_close(ctx.block.self_attn.v_proj.weight, old["self_attn.v_proj.weight"] / s_kv[:, None])

    _walk(model, check)


@pytest.mark.parametrize("kv_heads,gqa_vo", [(4, "skip"), (2, "average"), (2, "skip")])
def test_search_is_pure_and_search_apply_without_clip_is_exact(kv_heads, gqa_vo):
    model = tiny_llama(heads=4, kv_heads=kv_heads, layers=2)
    r = _recipe(gqa_vo=gqa_vo, grid=5, clip=True)
    awq = get_pass("awq")

    def check(ctx):
        before = torch.cat(ctx.run_block())
        old = _state(ctx.block)
        arts = awq.search(ctx, r.passes.awq, r)
        for k, v in ctx.block.state_dict().items():
            assert torch.equal(v, old[k]), f"search modified {k}"
        scales = {k: v for k, v in arts.items() if k.endswith(SCALE_SUFFIX)}
        clips = {k: v for k, v in arts.items() if k.endswith(CLIP_SUFFIX)}
        n_groups = 3 + (kv_heads == 4 or gqa_vo == "average")
        assert len(scales) == n_groups
        assert (f"{ctx.prefix}.self_attn.v_proj.{SCALE_SUFFIX}" in scales) == (n_groups == 4)
        for v in scales.values():
            assert torch.isfinite(v).all() and (v > 0).all()
        # q/k are not clipped; v, o, gate, up, down are
        assert sorted(k.split(".")[-2] for k in clips) == ["down_proj", "gate_proj", "o_proj", "up_proj", "v_proj"]
        # scales alone preserve the FP function
        awq.apply(ctx, scales, r.passes.awq, r)
        torch.testing.assert_close(torch.cat(ctx.run_block()), before, rtol=1e-4, atol=3e-5)

    _walk(model, check)


# --------------------------------------------------------------------------- quantizer / statistics

@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, False), (4, 128, False), (4, -1, True), (3, 32, True)])
def test_search_quantizer_matches_quantize_rtn_bit_for_bit(bits, group, sym):
    """The scale/clip searches use an in-place grouped quantizer: it must be the final quantizer."""
    w = torch.randn(48, 192) * torch.rand(48, 1)
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym, pad=True)  # 192 % 128 != 0: padded
    ref = fake_quantize(w, spec)
    r = _recipe(bits=bits, group=group)
    r.quant.symmetric, r.quant.pad = sym, True
    assert torch.equal(_qdq(w, r, spec), ref)
    g = 192 if group == -1 else group
    if 192 % g == 0:
        assert torch.equal(qdq_grouped(w.view(48, -1, g), bits, sym).reshape(48, 192), ref)


def test_weight_statistic_and_candidates_stay_finite():
    w = torch.randn(16, 64)
    w[:, :32] = 0  # an all-zero quantization group: 0 / (0 + 1e-6), not 0 / 0
    wm = weight_mean([w], QuantSpec(group_size=32))
    assert torch.isfinite(wm).all() and (wm[:32] == 0).all()
    # independent: per-row group max normalisation, then mean over rows
    g = w[:, 32:].abs()
    torch.testing.assert_close(wm[32:], (g / (g.amax(1, keepdim=True) + 1e-6)).mean(0))
    x = torch.rand(64)
    x[5] = 0
    for r in (0.0, 0.3, 0.95):
        s = candidate_scale(x, wm, r)
        assert torch.isfinite(s).all() and (s > 0).all()
        torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    x[7] = float("nan")
    assert torch.equal(candidate_scale(x, wm, 0.5), torch.ones(64))


def test_clip_search_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[:, 3] = 8.0  # an outlier weight per row: clipping it pays off for some rows
    x = torch.randn(40, 64, generator=g)
    spec = QuantSpec(bits=3, group_size=32)
    got = search_clip(w, x, spec, grid=20, max_shrink=0.5)
    assert got.shape == (6, 2)
    for n in range(6):
        for j in range(2):
            wg, xg = w[n, j * 32:(j + 1) * 32], x[:, j * 32:(j + 1) * 32]
            m0 = wg.abs().max()
            best, best_err = None, math.inf
            for i in range(10):
                m = m0 * (1 - i / 20)
                q = fake_quantize(wg.clamp(-m, m)[None], QuantSpec(bits=3, group_size=32))[0]
                err = ((xg @ wg - xg @ q) ** 2).mean().item()
                if err < best_err - 1e-9 * abs(best_err) or best is None:
                    best, best_err = m, err
            assert got[n, j].item() == pytest.approx(best.item(), rel=1e-6)
    assert (got[:, 0] < w[:, :32].abs().amax(1)).any()  # some outlier group was clipped


def test_clip_search_with_padding_groups():
    """K = 96 with group 64 (pad): the half-empty last group is searched over real channels only."""
    w = torch.randn(8, 96)
    x = torch.randn(30, 96)
    m = search_clip(w, x, QuantSpec(bits=4, group_size=64, pad=True))
    assert m.shape == (8, 2)
    assert (m[:, 1] <= w[:, 64:].abs().amax(1) + 1e-6).all()
    assert (m[:, 1] >= 0.55 * w[:, 64:].abs().amax(1) - 1e-6).all()


# --------------------------------------------------------------------------- quality vs RTN

def _outlier_model(seed=0):
    model = tiny_llama(heads=4, kv_heads=4, layers=1, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        blk = model.model.layers[0]
        for vec in (blk.input_layernorm.weight, blk.post_attention_layernorm.weight):
            idx = torch.randperm(64, generator=g)[:7]  # 10 % of the channels
            vec[idx] *= 10 + 40 * torch.rand(7, generator=g)  # × 10 … × 50
        rows = torch.randperm(128, generator=g)[:13]
        blk.mlp.up_proj.weight[rows] *= 10 + 40 * torch.rand(13, 1, generator=g)
    return model


def test_awq_beats_rtn_on_a_linear_with_outlier_input_channels():
    """down_proj sees ×10-×50 outliers on 10 % of its input channels (from up_proj rows): the AWQ
    scale of the up→down group gives a clearly better down_proj output than RTN."""
    model = _outlier_model()
    r = _recipe(bits=3, group=32, clip=False)
    spec = QuantSpec(bits=3, group_size=32)
    res = {}

    def check(ctx):
        xs = []
        ctx.collect(["mlp.down_proj"], lambda n, x: xs.append(x.reshape(-1, x.shape[-1]).clone()))
        x = torch.cat(xs)
        w = ctx.linear("mlp.down_proj").weight.detach().clone()
        ref = x @ w.T
        s = get_pass("awq").search(ctx, r.passes.awq, r)[f"{ctx.prefix}.mlp.up_proj.{SCALE_SUFFIX}"]
        res["rtn"] = _sqnr(ref, x @ fake_quantize(w, spec).T)
        res["awq"] = _sqnr(ref, (x / s) @ fake_quantize(w * s, spec).T)

    _walk(model, check)
    assert res["awq"] > res["rtn"] + 3.0, res  # ≥ 3 dB better (observed 14.3 → 20.7 dB)


def test_awq_beats_rtn_on_block_output():
    """Whole block, all seven linears quantized (W3 g32): AWQ (scales + clipping) then RTN beats RTN."""
    r = _recipe(bits=3, group=32)
    spec = QuantSpec(bits=3, group_size=32)
    res = {}
    for mode in ("rtn", "awq"):
        model = _outlier_model()

        def check(ctx, mode=mode):
            ref = torch.cat(ctx.run_block())
            if mode == "awq":
                p = get_pass("awq")
                p.apply(ctx, p.search(ctx, r.passes.awq, r), r.passes.awq, r)
            with torch.no_grad():
                for n in ctx.plan.linears:
                    lin = ctx.linear(n)
                    lin.weight.copy_(fake_quantize(lin.weight, spec))
            res[mode] = _sqnr(ref, torch.cat(ctx.run_block()))

        _walk(model, check)
    assert res["awq"] > res["rtn"] + 3.0, res  # observed 1.6 → 8.3 dB


def test_gram_loss_equals_forward_loss(monkeypatch):
    """Single-linear groups score candidates through Σ x xᵀ; the same search through real
    forwards of the linear (GRAM_MAX_K = 0) must pick the same scales."""
    import qtool.algos.awq as awq_mod

    model = _outlier_model()
    r = _recipe(bits=3, group=32, clip=False, grid=10)
    got = {}

    def check(ctx):
        got["gram"] = get_pass("awq").search(ctx, r.passes.awq, r)
        monkeypatch.setattr(awq_mod, "GRAM_MAX_K", 0)
        got["fwd"] = get_pass("awq").search(ctx, r.passes.awq, r)

    _walk(model, check)
    for k in ("model.layers.0.mlp.up_proj.awq_scale", "model.layers.0.self_attn.v_proj.awq_scale"):
        torch.testing.assert_close(got["gram"][k], got["fwd"][k])


# --------------------------------------------------------------------------- NaN / Inf

def test_non_finite_inputs_fall_back_to_unit_scales_with_a_warning(caplog):
    model = tiny_llama(heads=4, kv_heads=4, layers=1)
    r = _recipe(grid=4)
    out = {}

    def check(ctx):
        x = ctx.inputs[0].clone()
        x[0, 3, :] = float("inf")
        x[1, 5, 7] = float("nan")
        ctx.inputs[0] = x
        with caplog.at_level(logging.WARNING, logger="qtool.algos.awq"):
            arts = get_pass("awq").search(ctx, r.passes.awq, r)
        out["arts"] = arts
        get_pass("awq").apply(ctx, arts, r.passes.awq, r)
        out["finite"] = all(torch.isfinite(p).all() for p in ctx.block.parameters())
        out["notes"] = list(ctx.notes)

    _walk(model, check)
    scales = {k: v for k, v in out["arts"].items() if k.endswith(SCALE_SUFFIX)}
    assert len(scales) == 4 and all(torch.equal(v, torch.ones_like(v)) for v in scales.values())
    clips = [v for k, v in out["arts"].items() if k.endswith(CLIP_SUFFIX)]
    assert clips and all(torch.isfinite(v).all() for v in clips)
    assert out["finite"]
    msgs = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    for prev in ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"):
        assert any(f"model.layers.0.{prev}" in m and "scale 1" in m for m in msgs), (prev, msgs)
    assert len(out["notes"]) == 4


def test_inf_in_a_weight_falls_back_without_exception(caplog):
    model = tiny_llama(heads=4, kv_heads=4, layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("inf")
    r = _recipe(grid=3, clip=False)
    out = {}

    def check(ctx):
        with caplog.at_level(logging.WARNING, logger="qtool.algos.awq"):
            out["arts"] = get_pass("awq").search(ctx, r.passes.awq, r)

    _walk(model, check)
    s = out["arts"]["model.layers.0.mlp.up_proj.awq_scale"]
    assert torch.equal(s, torch.ones(128))
    assert any("mlp.up_proj" in rec.getMessage() for rec in caplog.records)


# --------------------------------------------------------------------------- check()

def test_check_rejects_unsupported_settings():
    model = tiny_llama()
    adapter = adapter_for(model.config)
    p = AWQPass()
    assert p.check(_recipe(), adapter, model.config) == []
    assert p.check(_recipe(gqa_vo="average"), adapter, model.config) == []
    r = _recipe()
    r.quant.w_bits = 16
    assert any("w_bits" in m for m in p.check(r, adapter, model.config))
    r = _recipe()
    r.quant.a_bits = 8
    assert any("a_bits" in m for m in p.check(r, adapter, model.config))
    assert any("gqa_vo" in m for m in p.check(_recipe(gqa_vo="mean"), adapter, model.config))
    assert any("max_shrink" in m for m in p.check(_recipe(max_shrink=1.0), adapter, model.config))


def test_apply_rejects_artifacts_of_another_model():
    model = tiny_llama(heads=4, kv_heads=4, layers=1)
    r = _recipe()

    def check(ctx):
        from qtool.errors import CalibrationError

        with pytest.raises(CalibrationError):
            get_pass("awq").apply(ctx, {f"{ctx.prefix}.input_layernorm.{SCALE_SUFFIX}": torch.ones(32)}, r.passes.awq, r)
        with pytest.raises(CalibrationError):
            get_pass("awq").apply(ctx, {f"{ctx.prefix}.mlp.nope.{SCALE_SUFFIX}": torch.ones(64)}, r.passes.awq, r)

    _walk(model, check)


# --------------------------------------------------------------------------- pipeline / CLI

def _write_recipe(path, model_dir, text, extra=""):
    path.write_text(
        f"""name: awq-tiny
model:
  path: {model_dir}
quant:
  w_bits: 4
  group_size: 32
layout: unpacked
passes:
  awq:
    grid: 5
calib:
  data: {text}
  n_samples: 6
  seqlen: 32
  batch_size: 4
eval:
  ppl: [{text}]
  seqlen: 64
{extra}"""
    )
    return path


def test_artifact_replay_reproduces_the_quantized_model(tiny_dir, tmp_path, monkeypatch):
    from qtool.pipeline import plan, run_quantize
    from qtool.recipe import load_recipe

    text = tmp_path / "text.txt"
    rfile = _write_recipe(tmp_path / "r.yaml", tiny_dir, text)
    arts_file = tmp_path / "awq.safetensors"
    r1 = load_recipe([rfile], [f"artifacts.save={arts_file}"])
    res1 = run_quantize(plan(r1, need_output=False), save=False)
    assert arts_file.is_file()
    from safetensors.torch import load_file

    saved = load_file(str(arts_file))
    for i in range(2):
        assert f"model.layers.{i}.input_layernorm.awq_scale" in saved
        assert f"model.layers.{i}.mlp.down_proj.awq_clip" in saved
        assert f"model.layers.{i}.self_attn.q_proj.awq_clip" not in saved

    def no_search(*a, **k):
        raise AssertionError("replay must not search")

    monkeypatch.setattr(AWQPass, "search", no_search)
    r2 = load_recipe([rfile], [f"artifacts.load={arts_file}"])
    res2 = run_quantize(plan(r2, need_output=False), save=False)
    sd1, sd2 = res1.model.state_dict(), res2.model.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k

    # and AWQ did change the result compared with plain RTN
    r3 = load_recipe([rfile], ["passes.awq=null"])
    sd3 = run_quantize(plan(r3, need_output=False), save=False).model.state_dict()
    assert not torch.equal(sd1["model.layers.0.mlp.down_proj.weight"], sd3["model.layers.0.mlp.down_proj.weight"])


def test_cli_quantize_and_eval_end_to_end(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from qtool.cli import app

    rfile = _write_recipe(tmp_path / "r.yaml", tiny_dir, tmp_path / "text.txt")
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["quantize", "-c", str(rfile), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["status"] == "ok"
    assert (out / "config.json").is_file()
    res = runner.invoke(app, ["eval", str(out), "--ppl", str(tmp_path / "text.txt"), "--seqlen", "64", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert "ppl" in json.dumps(ev)
    vals = [v for v in _floats(ev) if v > 1]
    assert vals and all(math.isfinite(v) for v in vals)


def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)
