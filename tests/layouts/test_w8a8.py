"""w8a8 layout (compressed-tensors int-quantized names): hand-computed codes and scales, exact
round trips, fp16/bf16 weight-scale rounding, static input_scale (fp32), plan-time checks, the
quantization_config dict of algorithms.md §4e, and the QServe W8A8 renaming (§4c)."""

from __future__ import annotations

import pytest
import torch

from qtool.errors import LayoutError
from qtool.layouts.base import get_layout
from qtool.layouts.w8a8 import (
    W8A8Layout,
    compressed_tensors_config,
    compressed_tensors_version,
    ignore_list,
    to_qserve_w8a8,
)
from qtool.quant.qweight import QuantizedWeight, QuantSpec, quantize_rtn

LAYOUT = W8A8Layout()
SPEC = QuantSpec(bits=8, group_size=-1, symmetric=True)


def rand_qw(n: int, k: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    return quantize_rtn(torch.randn(n, k, generator=g) * 0.05, SPEC)


# ------------------------------------------------------------------------------ values by hand


def test_pack_hand_values():
    # Row absmaxes are 127·2^-3 and 127·2^-5: scales 2^-3 and 2^-5 are exact in fp32 and fp16,
    # so every code is known exactly (w / s is an integer, the absmax element gives ±127).
    w = torch.tensor(
        [[127.0, -64.0, 1.0, 0.0], [3.0, -127.0, 50.0, -2.0]]
    ) * torch.tensor([[2.0**-3], [2.0**-5]])
    packed = LAYOUT.pack(quantize_rtn(w, SPEC))
    assert set(packed) == {"weight", "weight_scale"}
    assert packed["weight"].dtype == torch.int8 and packed["weight"].shape == (2, 4)
    assert packed["weight"].tolist() == [[127, -64, 1, 0], [3, -127, 50, -2]]
    assert packed["weight_scale"].dtype == torch.float16
    assert packed["weight_scale"].shape == (2, 1)
    assert packed["weight_scale"].tolist() == [[0.125], [0.03125]]


def test_scale_is_rounded_to_fp16_and_unpack_returns_the_rounded_value():
    # 0.1 / 127 is not representable in fp16: the stored value is its fp16 rounding, and the
    # canonical weight after unpack computes with exactly that number.
    w = torch.tensor([[0.1, -0.05, 0.0]])
    qw = quantize_rtn(w, SPEC)
    packed = LAYOUT.pack(qw)
    s16 = torch.tensor(0.1 / 127, dtype=torch.float16)
    assert packed["weight_scale"].item() == s16.item()
    back = LAYOUT.unpack(packed, LAYOUT.pack_meta(qw))
    assert back.scale.dtype == torch.float32 and back.scale.shape == (1, 1)
    assert back.scale.item() == float(s16)
    assert back.codes.tolist() == [[127, -64, 0]]  # -0.05 / (0.1/127) = -63.5 → -64 (half to even)
    assert torch.equal(back.dequantize(), torch.tensor([[127.0, -64.0, 0.0]]) * float(s16))


def test_bf16_scales():
    lay = W8A8Layout(torch.bfloat16)
    qw = rand_qw(8, 16)
    packed = lay.pack(qw)
    assert packed["weight_scale"].dtype == torch.bfloat16
    assert torch.equal(packed["weight_scale"].float(), qw.scale.to(torch.bfloat16).float())
    assert lay.pack_meta(qw)["scale_dtype"] == "bfloat16"
    back = lay.unpack(packed, lay.pack_meta(qw))
    assert torch.equal(back.scale, qw.scale.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (192, 576), (576, 576), (64, 128)])
def test_round_trip_exact(shape):
    qw = rand_qw(*shape, seed=shape[0] * 7 + shape[1])
    packed = LAYOUT.pack(qw)
    meta = LAYOUT.pack_meta(qw)
    assert meta == {
        "bits": 8,
        "group_size": -1,
        "in_features": shape[1],
        "out_features": shape[0],
        "scale_dtype": "float16",
        "static_input": False,
    }
    back = LAYOUT.unpack(packed, meta)
    assert torch.equal(back.codes, qw.codes)
    assert back.zero is None and back.bits == 8 and back.group_size == -1
    assert back.in_features == shape[1]
    # the canonical weight is qw with fp16-rounded scales, computed independently here
    assert torch.equal(back.scale, qw.scale.half().float().reshape(-1, 1))
    can = LAYOUT.canonical(qw)
    assert torch.equal(can.codes, back.codes) and torch.equal(can.scale, back.scale)
    assert torch.equal(back.dequantize(), qw.codes.float() * qw.scale.half().float())
    # re-packing the unpacked weight reproduces the bytes
    again = LAYOUT.pack(back)
    for k in packed:
        assert torch.equal(again[k], packed[k])


