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

    def active_energy(self, shape: tuple[int, int], indices: Tensor) -> float:
        r"""Return the energy of :math:`\Omega` in closed form.

        See :meth:`InverseTransform.active_energy`.

        The unit spectrum at :math:`p = (u, v)` gives
        :math:`T(e_p)_{jk} = \cos(2\pi (uj/m + vk/n)) / (mn)`, the same matrix
        as its mirror :math:`-p = (-u \bmod m, -v \bmod n)`. Summing
        :math:`\cos^2` over the grid gives :math:`\|T(e_p)\|_F^2 = 1/(mn)` when
        :math:`p = -p` (the cosine is :math:`\pm 1` everywhere) and
        :math:`1/(2mn)` otherwise. A pair :math:`\{p, -p\} \subseteq \Omega`
        always moves together and counts as one matrix of twice the amplitude,
        of energy :math:`4/(2mn)`. Per location of :math:`\Omega`:

        .. math::

            E = \frac{1}{2mn}\,\big(k + |\{p \in \Omega : -p \in \Omega\}|\big),

        (a self-mirrored :math:`p` is its own mirror and counts twice), in
        :math:`O(k \log k)`.

        Args:
            shape: ``(m, n)``.
            indices: the ``k`` distinct flat positions of :math:`\Omega`.

        Returns:
            :math:`E`.
        """
        m, n = int(shape[0]), int(shape[1])
        flat = indices.detach().to("cpu", torch.int64).reshape(-1)
        mirror = ((-(flat // n)) % m) * n + (-(flat % n)) % n
        paired = int(torch.isin(mirror, flat).sum())
        return (flat.numel() + paired) / (2.0 * m * n)
