"""`qtool convert`: layout round trips through the canonical weight, exports, and refusals."""

import json

import pytest
import torch

from qtool import api, pipeline
from qtool.convert import convert, list_targets
from qtool.errors import ConfigError, LayoutError
from qtool.io.checkpoint import open_checkpoint
from qtool.recipe import load_recipe


@pytest.fixture
def quick_ckpt(tiny_dir, tmp_path):
    r = load_recipe([], [f"model.path={tiny_dir}", f"output.dir={tmp_path / 'quick'}",
                         f"calib.data={tmp_path / 'text.txt'}", "calib.n_samples=2", "calib.seqlen=32",
                         "layout=quick-w4a16", "quant.group_size=32"])
    return pipeline.run_quantize(pipeline.plan(r)).output


def _logits(path):
    ids = torch.arange(40).reshape(2, 20) % 100
    model, _, _ = api.load_target(str(path), "reference")
    with torch.no_grad():
        return model(ids).logits


def test_quick_to_awq_gemm_and_back_is_lossless(quick_ckpt, tmp_path):
    awq = tmp_path / "awq"
    res = convert(quick_ckpt, "awq-gemm", awq)
    assert res["format"] == "awq-gemm@1"
    cfg = json.loads((awq / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                   "modules_to_not_convert": ["lm_head"]}
    ck = open_checkpoint(awq)
    q = ck.load_tensors(["model.layers.0.self_attn.k_proj.qweight"])["model.layers.0.self_attn.k_proj.qweight"]
    assert q.dtype == torch.int32 and tuple(q.shape) == (64, 32 // 8)  # [K, N/8], unpadded N
    torch.testing.assert_close(_logits(awq), _logits(quick_ckpt), rtol=1e-5, atol=1e-5)
    back = tmp_path / "back"
    convert(awq, "quick-w4a16", back)
    a, b = open_checkpoint(quick_ckpt).load_tensors(), open_checkpoint(back).load_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_convert_refusals(quick_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="unknown conversion target"):
        convert(quick_ckpt, "gguf", tmp_path / "x")
    with pytest.raises(LayoutError, match="cannot be exported to QServe"):
        convert(quick_ckpt, "qserve", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    names = {t["name"] for t in list_targets()}
    assert {"quick-w4a16", "awq-gemm", "w8a8", "w4a8kv4", "unpacked", "qserve"} <= names


def _w8a8(model_dir, tmp_path, name):
    r = load_recipe([], [f"model.path={model_dir}", f"output.dir={tmp_path / name}",
                         f"calib.data={tmp_path / 'text.txt'}", "calib.n_samples=2", "calib.seqlen=32",
                         "layout=w8a8", "quant.w_bits=8", "quant.symmetric=true", "quant.group_size=-1",
                         "quant.a_bits=8"])
    return pipeline.run_quantize(pipeline.plan(r)).output


def test_qserve_w8a8_export_names(tiny_dir, tmp_path):
    out = _w8a8(tiny_dir, tmp_path, "w8")  # random-init norms are all ones
    res = convert(out, "qserve", tmp_path / "qs")
    assert res["format"] == "qserve-w8a8@1"
    names = set(json.loads((tmp_path / "qs" / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.down_proj.dequant_scale" in names
    assert not any(n.endswith("weight_scale") for n in names)
    assert json.loads((tmp_path / "qs" / "qserve_config.json").read_text()) == {"precision": "w8a8", "group_size": -1}


def test_qserve_export_needs_folded_norms(tmp_path):
    from helpers import SAMPLE_TEXT, save_tiny, tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(1.5)
    d = save_tiny(model, tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 40)
    out = _w8a8(d, tmp_path, "w8")
    with pytest.raises(LayoutError, match="norm weights"):
        convert(out, "qserve", tmp_path / "qs")
    assert not (tmp_path / "qs").exists()
