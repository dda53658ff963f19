"""The Fourier basis (FoRA / FourierFT): the real part of the 2-D inverse DFT."""

from __future__ import annotations

import torch
from torch import Tensor

from selora.spectral_bases.registry import InverseTransform, register_basis

__all__ = ["FourierTransform"]


@register_basis("fft")
class FourierTransform(InverseTransform):
    r"""Real part of the 2-D inverse discrete Fourier transform.

    For a spectrum :math:`F \in \mathbb{R}^{m \times n}`,

    .. math::

        M_{jk} = \operatorname{Re} \frac{1}{mn} \sum_{u=0}^{m-1} \sum_{v=0}^{n-1}
        F_{uv} \exp\Big(2\pi i \big(\tfrac{uj}{m} + \tfrac{vk}{n}\big)\Big),

    which is ``numpy.fft.ifft2(F).real``. The map is linear in ``F`` but not
    orthonormal (its scale is :math:`1/(mn)`), which calibration absorbs.
    Every shape is accepted.
    """

    orthonormal = False

    def inverse(self, spectrum: Tensor) -> Tensor:
        r"""Return :math:`\operatorname{Re}\,\mathrm{IDFT}_2(F)` over the last two dims.

        Args:
            spectrum: real tensor ``(..., m, n)`` in float32 or float64.

        Returns:
            Real tensor of the same shape and dtype.
        """
        out: Tensor = torch.fft.ifft2(spectrum, dim=(-2, -1)).real
        return out.contiguous()