def test_codes_minus_128_survive_round_trip():
    codes = torch.tensor([[-128, 127, 0]], dtype=torch.int8)
    qw = QuantizedWeight(codes, torch.tensor([[0.5]]), None, 8, -1, 3)
    back = LAYOUT.unpack(LAYOUT.pack(qw), LAYOUT.pack_meta(qw))
    assert back.codes.tolist() == [[-128, 127, 0]]


# ------------------------------------------------------------------------------ static input_scale


def test_static_input_scale_via_meta():
    qw = rand_qw(4, 8)
    qw.meta["input_scale"] = torch.tensor([0.1])
    packed = LAYOUT.pack(qw)
    assert set(packed) == {"weight", "weight_scale", "input_scale"}
    # stored in fp32, not rounded to the fp16 of weight_scale
    assert packed["input_scale"].dtype == torch.float32 and packed["input_scale"].shape == (1,)
    assert packed["input_scale"].item() == torch.tensor(0.1, dtype=torch.float32).item()
    assert LAYOUT.pack_meta(qw)["static_input"] is True
    back = LAYOUT.unpack(packed, LAYOUT.pack_meta(qw))
    assert back.meta["input_scale"].dtype == torch.float32
    assert back.meta["input_scale"].tolist() == [float(torch.tensor(0.1, dtype=torch.float32))]
    assert torch.equal(LAYOUT.canonical(qw).meta["input_scale"], back.meta["input_scale"])
    assert LAYOUT.tensors((4, 8), SPEC, static=True) == {
        "weight": ((4, 8), torch.int8),
        "weight_scale": ((4, 1), torch.float16),
        "input_scale": ((1,), torch.float32),
    }


def test_static_input_scale_as_float():
    qw = rand_qw(4, 8)
    qw.meta["input_scale"] = 0.25
    packed = LAYOUT.pack(qw)
    assert packed["input_scale"].tolist() == [0.25]
    assert qw.meta["input_scale"] == 0.25  # pack does not mutate the weight


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), [0.1, 0.2]])
def test_bad_input_scale_refused(bad):
    qw = rand_qw(2, 4)
    qw.meta["input_scale"] = torch.tensor(bad)
    with pytest.raises(LayoutError):
        LAYOUT.pack(qw)


def test_dynamic_has_no_input_scale():
    packed = LAYOUT.pack(rand_qw(4, 8))
    assert "input_scale" not in packed
    assert "input_scale" not in LAYOUT.unpack(packed, {}).meta
    assert LAYOUT.tensors((4, 8), SPEC) == {
        "weight": ((4, 8), torch.int8),
        "weight_scale": ((4, 1), torch.float16),
    }


# ------------------------------------------------------------------------------ checks and errors


def test_registered():
    lay = get_layout("w8a8")
    assert isinstance(lay, W8A8Layout) and lay.version == 1 and lay.scale_dtype == torch.float16


def test_check():
    assert LAYOUT.check((192, 576), SPEC) == []
    assert any("bits" in p for p in LAYOUT.check((192, 576), QuantSpec(4, -1, True)))
    assert any("symmetric" in p for p in LAYOUT.check((192, 576), QuantSpec(8, -1, False)))
    assert any("per output channel" in p for p in LAYOUT.check((192, 576), QuantSpec(8, 64, True)))


def test_pack_refuses_non_w8a8_weights():
    w = torch.randn(4, 128)
    with pytest.raises(LayoutError, match="bits"):
        LAYOUT.pack(quantize_rtn(w, QuantSpec(4, -1, True)))
    with pytest.raises(LayoutError, match="symmetric"):
        LAYOUT.pack(quantize_rtn(w, QuantSpec(8, -1, False)))
    with pytest.raises(LayoutError, match="group_size"):
        LAYOUT.pack(quantize_rtn(w, QuantSpec(8, 64, True)))


def test_unpack_refuses_missing_and_unknown_tensors():
    packed = LAYOUT.pack(rand_qw(4, 8))
    with pytest.raises(LayoutError, match="missing"):
        LAYOUT.unpack({"weight": packed["weight"]}, {})
    with pytest.raises(LayoutError, match="unexpected"):
        LAYOUT.unpack({**packed, "weight_zero_point": torch.zeros(4, 1)}, {})
    with pytest.raises(LayoutError, match="meta"):
        LAYOUT.unpack(packed, {"out_features": 4, "in_features": 9})
    with pytest.raises(LayoutError, match="static_input"):
        LAYOUT.unpack(packed, {"static_input": True})
    with pytest.raises(LayoutError, match="int8"):
        LAYOUT.unpack({**packed, "weight": packed["weight"].to(torch.int16)}, {})


