"""Wavelet bases: one level of the periodized 2-D inverse discrete wavelet transform.

The synthesis is separable and written in plain torch: each 1-D step splits
into its two output phases, each a short circular correlation of the two
bands (a few fused multiply-adds on shifted slices of circularly padded
bands). The gradient is the exact adjoint (the periodized analysis), computed
the same way by a custom autograd function, so forward and backward run at
FFT-like speed on the CPU. Filters of any length work, also when a filter is
longer than half the signal and the periodic wrap folds it more than once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import numpy as np
import pywt
import torch
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


@dataclasses.dataclass(frozen=True)
class _Polyphase:
    r"""The periodized one-level synthesis of a wavelet, split into its two phases.

    With :math:`h` coefficients per band, :math:`N = 2h` and synthesis filters
    :math:`g` (low-pass) and :math:`\tilde g` (high-pass) of even length
    :math:`L`, PyWavelets' periodization computes

    .. math::

        x_{(2k + j - L/2 + 1) \bmod N} \mathrel{+}= a_k g_j + d_k \tilde g_j .

    Output sample :math:`x_{2i + r}` (phase :math:`r \in \{0, 1\}`) is therefore
    a circular correlation of the bands with :math:`2P + 1` taps,
    :math:`P = \lfloor L/4 \rfloor`:

    .. math::

        x_{2i + r} = \sum_{c \in \{a, d\}} \sum_{q=0}^{2P} w_{r c q}\,
        c_{(i + q - P) \bmod h}, \qquad
        w_{r c q} = f^{(c)}_{2(P - q) + r + L/2 - 1}

    (zero outside the filter). ``taps[r]`` lists the non-zero
    :math:`(c, q, w_{rcq})`. The adjoint (the periodized analysis, used for the
    gradient) reads the same taps the other way round.
    """

    pad: int
    taps: tuple[tuple[tuple[int, int, float], ...], tuple[tuple[int, int, float], ...]]
    orthogonal: bool

    @functools.cached_property
    def adjoint_taps(
        self,
    ) -> tuple[tuple[tuple[int, int, float], ...], tuple[tuple[int, int, float], ...]]:
        """``adjoint_taps[c]`` lists the ``(r, q, w)`` that read band ``c`` (for the adjoint)."""
        low, high = (
            tuple((r, q, w) for r in (0, 1) for c, q, w in self.taps[r] if c == band)
            for band in (0, 1)
        )
        return low, high


_ORTHONORMAL_TOL = 1e-10


def _is_orthonormal(low: tuple[float, ...], high: tuple[float, ...]) -> bool:
    r"""Whether a two-channel synthesis filter bank is orthonormal (to :data:`_ORTHONORMAL_TOL`).

    The (periodized, any even size) synthesis is orthogonal exactly when the
    filters are orthonormal to their own and each other's even shifts:
    :math:`\sum_j f_j f'_{j+2t} = \delta_{ff'} \delta_{t0}` for all :math:`t`.
    PyWavelets' ``orthogonal`` flag is not enough: its FIR approximation of the
    Meyer wavelet (``dmey``) is flagged orthogonal but misses by about 2e-3.
    """
    pairs = ((low, low, 1.0), (high, high, 1.0), (low, high, 0.0))
    for f, g, norm in pairs:
        corr = np.correlate(np.asarray(f), np.asarray(g), mode="full")
        centre = len(g) - 1
        for lag in range(centre % 2, len(corr), 2):
            target = norm if lag == centre else 0.0
            if abs(corr[lag] - target) > _ORTHONORMAL_TOL:
                return False
    return True


@functools.cache
def _polyphase(wavelet: str) -> _Polyphase:
    """Return the polyphase taps of a PyWavelets discrete wavelet."""
    w = pywt.Wavelet(wavelet)
    filters = (tuple(w.rec_lo), tuple(w.rec_hi))
    taps_len = len(filters[0])
    shift = taps_len // 2 - 1
    pad = taps_len // 4
    phases = []
    for r in (0, 1):
        phase = []
        for c, filt in enumerate(filters):
            for q in range(2 * pad + 1):
                j = 2 * (pad - q) + r + shift
                if 0 <= j < taps_len and filt[j] != 0.0:
                    phase.append((c, q, float(filt[j])))
        phases.append(tuple(phase))
    return _Polyphase(pad=pad, taps=(phases[0], phases[1]), orthogonal=_is_orthonormal(*filters))


def _wrap(x: Tensor, pad: int, dim: int) -> Tensor:
    """Pad ``x`` circularly by ``pad`` on both sides of ``dim`` (wrapping as often as needed)."""
    size = x.shape[dim]
    if pad == 0:
        return x
    if pad <= size:
        return torch.cat((x.narrow(dim, size - pad, pad), x, x.narrow(dim, 0, pad)), dim=dim)
    index = torch.arange(-pad, size + pad, device=x.device) % size
    return x.index_select(dim, index)


def _weighted_sum(terms: list[tuple[Tensor, float]]) -> Tensor:
    first, weight = terms[0]
    acc = first * weight
    for term, weight in terms[1:]:
        acc.add_(term, alpha=weight)
    return acc


def _synthesis_1d(low: Tensor, high: Tensor, poly: _Polyphase, dim: int) -> Tensor:
    """Periodized 1-D synthesis along the negative dimension ``dim`` (``h`` -> ``2h``)."""
    half = low.shape[dim]
    bands = (_wrap(low, poly.pad, dim), _wrap(high, poly.pad, dim))
    phases = [
        _weighted_sum([(bands[c].narrow(dim, q, half), w) for c, q, w in poly.taps[r]])
        for r in (0, 1)
    ]
    return torch.stack(phases, dim=dim).flatten(dim - 1, dim)


def _analysis_1d(signal: Tensor, poly: _Polyphase, dim: int) -> tuple[Tensor, Tensor]:
    """Adjoint of :func:`_synthesis_1d` along the negative dimension ``dim`` (``2h`` -> ``h``)."""
    half = signal.shape[dim] // 2
    axis = signal.ndim + dim
    split = signal.reshape(*signal.shape[:axis], half, 2, *signal.shape[axis + 1 :])
    phases = [_wrap(split.select(dim, r), poly.pad, dim) for r in (0, 1)]
    start = 2 * poly.pad
    low, high = (
        _weighted_sum(
            [(phases[r].narrow(dim, start - q, half), w) for r, q, w in poly.adjoint_taps[c]]
        )
        for c in (0, 1)
    )
    return low, high


def _synthesis_2d(spectrum: Tensor, poly: _Polyphase) -> Tensor:
    r""":math:`T(F) = S_m \begin{bmatrix} a & v \\ h & d \end{bmatrix} S_n^\top`."""
    hm, hn = spectrum.shape[-2] // 2, spectrum.shape[-1] // 2
    a, h = spectrum[..., :hm, :hn], spectrum[..., :hm, hn:]
    v, d = spectrum[..., hm:, :hn], spectrum[..., hm:, hn:]
    top = _synthesis_1d(a, v, poly, -1)
    bottom = _synthesis_1d(h, d, poly, -1)
    return _synthesis_1d(top, bottom, poly, -2)


def _analysis_2d(matrix: Tensor, poly: _Polyphase) -> Tensor:
    """The adjoint :math:`T^*` of :func:`_synthesis_2d`, back in the quadrant layout."""
    top, bottom = _analysis_1d(matrix, poly, -2)
    a, v = _analysis_1d(top, poly, -1)
    h, d = _analysis_1d(bottom, poly, -1)
    return torch.cat((torch.cat((a, h), dim=-1), torch.cat((v, d), dim=-1)), dim=-2)


class _Synthesis(torch.autograd.Function):
    """:func:`_synthesis_2d` with :func:`_analysis_2d` as its backward (any order)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(spectrum: Tensor, poly: _Polyphase) -> Tensor:
        return _synthesis_2d(spectrum, poly)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.poly = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _Analysis.apply(grad, ctx.poly), None  # type: ignore[no-untyped-call]

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None) -> Tensor:
        return _synthesis_2d(tangent, ctx.poly)


class _Analysis(torch.autograd.Function):
    """:func:`_analysis_2d` with :func:`_synthesis_2d` as its backward (any order)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(matrix: Tensor, poly: _Polyphase) -> Tensor:
        return _analysis_2d(matrix, poly)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.poly = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _Synthesis.apply(grad, ctx.poly), None  # type: ignore[no-untyped-call]

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None) -> Tensor:
        return _analysis_2d(tangent, ctx.poly)


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
    the Frobenius norm; :attr:`orthonormal` is read off the filters themselves
    (orthonormal to their even shifts, to 1e-10), not from PyWavelets' flag,
    which also marks the only approximately orthogonal ``dmey``. Only even
    ``m`` and ``n`` are accepted.

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
        self._poly = _polyphase(name)
        self.orthonormal = self._poly.orthogonal

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

    def inverse(self, spectrum: Tensor) -> Tensor:
        """Return the periodized one-level 2-D inverse DWT of the quadrants of ``F``.

        Args:
            spectrum: real tensor ``(..., m, n)`` with even ``m``, ``n``.

        Returns:
            Real tensor of the same shape and dtype.
        """
        out: Tensor = _Synthesis.apply(spectrum, self._poly)  # type: ignore[no-untyped-call]
        return out

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
