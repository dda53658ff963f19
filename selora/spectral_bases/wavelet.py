"""Wavelet bases: one level of the periodized 2-D inverse discrete wavelet transform.

The synthesis is separable and written in plain torch (a strided transposed
convolution followed by a circular fold), so it runs at FFT-like speed on the
CPU and works for filters of any length, also when a filter is longer than
half the signal and the periodic wrap folds it more than once.
"""

from __future__ import annotations

import functools
from typing import Literal

import pywt
import torch
import torch.nn.functional as nnf
from torch import Tensor

from selora.spectral_bases.registry import InverseTransform, add_fallback, register_basis

__all__ = [
    "WaveletTransform",
    "HaarTransform",
    "Daubechies4Transform",
    "BiorthogonalTransform",
    "CoifletTransform",
    "WaveletName",
]

WaveletName = Literal["haar", "db4", "bior2.2", "coif1"]
"""The wavelets behind the four named bases; any PyWavelets discrete name works too."""


@functools.cache
def _filters(wavelet: str) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """Return ``(rec_lo, rec_hi, orthogonal)`` of a PyWavelets discrete wavelet."""
    w = pywt.Wavelet(wavelet)
    return tuple(w.rec_lo), tuple(w.rec_hi), bool(w.orthogonal)


def _synthesis_1d(low: Tensor, high: Tensor, rec_lo: Tensor, rec_hi: Tensor) -> Tensor:
    r"""One periodized synthesis step along the last dimension.

    With :math:`h` coefficients per band, :math:`N = 2h` and filters of even
    length :math:`L`,

    .. math::

        x_{(2k + j - L/2 + 1) \bmod N} \mathrel{+}= a_k g_j + d_k \tilde g_j,

    where :math:`g`, :math:`\tilde g` are the low- and high-pass synthesis
    filters. The transposed convolution computes the full (unwrapped) sum and
    the fold adds every period back onto :math:`[0, N)`.
    """
    lead = low.shape[:-1]
    half = low.shape[-1]
    size = 2 * half
    taps = rec_lo.numel()
    bands = torch.stack((low.reshape(-1, half), high.reshape(-1, half)), dim=1)
    weight = torch.stack((rec_lo, rec_hi)).unsqueeze(1)
    full = nnf.conv_transpose1d(bands, weight, stride=2).squeeze(1)
    periods = -(-full.shape[-1] // size)
    full = nnf.pad(full, (0, periods * size - full.shape[-1]))
    folded = full.reshape(full.shape[0], periods, size).sum(dim=1)
    shift = taps // 2 - 1
    if shift % size:
        folded = torch.roll(folded, shifts=-shift, dims=-1)
    return folded.reshape(*lead, size)


class WaveletTransform(InverseTransform):
    r"""One level of the periodized 2-D inverse DWT of a PyWavelets wavelet.

    The spectrum is read as four quadrants, each :math:`(m/2, n/2)`:

    .. math::

        F = \begin{bmatrix} a & h \\ v & d \end{bmatrix}, \qquad
        T(F) = \mathrm{idwt2}\big(a, (h, v, d)\big),

    where ``h``, ``v``, ``d`` are PyWavelets' horizontal, vertical and
    diagonal details: ``h`` is high-pass along rows (axis 0) and low-pass along
    columns, ``v`` the converse. The result equals
    ``pywt.idwt2((a, (h, v, d)), wavelet, mode="periodization")``. Writing
    :math:`S_N = [G_N \; \tilde G_N]` for the periodized 1-D synthesis matrix,
    :math:`T(F) = S_m \begin{bmatrix} a & v \\ h & d\end{bmatrix} S_n^\top`.
    For an orthogonal wavelet :math:`S_N` is orthogonal, so :math:`T` keeps
    the Frobenius norm. Only even ``m`` and ``n`` are accepted.

    Args:
        wavelet: any PyWavelets discrete wavelet name (``"haar"``, ``"db4"``,
            ``"bior2.2"``, ``"coif1"``, ``"sym8"``, ...).

    Raises:
        ValueError: if ``wavelet`` is not a PyWavelets discrete wavelet.
    """

    wavelet: str = "haar"

    def __init__(self, wavelet: str | None = None) -> None:
        name = wavelet if wavelet is not None else type(self).wavelet
        if name not in pywt.wavelist(kind="discrete"):
            raise ValueError(
                f"{name!r} is not a PyWavelets discrete wavelet; see pywt.wavelist(kind='discrete')"
            )
        self.wavelet = name
        self._rec_lo, self._rec_hi, self.orthonormal = _filters(name)
        self._tensors: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def label(self) -> str:
        """Return the registered name, or the wavelet's name when built by fallback."""
        return self.name or self.wavelet

    def check_shape(self, m: int, n: int) -> None:
        """Refuse odd sizes: one DWT level halves each dimension.

        Args:
            m: number of rows.
            n: number of columns.

        Raises:
            ValueError: if ``m`` or ``n`` is odd or smaller than 2.
        """
        if m < 2 or n < 2 or m % 2 or n % 2:
            raise ValueError(
                f"wavelet basis {self.label()!r} needs even m and n >= 2; got shape ({m}, {n})"
            )

    def _filter_tensors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._tensors:
            self._tensors[key] = (
                torch.tensor(self._rec_lo, dtype=like.dtype, device=like.device),
                torch.tensor(self._rec_hi, dtype=like.dtype, device=like.device),
            )
        return self._tensors[key]

    def inverse(self, spectrum: Tensor) -> Tensor:
        """Return the periodized one-level 2-D inverse DWT of the quadrants of ``F``.

        Args:
            spectrum: real tensor ``(..., m, n)`` with even ``m``, ``n``.

        Returns:
            Real tensor of the same shape and dtype.
        """
        rec_lo, rec_hi = self._filter_tensors(spectrum)
        m, n = spectrum.shape[-2], spectrum.shape[-1]
        hm, hn = m // 2, n // 2
        a = spectrum[..., :hm, :hn]
        h = spectrum[..., :hm, hn:]
        v = spectrum[..., hm:, :hn]
        d = spectrum[..., hm:, hn:]
        # Rows first: the bands low-pass along axis 0 are a and v, high-pass h and d.
        low_rows = torch.cat((a, v), dim=-1).transpose(-1, -2)
        high_rows = torch.cat((h, d), dim=-1).transpose(-1, -2)
        rows = _synthesis_1d(low_rows, high_rows, rec_lo, rec_hi).transpose(-1, -2)
        return _synthesis_1d(rows[..., :hn], rows[..., hn:], rec_lo, rec_hi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(wavelet={self.wavelet!r})"


@register_basis("haar")
class HaarTransform(WaveletTransform):
    """Haar wavelet basis (orthonormal, 2 taps)."""

    wavelet = "haar"


@register_basis("db4")
class Daubechies4Transform(WaveletTransform):
    """Daubechies-4 wavelet basis (orthonormal, 8 taps, PyWavelets' ``db4``)."""

    wavelet = "db4"


@register_basis("bior")
class BiorthogonalTransform(WaveletTransform):
    """Biorthogonal 2.2 wavelet basis (``bior2.2``; not orthonormal, 6 taps)."""

    wavelet = "bior2.2"


@register_basis("coif")
class CoifletTransform(WaveletTransform):
    """Coiflet-1 wavelet basis (``coif1``; orthonormal, 6 taps)."""

    wavelet = "coif1"


def _resolve_pywavelet(name: str) -> functools.partial[WaveletTransform] | None:
    if name not in pywt.wavelist(kind="discrete"):
        return None
    return functools.partial(WaveletTransform, name)


add_fallback(_resolve_pywavelet)