# ------------------------------------------------------------------------------ quantization_config


def test_compressed_tensors_config_dynamic_exact():
    assert compressed_tensors_config() == {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "group_size": None,
                    "strategy": "channel",
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "group_size": None,
                    "strategy": "token",
                    "dynamic": True,
                    "observer": None,
                },
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": compressed_tensors_version(),
    }


def test_compressed_tensors_config_static_and_ignore():
    cfg = compressed_tensors_config(static=True, ignore=["lm_head", "model.layers.0.mlp.down_proj"])
    assert cfg["config_groups"]["group_0"]["input_activations"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor",
        "dynamic": False,
    }
    assert cfg["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    assert cfg["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def test_version_string():
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("compressed-tensors")
    except PackageNotFoundError:
        expected = "0.12.0"
    assert compressed_tensors_config()["version"] == expected


def test_hf_quantization_config_hook():
    from types import SimpleNamespace

    recipe = SimpleNamespace(quant=SimpleNamespace(a_static=True, ignore=["lm_head", "*.down_proj"]))
    cfg = LAYOUT.hf_quantization_config(recipe, {})
    assert cfg["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    assert cfg["ignore"][0] == "lm_head" and len(cfg["ignore"]) == 2
    import re

    rx = cfg["ignore"][1]
    assert rx.startswith("re:")
    assert re.match(rx[3:], "model.layers.3.mlp.down_proj")
    assert not re.match(rx[3:], "model.layers.3.mlp.up_proj")
    # the packed linears decide over the recipe; mixed static/dynamic is refused
    assert LAYOUT.hf_quantization_config(recipe, {"a": {"static_input": False}})["config_groups"][
        "group_0"
    ]["input_activations"]["strategy"] == "token"
    with pytest.raises(LayoutError, match="static"):
        LAYOUT.hf_quantization_config(recipe, {"a": {"static_input": False}, "b": {"static_input": True}})
    # convert path: no recipe, the source qtool config says dynamic
    cfg2 = LAYOUT.hf_quantization_config(None, {}, qcfg={"a_static": False, "modules_to_not_convert": []})
    assert cfg2["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    assert cfg2["ignore"] == ["lm_head"]


def test_ignore_list():
    assert ignore_list([]) == ["lm_head"]
    assert ignore_list(["lm_head", "model.layers.1.self_attn.o_proj"]) == [
        "lm_head",
        "model.layers.1.self_attn.o_proj",
    ]


# ------------------------------------------------------------------------------ QServe W8A8


def test_to_qserve_w8a8():
    w = torch.tensor([[127.0, -64.0, 1.0], [3.0, -127.0, 50.0]]) * torch.tensor([[2.0**-3], [2.0**-5]])
    qw = quantize_rtn(w, SPEC)
    out = to_qserve_w8a8(LAYOUT.pack(qw), LAYOUT.pack_meta(qw))
    assert set(out) == {"weight", "dequant_scale"}
    assert out["weight"].dtype == torch.int8 and out["weight"].tolist() == [[127, -64, 1], [3, -127, 50]]
    assert out["dequant_scale"].dtype == torch.float16 and out["dequant_scale"].shape == (2,)
    assert out["dequant_scale"].tolist() == [0.125, 0.03125]


def test_to_qserve_w8a8_random_matches_fp16_scales():
    qw = rand_qw(192, 576)
    out = to_qserve_w8a8(LAYOUT.pack(qw))
    assert torch.equal(out["weight"], qw.codes)
    assert int(out["weight"].abs().max()) <= 127
    assert torch.equal(out["dequant_scale"], qw.scale.reshape(-1).half())


def test_to_qserve_w8a8_refuses_minus_128_and_static():
    codes = torch.tensor([[-128, 5]], dtype=torch.int8)
    qw = QuantizedWeight(codes, torch.tensor([[0.5]]), None, 8, -1, 2)
    with pytest.raises(LayoutError, match="-127"):
        to_qserve_w8a8(LAYOUT.pack(qw))
    static = rand_qw(2, 4)
    static.meta["input_scale"] = 0.5
    with pytest.raises(LayoutError, match="static"):
        to_qserve_w8a8(LAYOUT.pack(static))
