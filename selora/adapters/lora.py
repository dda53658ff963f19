r"""LoRA: :math:`W = W_0 + \tfrac{\alpha}{r} \tilde B \tilde A`."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from selora.adapters.registry import AdaptationBase, Update, register_base
from selora.adapters.unit import AdapterUnit

__all__ = ["LoRA", "delta_weight", "low_rank_update"]


def low_rank_update(unit: AdapterUnit, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r"""Return :math:`\tfrac{\alpha}{r} \tilde B \tilde A\, \mathrm{drop}(x)`, no dense matrix.

    The input goes through :math:`\tilde A` then :math:`\tilde B`, so neither the
    forward nor the backward pass holds a :math:`d_{out} \times d_{in}` tensor.

    Args:
        unit: the adapter unit (dropout and scale).
        x: input ``(..., d_in)``.
        a: :math:`\tilde A` ``(r, d_in)`` in ``x``'s dtype.
        b: :math:`\tilde B` ``(d_out, r)`` in ``x``'s dtype.

    Returns:
        ``(..., d_out)``.
    """
    dropout = unit._modules["dropout"]  # the dict: Module.__getattr__ costs, per layer per token
    if unit.training and dropout is not None and not isinstance(dropout, nn.Identity):
        x = dropout(x)  # (in eval, dropout is the identity: no call)
    return nnf.linear(nnf.linear(x, a), b) * unit.scaling


def delta_weight(unit: AdapterUnit, a: Tensor | None = None, b: Tensor | None = None) -> Tensor:
    r"""Return the dense update :math:`\tfrac{\alpha}{r} \tilde B \tilde A` in float32 (or float64).

    Args:
        unit: the adapter unit.
        a: :math:`\tilde A` if already formed (it is formed from the unit otherwise).
        b: :math:`\tilde B` likewise.

    Returns:
        ``(d_out, d_in)`` in float32, or float64 if a factor is float64.
    """
    a = unit.lora_A(None) if a is None else a
    b = unit.lora_B(None) if b is None else b
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (b.to(dtype) @ a.to(dtype)) * unit.scaling


@register_base("lora")
class LoRA(AdaptationBase):
    r"""Low-rank adaptation (Hu et al., 2021) with spectral or dense factors.

    .. math::

        y = W_0 x + b + \frac{\alpha}{r} \tilde B \tilde A x, \qquad
        W_{merged} = W_0 + \frac{\alpha}{r} \tilde B \tilde A.
    """

    reads_weight0 = False  # a quantized layer's forward dequantizes nothing for LoRA

    def forward(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        """Add the low-rank update to the frozen output (see :func:`low_rank_update`)."""
        return base_out + self.delta(unit, x, base_out, weight0, bias)

    def delta(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        r"""Return :math:`\tfrac{\alpha}{r}\tilde B \tilde A\,\mathrm{drop}(x)` alone."""
        a, b = unit.factors(x.dtype)
        update = low_rank_update(unit, x, a, b)
        return update if update.dtype == base_out.dtype else update.to(base_out.dtype)

    def update(self, unit: AdapterUnit, weight0: Tensor | None) -> Update:
        r"""Return :math:`(S, C) = (0, \tfrac{\alpha}{r} \tilde B \tilde A)`."""
        return None, delta_weight(unit)
