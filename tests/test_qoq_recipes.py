"""The shipped QoQ W4A8KV4 recipes (`recipes/qoq-w4a8kv4-g128.yaml`, `recipes/qoq-w4a8kv4-chn.yaml`):
they parse to the QoQ settings, plan, and run end to end on a tiny GQA Llama (small calibration),
the packed checkpoint computes what the in-memory fake-quant model computes, and it exports to QServe.
Real-model numbers: docs/benchmarks.md ("QoQ W4A8KV4 on SmolLM2-135M").
"""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtool import api, pipeline
from qtool.cli import app
from qtool.io.checkpoint import open_checkpoint
from qtool.layouts.w4a8kv4 import W4A8KV4Layout
from qtool.nn.kv4_attention import kv4_enabled
from qtool.quant.weights import spec_from_recipe
from qtool.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "g128": ROOT / "recipes" / "qoq-w4a8kv4-g128.yaml",
    "chn": ROOT / "recipes" / "qoq-w4a8kv4-chn.yaml",
}
runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny_dir(tmp_path):
    """The tiny GQA Llama (hidden 64, 4 heads / 2 KV heads, head_dim 16) with non-trivial RMSNorm
    weights, so that "every norm is folded" (needed by the QServe export) is tested, not given."""
    from helpers import SAMPLE_TEXT, save_tiny, tiny_llama

    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    d = save_tiny(model, tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 40)
    return d


def _small(tiny_dir, tmp_path, out="out"):
    """Overrides that point a shipped recipe at the tiny model with a small calibration set."""
    return [f"model.path={tiny_dir}", f"output.dir={tmp_path / out}", f"calib.data={tmp_path / 'text.txt'}",
            "calib.n_samples=4", "calib.seqlen=32", "calib.batch_size=2"]


@pytest.mark.parametrize("name", ["g128", "chn"])
def test_recipe_parses_to_qoq_settings(name):
    r = load_recipe([RECIPES[name]], [])
    q, ps = r.quant, r.passes
    assert r.name == f"qoq-w4a8kv4-{name}" and r.layout == "w4a8kv4"
    assert (q.w_bits, q.symmetric, q.scheme, q.a_bits, q.a_granularity, q.a_static, q.kv_bits) == \
        (4, False, "progressive", 8, "per_token", False, 4)
    assert q.gptq is not None and (q.gptq.damp, q.gptq.block_size) == (0.01, 128)
    assert ps.rotation is not None and ps.rotation.kind == "hadamard" and ps.rotation.per_head_vo
    assert (ps.smooth_attention.alpha, ps.smooth_attention.beta) == (0.5, 0.0)
    assert ps.awq is None and ps.smoothquant is None
    assert r.eval.ppl == ["bundled"] and r.eval.seqlen == 2048
    assert r.calib.data == "bundled" and r.calib.seqlen == 1024
    if name == "g128":
        assert (q.group_size, q.pad) == (128, True)
        assert ps.reorder is not None
        assert (ps.smooth_proj.alpha, ps.smooth_proj.beta) == (0.3, 0.7)  # deepcompressor qoq-g128
    else:
        assert q.group_size == -1
        assert ps.reorder is None  # reordering only helps per-group quantization
        assert (ps.smooth_proj.alpha, ps.smooth_proj.beta) == (0.1, 0.9)  # deepcompressor qoq-gchn


@pytest.mark.parametrize("name", ["g128", "chn"])
def test_recipe_plans_on_tiny_model(name, tiny_dir, tmp_path):
    r = _cli("quantize", "-c", RECIPES[name], *_small(tiny_dir, tmp_path), "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert plan["layout"] == "w4a8kv4@1" and plan["n_linears"] == 14
    want = ["reorder", "smooth_attention", "smooth_proj"] if name == "g128" else ["smooth_attention", "smooth_proj"]
    assert [p for p in plan["passes"] if p != "rotation"] == want  # rotation is a model-level transform
    assert plan["quant"]["group_size"] == (128 if name == "g128" else -1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["g128", "chn"])
def test_recipe_plans_on_smollm2_shapes(name, tmp_path):
    """SmolLM2-135M's K = 576 (not a multiple of 128): g128 plans with K padded to 640 (reads config only)."""
    from qtool.assets import assets_status

    if not assets_status()["models"]["smollm2-135m"]["present"]:
        pytest.skip("SmolLM2-135M is not fetched (qtool assets fetch)")
    p = pipeline.plan(load_recipe([RECIPES[name]], [f"output.dir={tmp_path / 'out'}"]))
    assert len(p.linears) == 210
    qweight_shape = p.layout.tensors((576, 576), spec_from_recipe(p.recipe))["qweight"][0]
    assert qweight_shape == (576, (640 if name == "g128" else 576) // 2)


def _capture_linear_inputs(model, names, ids):
    """Raw inputs of the named linears (before the activation fake-quant hook), one forward."""
    caps, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: caps.setdefault(n, a[0].detach().clone()), prepend=True))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return caps


