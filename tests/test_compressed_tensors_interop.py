"""A w8a8 checkpoint written by qtool loads in the real transformers + compressed-tensors stack.

A tiny random Llama (2 blocks, GQA) gets its 7 linears per block quantized with qtool's RTN
(int8, per-channel, symmetric) and packed by the w8a8 layout; the test writes config.json (model
config + `compressed_tensors_config()`) and model.safetensors by hand and loads the directory with
`AutoModelForCausalLM.from_pretrained`. What transformers computes depends on the load mode:

- `CompressedTensorsConfig(dequantize=True)`: weights are decompressed at load time into a dense
  model, as fp16(q · s) (compressed-tensors multiplies in the scale's dtype), then cast to the model
  dtype; activations stay in floating point. Compared with qtool's weight-only reference: the FP
  model with the canonical dequantized weights q · s (exact, fp32).
- default (`dequantize=False`): compressed-tensors keeps the quantization scheme on each Linear,
  decompresses the weights to fp32 q · s on the first forward (exactly qtool's canonical weight)
  and fake-quantizes the inputs. With static per-tensor `input_scale`s this is
  round(x / s) · s with the scale from the checkpoint, which is qtool's static W8A8 arithmetic, so
  the logits are compared with qtool's W8A8Linear modules (int8 × int8 exact GEMM) swapped into
  the same FP model. Its dynamic per-token fake quant uses max|x| / 127.5 and the range
  [-128, 127] (qtool, vLLM's int8 kernels and SmoothQuant use max|x| / 127 and [-127, 127]), so
  for dynamic activations only the weights are compared exactly and the logits loosely.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from qtool.kernels import select_backend  # noqa: E402
from qtool.layouts.w8a8 import W8A8Layout, compressed_tensors_config  # noqa: E402
from qtool.nn.w8a8 import W8A8Linear  # noqa: E402
from qtool.quant.activations import AbsMaxObserver  # noqa: E402
from qtool.quant.qweight import QuantSpec, quantize_rtn  # noqa: E402

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LAYOUT = W8A8Layout()
SPEC = QuantSpec(bits=8, group_size=-1, symmetric=True)
FP16_TOL = dict(rtol=1e-3, atol=1e-3)


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def linear_fqns(model) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for n in LINEARS]


def quantize(model) -> dict:
    """fqn → canonical QuantizedWeight (scales rounded to fp16, as on disk)."""
    return {
        fqn: LAYOUT.canonical(quantize_rtn(model.get_submodule(fqn).weight.detach(), SPEC))
        for fqn in linear_fqns(model)
    }


def write_ct_checkpoint(d: Path, model, qws: dict, static: bool) -> None:
    """config.json + model.safetensors in compressed-tensors int-quantized W8A8 form."""
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for fqn, qw in qws.items():
        del tensors[f"{fqn}.weight"]
        for suffix, t in LAYOUT.pack(qw).items():
            tensors[f"{fqn}.{suffix}"] = t
    assert all(tensors[f"{f}.weight"].dtype == torch.int8 for f in qws)
    config = model.config.to_dict()
    config["quantization_config"] = compressed_tensors_config(static=static)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def load(d: Path, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def weight_only_reference(qws: dict):
    """qtool's weight-only reference: the FP model with W = q · s (exact, fp32)."""
    model = tiny_llama()
    for fqn, qw in qws.items():
        model.get_submodule(fqn).weight.data = qw.dequantize(torch.float32)
    return model


def w8a8_reference(qws: dict):
    """The FP model with qtool's W8A8Linear modules (static when qw.meta has input_scale)."""
    model = tiny_llama()
    backend = select_backend("reference")
    for fqn, qw in qws.items():
        model.set_submodule(fqn, W8A8Linear(qw, None, backend))
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ the config itself


def test_config_validates_as_the_library_w8a8_preset():
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStrategy,
        preset_name_to_scheme,
    )

    preset = preset_name_to_scheme("W8A8", ["Linear"])
    cfg = QuantizationConfig.model_validate(compressed_tensors_config())
    group = cfg.config_groups["group_0"]
    assert group.targets == ["Linear"]
    assert group.weights == preset.weights
    assert group.input_activations == preset.input_activations
    assert group.output_activations is None
    assert cfg.format == "int-quantized" and cfg.quantization_status == "compressed"
    assert cfg.ignore == ["lm_head"]

    static = QuantizationConfig.model_validate(compressed_tensors_config(static=True))
    act = static.config_groups["group_0"].input_activations
    assert act.strategy == QuantizationStrategy.TENSOR and act.dynamic is False and act.symmetric


