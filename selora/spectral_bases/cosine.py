"""The cosine basis: the orthonormal 2-D inverse DCT-II."""

from __future__ import annotations

import torch_dct
from torch import Tensor

from selora.spectral_bases.registry import InverseTransform, register_basis

__all__ = ["CosineTransform"]


@register_basis("dct")
class CosineTransform(InverseTransform):
    r"""Orthonormal 2-D inverse DCT-II (that is, the orthonormal DCT-III).

    With :math:`c_0 = \sqrt{1/N}` and :math:`c_u = \sqrt{2/N}` for :math:`u > 0`,
    the 1-D inverse is

    .. math::

        x_j = \sum_{u=0}^{N-1} c_u X_u \cos\frac{\pi (2j + 1) u}{2N},

    applied along both of the last two dimensions; it equals
    ``scipy.fft.idctn(F, norm="ortho")``. The matrix of the 1-D map is
    orthogonal, so :math:`\|T(F)\|_F = \|F\|_F`. Every shape is accepted.
    """

    orthonormal = True

    def inverse(self, spectrum: Tensor) -> Tensor:
        """Return the orthonormal 2-D inverse DCT-II over the last two dims.

        Args:
            spectrum: real tensor ``(..., m, n)`` in float32 or float64.

        Returns:
            Real tensor of the same shape and dtype.
        """
        out: Tensor = torch_dct.idct_2d(spectrum, norm="ortho")
        return out
