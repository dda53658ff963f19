r"""DoRA: a learned magnitude per output row times the direction of the LoRA-adapted weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selora.adapters.layer_types import compute_dtype
from selora.adapters.lora import delta_weight, factor_dtype, low_rank_update
from selora.adapters.registry import AdaptationBase, Update, register_base
from selora.adapters.unit import AdapterUnit

__all__ = ["DoRA"]


def _row_norm(weight: Tensor) -> Tensor:
    norm: Tensor = torch.linalg.vector_norm(weight, dim=1)
    return norm


def _divisor(norm: Tensor) -> Tensor:
    """The row norms with zeros replaced by one, so that ``m / norm`` is finite.

    A row of :math:`V` that is exactly zero (a zero row of :math:`W_0` at init)
    has magnitude :math:`m_i = 0`, so its gain :math:`m_i / 1 = 0` keeps the row
    at zero (exact at init) instead of :math:`0 / 0`. Non-zero norms are unchanged.
    """
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def _magnitude(unit: AdapterUnit) -> Tensor:
    magnitude = unit.magnitude
    assert isinstance(magnitude, Tensor)
    return magnitude


def _merged_norm(unit: AdapterUnit) -> Tensor:
    norm = unit.merged_norm
    assert isinstance(norm, Tensor)
    return norm


@register_base("dora")
class DoRA(AdaptationBase):
    r"""Weight-decomposed low-rank adaptation (Liu et al., 2024).

    .. math::

        V = W_0 + \frac{\alpha}{r} \tilde B \tilde A, \qquad
        W = \operatorname{diag}\!\Big(\frac{m}{\lVert V \rVert_{row}}\Big) V,

    with one magnitude :math:`m_i` per output row, initialised to the row norms
    of :math:`W_0` (so :math:`W = W_0` at init). As in the paper the norm is
    detached in training, so no gradient flows through it. The forward pass
    reuses the frozen output: with :math:`g = m / \lVert V \rVert_{row}`,

    .. math::

        y = (W_0 x + b) + (g - 1) \odot W_0 x + g \odot \tfrac{\alpha}{r}\tilde B \tilde A x,

    which equals :math:`W x + b` and is exactly the frozen output at init.
    The row norm needs :math:`V` densely (as in every DoRA implementation).
    For an embedding a row is one embedding feature over the vocabulary; for a
    convolution, one output channel over the flattened kernel ``(in * kernel)``
    (:mod:`selora.adapters.layer_kinds`), as PEFT's DoRA.
    A row with :math:`\lVert V_i \rVert = 0` (an all-zero row of :math:`W_0`
    at init) is divided by 1 instead of 0: its magnitude is 0 too, so the row
    stays exactly zero and finite, in the forward, the backward and a merge.
    Dropout, if any, acts on the input of the low-rank term only, so in
    training :math:`y = g \odot (W_0 x + \tfrac{\alpha}{r}\tilde B \tilde A\,
    \mathrm{drop}(x)) + b`; Hugging Face PEFT also feeds :math:`\mathrm{drop}(x)`
    to the :math:`(g - 1) \odot W_0 x` term (one more full matmul). The two
    agree without dropout and in eval mode.
    """

    def setup(self, unit: AdapterUnit, weight0: Tensor) -> None:
        """Create the magnitude ``unit.magnitude`` at the row norms of :math:`W_0`."""
        dtype = compute_dtype(weight0.dtype)
        with torch.no_grad():
            magnitude = (
                _row_norm(weight0.to(dtype)) if not weight0.is_meta else weight0[:, 0].to(dtype)
            )
        unit.magnitude = nn.Parameter(magnitude.detach().clone())
        unit.register_buffer("merged_norm", torch.zeros_like(magnitude), persistent=False)

    def forward(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        """Return the DoRA output from the frozen output (see the class docstring)."""
        return base_out + self.delta(unit, x, base_out, weight0, bias)

    def delta(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        r"""Return :math:`(g - 1) \odot W_0 x + g \odot \tfrac{\alpha}{r}\tilde B \tilde A x`."""
        a, b = unit.factors(factor_dtype(x, base_out))
        with torch.no_grad():
            delta = delta_weight(unit, a, b)
            norm = _row_norm(weight0.to(compute_dtype(weight0.dtype)).to(delta.dtype) + delta)
        magnitude = _magnitude(unit)
        kind = unit.kind  # a convolution's channels sit on axis 1
        gain = kind.channels((magnitude / _divisor(norm)).to(base_out.dtype))
        base_no_bias = base_out if bias is None else base_out - kind.channels(bias)
        update = low_rank_update(unit, x, a, b).to(base_out.dtype)
        return (gain - 1) * base_no_bias + gain * update

    def update(self, unit: AdapterUnit, weight0: Tensor | None) -> Update:
        r"""Return :math:`(S, C) = (g - 1,\ g \odot \tfrac{\alpha}{r}\tilde B \tilde A)` per row.

        With :math:`g = m / \lVert V \rVert_{row}`, :math:`W = g \odot V = W_0 + (g - 1)
        \odot W_0 + g \odot \tfrac{\alpha}{r}\tilde B\tilde A`. At a merge the row norms
        of :math:`V = W_0 + \tfrac{\alpha}{r}\tilde B\tilde A` are computed and
        remembered; at an unmerge (``weight0=None``) the remembered ones are used.
        A row with :math:`m_i = 0` is merged to zero (:math:`1 + S_i = 0`): it is
        restored as zero, exact for the all-zero row of :math:`W_0` that gives
        :math:`m_i = 0` at init.
        """
        delta = delta_weight(unit)
        if weight0 is not None:
            norm = _row_norm(weight0.to(delta.dtype) + delta)
            unit.merged_norm = norm.detach().clone()
        else:
            norm = _merged_norm(unit).to(delta.dtype)
        gain = (_magnitude(unit).to(delta.dtype) / _divisor(norm)).unsqueeze(1)
        return gain - 1, gain * delta