@pytest.mark.parametrize("name", ["g128", "chn"])
def test_recipe_end_to_end_on_tiny_model(name, tiny_dir, tmp_path):
    r = load_recipe([RECIPES[name]], _small(tiny_dir, tmp_path))
    res = pipeline.run_quantize(pipeline.plan(r))
    fake = res.model
    packed, _, info = api.load_target(str(res.output), "reference")
    assert info["layout"] == "w4a8kv4@1"
    assert kv4_enabled(fake) and kv4_enabled(packed)  # both quantize the KV cache (QServe KV4)

    # 1. Every packed linear dequantizes to exactly the in-memory weight.
    ck = open_checkpoint(res.output)
    metas = json.loads((res.output / "qtool_quant.json").read_text())["modules"]
    assert len(metas) == 14
    tensors = ck.load_tensors()
    for fqn, meta in metas.items():
        own = {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".") and "." not in k[len(fqn) + 1:]}
        w = W4A8KV4Layout().unpack(own, meta).dequantize(torch.float32)
        assert torch.equal(w, fake.get_submodule(fqn).weight.data), fqn
        assert meta["group_size"] == (128 if name == "g128" else -1) and meta["qserve_compatible"]
        if name == "g128":  # tiny K = 64 is padded to one group of 128
            assert meta["padded_in_features"] % 128 == 0

    # 2. The runtime W4A8 linears (int8 activations x int4 weights, integer GEMM) equal the fake-quant
    #    linears (int8 fake-quant input, dequantized weight) on the same real inputs, to fp32 round-off.
    ids = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    caps = _capture_linear_inputs(fake, list(metas), ids)
    with torch.no_grad():
        for fqn in metas:
            mod = packed.get_submodule(fqn)
            assert type(mod).__name__ == "W4A8Linear", fqn
            torch.testing.assert_close(mod(caps[fqn]), fake.get_submodule(fqn)(caps[fqn]), rtol=1e-5, atol=1e-5)

    # 3. Whole-model logits. The two models sum in different orders (integer GEMM + fp32 epilogue vs an
    #    fp32 matmul of dequantized values), so an activation or key/value within ~1e-7 of an int8 / KV4
    #    rounding boundary can land on the other side; such a flip moves the logits of its position and
    #    the later positions of its sequence by up to ~1e-2 (measured; KV4 itself moves them by ~4e-2).
    #    Flips are rare (at most one of 8 sequences over many seeds), while a wiring mistake (a module,
    #    norm, embedding or lm_head that differs) changes every sequence. So: at least 6 of the 8
    #    sequences agree to fp32 round-off at every position, and no position is far off.
    with torch.no_grad():
        got, ref = packed(ids).logits, fake(ids).logits
    per_pos = (got - ref).abs().amax(-1)  # [8 sequences, 16 positions]
    exact_rows = int((per_pos <= 1e-5).all(dim=1).sum())
    assert exact_rows >= 6, per_pos
    assert per_pos.max() <= 5e-2, per_pos.max()

    # 4. Rotation folded every norm (QServe ignores norm weights), so the QServe export succeeds.
    from safetensors.torch import load_file

    src = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.all(v == 1) for k, v in src.items() if "norm" in k)
    assert all(torch.all(v == 1) for k, v in tensors.items() if "norm" in k and k.endswith(".weight"))
    out = _cli("convert", res.output, "--to", "qserve", "-o", tmp_path / "qserve", "--json")
    assert out.exit_code == 0, out.output
    flags = json.loads((tmp_path / "qserve" / "qserve_config.json").read_text())
    assert flags == {"precision": "w4a8kv4", "group_size": 128 if name == "g128" else -1}
    names = set(json.loads((tmp_path / "qserve" / "model.safetensors.index.json").read_text())["weight_map"])
    suffixes = {"qweight", "s1_scales"} | ({"s2_scales", "s2_zeros"} if name == "g128" else {"s1_szeros"})
    assert {f"model.layers.0.mlp.down_proj.{s}" for s in suffixes} <= names