# ------------------------------------------------------------------------------ loading


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_dequantize_load_matches_qtool_weight_only_reference(tmp_path, ids):
    fp = tiny_llama()
    qws = quantize(fp)
    write_ct_checkpoint(tmp_path / "ckpt", fp, qws, static=False)
    loaded = load(tmp_path / "ckpt", quantization_config=CompressedTensorsConfig(dequantize=True))
    for fqn, qw in qws.items():
        w = loaded.get_submodule(fqn).weight.detach()
        assert type(loaded.get_submodule(fqn)) is torch.nn.Linear
        assert torch.equal(w, qw.dequantize(torch.float16).float()), fqn  # fp16(q · s)
    assert torch.equal(loaded.lm_head.weight, fp.lm_head.weight)
    got = logits(loaded, ids)
    ref = logits(weight_only_reference(qws), ids)
    torch.testing.assert_close(got, ref, **FP16_TOL)
    # the tolerance is tight enough to see the quantization: the FP model is farther away
    assert (logits(fp, ids) - ref).abs().max() > 3 * (got - ref).abs().max()


def calibrate_input_scales(qws: dict, ids, margin: float = 2.0) -> dict:
    """The weights with static per-tensor input scales (fp32, as on disk) from the
    weight-only model, widened by `margin` so the quantized models' slightly different activations
    never reach the clamp (where compressed-tensors allows -128 and qtool stops at -127)."""
    model = weight_only_reference(qws)
    obs = {fqn: AbsMaxObserver() for fqn in qws}
    hooks = [
        model.get_submodule(fqn).register_forward_pre_hook(lambda m, a, o=o: o.update(a[0]))
        for fqn, o in obs.items()
    ]
    logits(model, ids)
    for h in hooks:
        h.remove()
    out = {}
    for fqn, qw in qws.items():
        qw.meta["input_scale"] = obs[fqn].scale() * margin
        out[fqn] = LAYOUT.canonical(qw)
    return out


def test_static_default_load_matches_qtool_w8a8linear(tmp_path, ids):
    fp = tiny_llama()
    qws = calibrate_input_scales(quantize(fp), ids)
    write_ct_checkpoint(tmp_path / "ckpt", fp, qws, static=True)
    loaded = load(tmp_path / "ckpt")
    got = logits(loaded, ids)  # the first forward decompresses
    for fqn, qw in qws.items():
        mod = loaded.get_submodule(fqn)
        assert torch.equal(mod.weight.detach(), qw.dequantize(torch.float32)), fqn
        assert torch.equal(mod.input_scale.detach().float().reshape(1), qw.meta["input_scale"]), fqn
    ours = logits(w8a8_reference(qws), ids)
    torch.testing.assert_close(got, ours, **FP16_TOL)
    # activation quantization is really on in both: the weight-only model is farther away
    weight_only = logits(weight_only_reference(qws), ids)
    assert (weight_only - ours).abs().max() > 3 * (got - ours).abs().max()


def ct_per_token_emulation(qws: dict, ids) -> torch.Tensor:
    """compressed-tensors' per-token dynamic int8 fake quant, written out here: s = max|x| / 127.5,
    q = clamp(round(x / s), -128, 127), x ≈ q · s, in front of every quantized linear of the
    weight-only model."""

    def fq(module, args):
        x = args[0]
        s = x.abs().amax(dim=-1, keepdim=True) / 127.5
        return (torch.clamp(torch.round(x / s), -128, 127) * s,)

    model = weight_only_reference(qws)
    for fqn in qws:
        model.get_submodule(fqn).register_forward_pre_hook(fq)
    return logits(model, ids)


def test_dynamic_default_load_weights_exact_and_per_token_activations(tmp_path, ids):
    fp = tiny_llama()
    qws = quantize(fp)
    write_ct_checkpoint(tmp_path / "ckpt", fp, qws, static=False)
    loaded = load(tmp_path / "ckpt")
    got = logits(loaded, ids)
    for fqn, qw in qws.items():
        assert torch.equal(loaded.get_submodule(fqn).weight.detach(), qw.dequantize(torch.float32)), fqn
    # The config is read as int8 symmetric per-token dynamic activations on every quantized linear:
    # transformers computes exactly that (with compressed-tensors' 127.5 convention)...
    torch.testing.assert_close(got, ct_per_token_emulation(qws, ids), **FP16_TOL)
    weight_only = logits(weight_only_reference(qws), ids)
    assert (weight_only - got).abs().max() > 3 * (got - ct_per_token_emulation(qws, ids)).abs().max()
    # ...which is close to qtool's W8A8Linear (max|x| / 127) but not equal: both carry int8 noise.
    ours = logits(w8a8_reference(qws), ids)
    sqnr = 20 * torch.log10(ours.norm() / (ours - got).norm())
    assert sqnr > 30, float(sqnr)
