r"""HiRA: a Hadamard high-rank update :math:`W = W_0 + W_0 \odot (\tilde B \tilde A)`."""

from __future__ import annotations

import torch
from torch import Tensor

from selora.adapters.lora import drop, factor_dtype
from selora.adapters.registry import AdaptationBase, Update, register_base
from selora.adapters.unit import AdapterUnit

__all__ = ["HiRA"]


@register_base("hira")
class HiRA(AdaptationBase):
    r"""Hadamard high-rank adaptation (Huang et al., 2025).

    .. math::

        W = W_0 + W_0 \odot (\tilde B \tilde A), \qquad
        y = W_0 x + b + \big(W_0 \odot \tilde B \tilde A\big)\, \mathrm{drop}(x).

    The Hadamard product with :math:`W_0` lifts the rank of the update beyond
    :math:`r`. There is no :math:`\alpha` (the scale is ignored), and
    :math:`\tilde B = 0` keeps the init exact. The update is dense by nature,
    so the forward forms the :math:`d_{out} \times d_{in}` product (for an
    embedding or a convolution, on the transposed table or the flattened
    kernel, applied as the layer applies its weight).
    """

    def forward(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        r"""Add :math:`(W_0 \odot \tilde B \tilde A) x` to the frozen output."""
        return base_out + self.delta(unit, x, base_out, weight0, bias)

    def delta(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        r"""Return :math:`(W_0 \odot \tilde B \tilde A)\,\mathrm{drop}(x)` alone."""
        a, b = unit.factors(factor_dtype(x, base_out))
        update = weight0.to(a.dtype) * (b @ a)
        out: Tensor = unit.kind.dense(drop(unit, x), update).to(base_out.dtype)
        return out

    def _product(self, unit: AdapterUnit) -> Tensor:
        a, b = unit.lora_A(None), unit.lora_B(None)
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        product: Tensor = b.to(dtype) @ a.to(dtype)
        return product

    def update(self, unit: AdapterUnit, weight0: Tensor | None) -> Update:
        r"""Return :math:`(S, C) = (\tilde B \tilde A, 0)`: :math:`W = W_0 (1 + \tilde B\tilde A)`.

        Unmerging divides by :math:`1 + \tilde B \tilde A`; where an entry of it
        is zero the merge lost :math:`W_0`, and the unmerge refuses.
        """
        return self._product(unit), None
