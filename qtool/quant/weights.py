"""Weight quantizer dispatch: recipe → QuantSpec → the quantizer the scheme names."""

from __future__ import annotations

from torch import Tensor

from qtool.quant.qweight import QuantizedWeight, QuantSpec, check_spec


def spec_from_recipe(recipe) -> QuantSpec:
    q = recipe.quant
    return QuantSpec(bits=q.w_bits, group_size=q.group_size, symmetric=q.symmetric, pad=q.pad)


def check_weight(shape: tuple[int, int], recipe) -> list[str]:
    return check_spec(shape, spec_from_recipe(recipe))


def quantize_weight(weight: Tensor, recipe) -> QuantizedWeight:
    """Quantize one [N, K] weight with the recipe's scheme (RTN or QoQ progressive)."""
    spec = spec_from_recipe(recipe)
    if recipe.quant.scheme == "progressive":
        from qtool.quant import progressive

        if spec.group_size == -1:
            return progressive.quantize_qoq_per_channel(weight)
        return progressive.quantize_progressive(weight, group_size=spec.group_size, pad=spec.pad)
    from qtool.quant.qweight import quantize_rtn

    return quantize_rtn(weight, spec)
