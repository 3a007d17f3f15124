"""Fake-quantized activations for in-process evaluation of A8 / KV4 recipes.

Weights of a fake-quant model are already the dequantized codes; this module adds INT8 activation
fake-quantization in front of each quantized linear (per-token dynamic, or per-tensor with
calibrated static scales) and KV4 fake quantization of the attention cache.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def _fq_per_token(x: Tensor) -> Tensor:
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
    return (torch.clamp(torch.round(xf / s), -127, 127) * s).to(x.dtype)


def _fq_per_tensor(x: Tensor, scale: Tensor) -> Tensor:
    s = scale.to(torch.float32)
    return (torch.clamp(torch.round(x.float() / s), -127, 127) * s).to(x.dtype)


def install_activation_fake_quant(
    model: nn.Module, linear_fqns: list[str], static_scales: Optional[dict[str, Tensor]] = None
) -> list:
    """Fake-quantize the input of every listed linear to int8; returns the hook handles."""
    handles = []
    for fqn in linear_fqns:
        mod = model.get_submodule(fqn)
        if static_scales is not None and fqn in static_scales:
            scale = static_scales[fqn]
            hook = lambda m, args, s=scale: (_fq_per_tensor(args[0], s),) + tuple(args[1:])
        else:
            hook = lambda m, args: (_fq_per_token(args[0]),) + tuple(args[1:])
        handles.append(mod.register_forward_pre_hook(hook))
    return handles
