r"""LoRA: :math:`W = W_0 + \tfrac{\alpha}{r} \tilde B \tilde A`."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from selora.adapters.layer_kinds import LINEAR
from selora.adapters.registry import AdaptationBase, Update, register_base
from selora.adapters.unit import AdapterUnit

__all__ = ["LoRA", "delta_weight", "drop", "factor_dtype", "low_rank_update"]


def low_rank_update(unit: AdapterUnit, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r"""Return :math:`\tfrac{\alpha}{r} \tilde B \tilde A\, \mathrm{drop}(x)`, no dense matrix.

    The input goes through :math:`\tilde A` then :math:`\tilde B`, so neither the
    forward nor the backward pass holds a :math:`d_{out} \times d_{in}` tensor.

    For an embedding or a convolution the unit's layer kind applies the factors
    (:mod:`selora.adapters.layer_kinds`: a lookup in :math:`\tilde A`, or a
    convolution then a 1x1 one).

    Args:
        unit: the adapter unit (dropout, scale and layer kind).
        x: the layer input (``(..., d_in)`` for a linear layer).
        a: :math:`\tilde A` ``(r, d_in)`` in the compute dtype.
        b: :math:`\tilde B` ``(d_out, r)`` in the compute dtype.

    Returns:
        The update, shaped as the layer's output.
    """
    kind = unit.kind  # how the factors meet the layer (linear, embedding, conv)
    if kind is LINEAR:  # the common case, with no further call
        return nnf.linear(nnf.linear(drop(unit, x), a), b) * unit.scaling
    return kind.low_rank(drop(unit, x), a, b) * unit.scaling


def drop(unit: AdapterUnit, x: Tensor) -> Tensor:
    """Return the unit's dropout of ``x`` in training (``x`` itself otherwise, or for ids)."""
    dropout = unit._modules["dropout"]  # the dict: Module.__getattr__ costs, per layer per token
    if (
        unit.training
        and dropout is not None
        and not isinstance(dropout, nn.Identity)
        and unit.kind.takes_dropout  # not an embedding's integer ids (as PEFT)
    ):
        return dropout(x)  # type: ignore[no-any-return]
    return x


def factor_dtype(x: Tensor, base_out: Tensor) -> torch.dtype:
    """The dtype to form the factors in: the input's, or the output's for integer ids."""
    return x.dtype if x.is_floating_point() else base_out.dtype


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
        a, b = unit.factors(factor_dtype(x, base_out))
        update = low_rank_update(unit, x, a, b)
        return update if update.dtype == base_out.dtype else update.to(base_out.dtype)

    def update(self, unit: AdapterUnit, weight0: Tensor | None) -> Update:
        r"""Return :math:`(S, C) = (0, \tfrac{\alpha}{r} \tilde B \tilde A)`."""
        return None, delta_weight(unit)
