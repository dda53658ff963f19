"""The cosine basis: the orthonormal 2-D inverse DCT-II, in plain torch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selora._tensor_cache import tensor_cache
from selora.spectral_bases.registry import InverseTransform, register_basis

__all__ = ["CosineTransform"]

# Up to this length a dense matrix product beats the FFT route on CPU (an
# (8, 384) spectrum: 3x faster along 384); the matrix is at most 1 MiB.
_DENSE_MAX = 512


@tensor_cache()
def _dense_plan(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""The ``(n, n)`` matrix :math:`M_{uj} = c_u \cos(\pi (2j+1) u / 2n)`: ``x = X @ M``."""
    u = torch.arange(n, dtype=torch.float64)
    c = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    c[0] = math.sqrt(1.0 / n)
    matrix = c[:, None] * torch.cos(math.pi * (2.0 * u[None, :] + 1.0) * u[:, None] / (2.0 * n))
    return matrix.to(dtype=dtype, device=device)


@tensor_cache()
def _fft_plan(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""The twiddles of the length-``2n`` route (see :func:`_inverse_along`).

    :math:`t_0 = c_0` and :math:`t_u = \tfrac{c_u}{2} e^{i\pi u/2n}` for :math:`u > 0`.
    """
    u = torch.arange(n, dtype=torch.float64)
    scale = torch.full((n,), math.sqrt(2.0 / n) / 2.0, dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    twiddle = torch.polar(scale, math.pi * u / (2.0 * n))
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return twiddle.to(dtype=complex_dtype, device=device)


def _inverse_along(coeffs: Tensor, dim: int, other: int) -> Tensor:
    r"""Orthonormal inverse DCT-II (DCT-III) along ``dim``, the last (-1) or the one before (-2).

    A length ``n`` no longer than ``other`` (the length of the other
    transformed dimension) or 512 uses the dense ``(n, n)`` matrix, which is
    then no larger than the spectrum itself, so a factor's transform never
    holds a matrix of a layer's size. Longer ones use one real inverse FFT of
    length :math:`2n`: with :math:`X_u = 0` for :math:`u \ge n`, the Hermitian
    extension :math:`Z` of :math:`t X` (what ``irfft`` of length :math:`2n`
    with no normalisation sums) gives

    .. math::

        \sum_{u=0}^{2n-1} Z_u e^{2\pi i u j/2n}
        = t_0 X_0 + 2 \sum_{u=1}^{n-1} \operatorname{Re}\big(t_u X_u e^{i\pi u j/n}\big)
        = \sum_{u=0}^{n-1} c_u X_u \cos\frac{\pi (2j+1) u}{2n} = x_j

    for :math:`j < n`. A multiply, one ``irfft`` and a slice: the earlier
    length-:math:`n` route (Makhoul, 1980) needed two gathers, whose backward
    scatters cost more than the transforms (CPU, SmolLM2's factors: the
    formation of every factor took 30 % less time).
    """
    n = coeffs.shape[dim]
    # Under torch.compile the constants are traced into the graph instead:
    # Dynamo does not honour functools caches and warns about them.
    compiling = torch.compiler.is_compiling()
    if n <= min(other, _DENSE_MAX):
        plan = _dense_plan.__wrapped__ if compiling else _dense_plan
        matrix = plan(n, coeffs.dtype, coeffs.device)
        dense: Tensor = coeffs @ matrix if dim == -1 else matrix.T @ coeffs  # no transposed copy
        return dense
    if dim == -2:  # measured: irfft over the last dim of a transposed view is no slower than dim=-2
        return _inverse_along(coeffs.transpose(-1, -2), -1, other).transpose(-1, -2)
    fft_plan = _fft_plan.__wrapped__ if compiling else _fft_plan
    twiddle = fft_plan(n, coeffs.dtype, coeffs.device)
    signal: Tensor = torch.fft.irfft(coeffs * twiddle, n=2 * n, norm="forward")
    return signal[..., :n]


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
    A dimension no longer than the other one (and than 512) is transformed by
    a dense matrix product, the other by a real inverse FFT of twice its length.
    """

    orthonormal = True

    def inverse(self, spectrum: Tensor) -> Tensor:
        """Return the orthonormal 2-D inverse DCT-II over the last two dims.

        Args:
            spectrum: real tensor ``(..., m, n)`` in float32 or float64.

        Returns:
            Real tensor of the same shape and dtype.
        """
        m, n = spectrum.shape[-2:]
        rows_done = _inverse_along(spectrum, -1, other=m)
        return _inverse_along(rows_done, -2, other=n).contiguous()

    def active_energy(self, shape: tuple[int, int], indices: Tensor) -> float:
        r"""Return the energy of :math:`\Omega`: ``k``, one per location (the basis is orthonormal).

        Each :math:`T(e_p)` is the outer product of two rows of orthogonal
        matrices, of unit norm, and no two are parallel.

        Args:
            shape: ``(m, n)``.
            indices: the ``k`` flat positions of :math:`\Omega`.

        Returns:
            ``float(k)``.
        """
        return float(indices.numel())
