"""The cosine basis: the orthonormal 2-D inverse DCT-II, in plain torch."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional

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
def _fft_plan(
    n: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constants of the length-``n`` FFT route: scale, twiddles, reversal and output order."""
    scale = torch.full((n,), math.sqrt(n / 2.0), dtype=torch.float64)
    scale[0] = math.sqrt(n)
    half = n // 2 + 1
    k = torch.arange(half, dtype=torch.float64)
    twiddle = torch.polar(torch.ones_like(k), math.pi * k / (2.0 * n))
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    # X_{n-k} for k = 0 .. half-1, with X_n = 0 (index n points at a zero pad)
    reverse = torch.tensor([n] + [n - j for j in range(1, half)])
    j = torch.arange(n)
    order = torch.where(j % 2 == 0, j // 2, n - 1 - (j - 1) // 2)
    return (
        scale.to(dtype=dtype, device=device),
        twiddle.to(dtype=complex_dtype, device=device),
        reverse.to(device),
        order.to(device),
    )


def _inverse_last(coeffs: Tensor, other: int) -> Tensor:
    r"""Orthonormal inverse DCT-II (DCT-III) along the last dimension.

    A length ``n`` no longer than ``other`` (the length of the other
    transformed dimension) or 512 uses the dense ``(n, n)`` matrix, which is
    then no larger than the spectrum itself, so a factor's transform never
    holds a matrix of a layer's size. Longer ones use one real FFT of length
    ``n`` (Makhoul, 1980): with the unnormalised coefficients
    :math:`X_u = Y_u / c_u` and :math:`X_n = 0`,

    .. math::

        V_u = e^{i\pi u/2n}\,(X_u - i X_{n-u}), \qquad
        v = \mathrm{IDFT}_n(V), \qquad x_{2j} = v_j, \quad x_{2j+1} = v_{n-1-j},

    where :math:`V` is Hermitian (``v`` is real), so ``irfft`` needs only
    :math:`u \le n/2`.
    """
    n = coeffs.shape[-1]
    # Under torch.compile the constants are traced into the graph instead:
    # Dynamo does not honour functools caches and warns about them.
    compiling = torch.compiler.is_compiling()
    if n <= min(other, _DENSE_MAX):
        plan = _dense_plan.__wrapped__ if compiling else _dense_plan
        dense: Tensor = coeffs @ plan(n, coeffs.dtype, coeffs.device)
        return dense
    fft_plan = _fft_plan.__wrapped__ if compiling else _fft_plan
    scale, twiddle, reverse, order = fft_plan(n, coeffs.dtype, coeffs.device)
    unnormalised = coeffs * scale
    half = n // 2 + 1
    mirrored = functional.pad(unnormalised, (0, 1))[..., reverse]
    spectrum = twiddle * torch.complex(unnormalised[..., :half], -mirrored)
    signal: Tensor = torch.fft.irfft(spectrum, n=n)
    return signal[..., order]


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
    a dense matrix product, the other by a real FFT of the same length.
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
        rows_done = _inverse_last(spectrum, other=m)
        out = _inverse_last(rows_done.transpose(-1, -2), other=n).transpose(-1, -2)
        return out.contiguous()

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
