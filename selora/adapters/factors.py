"""An adapter's two factors: a :class:`~selora.SparseSpectrum` or a plain dense matrix.

``basis=None`` gives dense factors (vanilla LoRA, DoRA, HiRA) in the same code
as the spectral ones, for fair comparisons.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from selora.adapters.config import SpectralAdapter
from selora.spectral_bases import SparseSpectrum, SpectrumInit, get_basis

__all__ = ["DenseFactor", "Factor", "make_factor"]


class DenseFactor(nn.Module):
    """A plain dense factor (``basis=None``): the matrix is the parameter itself.

    Args:
        shape: ``(m, n)``.
        device: where the weight lives.
        dtype: the weight's dtype (float32 by default).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype or torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        r"""Kaiming-uniform init as ``nn.Linear``: :math:`U(-1/\sqrt n, 1/\sqrt n)`."""
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @torch.no_grad()
    def reset_zero(self) -> None:
        """Set the factor to zero (LoRA's B at init)."""
        self.weight.zero_()

    @property
    def n_coeffs(self) -> int:
        """Number of trainable entries, ``m * n``."""
        return int(self.weight.numel())

    def forward(self, dtype: torch.dtype | None = None) -> Tensor:
        """Return the matrix, cast to ``dtype`` if given.

        Args:
            dtype: output dtype; the weight's own if ``None``.

        Returns:
            The ``(m, n)`` matrix.
        """
        return self.weight if dtype is None else self.weight.to(dtype)


Factor = SparseSpectrum | DenseFactor


def make_factor(
    shape: tuple[int, int],
    adapter: SpectralAdapter,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    init: SpectrumInit = "kaiming",
) -> Factor:
    """Build one factor of ``adapter``: a :class:`~selora.SparseSpectrum` or a dense one.

    Args:
        shape: ``(m, n)`` of the factor.
        adapter: gives the basis, the budget, the seed and the scale.
        device: where the parameters live.
        dtype: the parameters' dtype (float32 if ``None``).
        init: ``"kaiming"`` (calibrated) or ``"zero"`` (LoRA's B: built at zero,
            never calibrated, and ``reset_parameters`` zeroes a spectrum again).

    Returns:
        The factor.
    """
    if adapter.basis is None:
        dense = DenseFactor(shape, device=device, dtype=dtype)
        if init == "zero":
            dense.reset_zero()
        return dense
    basis = get_basis(adapter.basis) if isinstance(adapter.basis, str) else adapter.basis
    return SparseSpectrum(
        shape,
        basis,
        sparse_ratio=adapter.sparse_ratio,
        n_coeffs=adapter.n_coeffs,
        seed=adapter.seed,
        device=device,
        dtype=dtype,
        scale=adapter.scale,
        init=init,
    )
