"""Symmetric int8 activation quantizers (SmoothQuant granularity, `algorithms.md` §2.3).

Pure functions, no state, statistics in fp32 whatever the input dtype:

- per-token dynamic:  s = clamp(max_k |x[..., k]|, 1e-5) / 127          (one scale per row)
- per-tensor static:  s given (from calibration, see `AbsMaxObserver`)
- both:               q = clamp(round(x / s), -127, 127)                 (int8)

Rounding is `torch.round`: round half to even, the behaviour of the CUDA `cvt.rni` conversion the
int8 kernels use.

The clamp to [-127, 127]: for per-token scales it never changes a value (|x / s| <= 127 by
construction; it only absorbs fp32 rounding of the division), for static scales it saturates
inputs beyond the calibrated range. The range is symmetric — -128 is never produced — which is
what QServe's W8A8 kernels assume and what makes `-q` always representable. (compressed-tensors'
own fake-quant differs here: it divides by 127.5 and clamps to [-128, 127].)

The 1e-5 floor on the absmax keeps all-zero rows finite: their scale is 1e-5/127 and their codes 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.errors import CalibrationError

QMAX = 127
ABSMAX_FLOOR = 1e-5


def _round_clamp(x: Tensor) -> Tensor:
    return torch.clamp(torch.round(x), -QMAX, QMAX).to(torch.int8)


def per_token_scale(x: Tensor) -> Tensor:
    """fp32 scale [..., 1]: clamp(max|x| over the last dim, 1e-5) / 127."""
    absmax = x.detach().to(torch.float32).abs().amax(dim=-1, keepdim=True)
    return absmax.clamp(min=ABSMAX_FLOOR) / QMAX


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token quantization of x [..., K] → (q int8 [..., K], scale fp32 [..., 1])."""
    s = per_token_scale(x)
    q = _round_clamp(x.to(torch.float32) / s)
    return q, s


def _as_scale(scale: Tensor | float, device) -> Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32, device=device)
    if s.numel() != 1:
        raise ValueError(f"a per-tensor scale has one element, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or float(s.reshape(())) <= 0:
        raise ValueError(f"a per-tensor scale must be finite and positive, got {float(s.reshape(()))}")
    return s.reshape(())


def quantize_per_tensor(x: Tensor, scale: Tensor | float) -> Tensor:
    """Static per-tensor quantization with a given scale (a float or a one-element tensor) → int8."""
    s = _as_scale(scale, x.device)
    return _round_clamp(x.to(torch.float32) / s)


def fake_quant_per_token(x: Tensor) -> Tensor:
    """Quantize per token and dequantize (q · s); the result has x's dtype."""
    q, s = quantize_per_token(x)
    return (q.to(torch.float32) * s).to(x.dtype)


def fake_quant_per_tensor(x: Tensor, scale: Tensor | float) -> Tensor:
    """Quantize with a static per-tensor scale and dequantize; the result has x's dtype."""
    s = _as_scale(scale, x.device)
    return (quantize_per_tensor(x, s).to(torch.float32) * s).to(x.dtype)


class AbsMaxObserver:
    """Streaming max|x| over every element seen, in fp32, for a static per-tensor scale.

        obs = AbsMaxObserver()
        for x in batches: obs.update(x)
        input_scale = obs.scale()          # fp32 [1] = clamp(max|x|, 1e-5) / 127
    """

    def __init__(self) -> None:
        self._absmax: Tensor | None = None
        self.count = 0  # number of update() calls with a non-empty tensor

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        m = x.detach().to(torch.float32).abs().amax()
        if not bool(torch.isfinite(m)):
            raise CalibrationError(
                "non-finite activation seen while observing max|x|",
                "check the calibration data and the model dtype (fp16 overflow?)",
            )
        self._absmax = m if self._absmax is None else torch.maximum(self._absmax, m)
        self.count += 1

    @property
    def absmax(self) -> Tensor:
        if self._absmax is None:
            raise CalibrationError(
                "AbsMaxObserver has seen no data", "run calibration batches through the model first"
            )
        return self._absmax

    def scale(self) -> Tensor:
        """fp32 tensor of shape [1]: clamp(max|x|, 1e-5) / 127."""
        return (self.absmax.clamp(min=ABSMAX_FLOOR) / QMAX).reshape(1)

    def reset(self) -> None:
        self._absmax = None
        self.count = 0
