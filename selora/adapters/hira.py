r"""HiRA: a Hadamard high-rank update :math:`W = W_0 + W_0 \odot (\tilde B \tilde A)`."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

from selora.adapters.layer import AdapterUnit
from selora.adapters.registry import AdaptationBase, register_base

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
    so the forward forms the :math:`d_{out} \times d_{in}` product.
    """

    def forward(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        r"""Add :math:`(W_0 \odot \tilde B \tilde A) x` to the frozen output."""
        a, b = unit.factors(x.dtype)
        update = weight0.to(x.dtype) * (b @ a)
        out: Tensor = base_out + nnf.linear(unit.dropout(x), update).to(base_out.dtype)
        return out

    def _product(self, unit: AdapterUnit) -> Tensor:
        a, b = unit.lora_A(None), unit.lora_B(None)
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        product: Tensor = b.to(dtype) @ a.to(dtype)
        return product

    def merged_weight(self, unit: AdapterUnit, weight0: Tensor) -> Tensor:
        r"""Return :math:`W_0 \odot (1 + \tilde B \tilde A)`."""
        return weight0 * (1.0 + self._product(unit))

    def unmerged_weight(self, unit: AdapterUnit, weight: Tensor) -> Tensor:
        r"""Return :math:`W / (1 + \tilde B \tilde A)` (elementwise).

        Raises:
            RuntimeError: if an entry of :math:`1 + \tilde B \tilde A` is zero,
                where :math:`W_0` cannot be recovered.
        """
        factor = 1.0 + self._product(unit)
        if bool((factor == 0).any()):
            raise RuntimeError("HiRA cannot unmerge: 1 + B A has a zero entry")
        return weight / factor
