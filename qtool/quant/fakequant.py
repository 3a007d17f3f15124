"""Fake-quantized activations for in-process evaluation of A8 recipes.

Weights of a fake-quant model are already the dequantized codes; this adds INT8 activation
fake-quantization in front of each quantized linear: per-token dynamic, or per-tensor with
calibrated static scales (the quantizers themselves live in `qtool.quant.activations`).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from qtool.quant.activations import fake_quant_per_tensor, fake_quant_per_token


def install_activation_fake_quant(
    model: nn.Module, linear_fqns: list[str], static_scales: Optional[dict[str, Tensor]] = None
) -> list:
    """Fake-quantize the input of every listed linear to int8; returns the hook handles."""
    handles = []
    for fqn in linear_fqns:
        mod = model.get_submodule(fqn)
        if static_scales is not None and fqn in static_scales:
            scale = static_scales[fqn]
            hook = lambda m, args, s=scale: (fake_quant_per_tensor(args[0], s),) + tuple(args[1:])
        else:
            hook = lambda m, args: (fake_quant_per_token(args[0]),) + tuple(args[1:])
        handles.append(mod.register_forward_pre_hook(hook))
    return handles
