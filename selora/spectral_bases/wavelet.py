"""Wavelet bases: one level of the periodized 2-D inverse discrete wavelet transform.

The synthesis is separable and written in plain torch as three large
operations: one gather of the spectrum into overlapping, circularly wrapped
band windows along one axis, one matrix product with that axis' small block
matrix (or its dense synthesis matrix when the axis is short), and one
product with the dense synthesis matrix of the other axis. Autograd's
backward through them is the exact adjoint (the periodized analysis), so
forward and backward run at FFT-like speed or better on the CPU and issue a
handful of kernels on a GPU. Filters of any length work, also when a filter
is longer than half the signal and the periodic wrap folds it more than once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import numpy as np
import pywt
import torch
from torch import Tensor

from selora._tensor_cache import tensor_cache
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
    :math:`(c, q, w_{rcq})`. Equality and hashing use the wavelet's name only
    (it keys the caches of :func:`_plan`).
    """

    wavelet: str
    pad: int = dataclasses.field(compare=False)
    taps: tuple[tuple[tuple[int, int, float], ...], tuple[tuple[int, int, float], ...]] = (
        dataclasses.field(compare=False)
    )
    orthogonal: bool = dataclasses.field(compare=False)


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
    return _Polyphase(
        wavelet=wavelet,
        pad=pad,
        taps=(phases[0], phases[1]),
        orthogonal=_is_orthonormal(*filters),
    )


# An axis of at most this length, and no longer than the other axis, is
# synthesized by its dense (N, N) matrix (at most 16 KiB in float32, and no
# larger than the spectrum); any other blockwise, by a short matrix applied to
# overlapping windows of the bands, so no matrix grows with the layer. (An
# axis too short for blocks stays dense: a matrix of at most 64 x 64.)
_DENSE_MAX = 64
# Output pairs per block of the blockwise route (a divisor of N/2 near it is
# preferred): 16 measured best for haar, db4 and coif1 at N = 384 .. 4096.
_BLOCK = 16


def _axis_block(half: int, other: int, pad: int) -> int:
    """Output pairs per block along an axis of ``2 half`` samples (``half``: dense).

    ``other`` is the length of the other axis. Blocks of a divisor of ``half``
    near ``max(16, 2 pad)`` are preferred (no cropped block); an axis too short
    for any block (under 16 or so samples) stays dense.
    """
    if 2 * half <= min(_DENSE_MAX, other):
        return half
    target = max(_BLOCK, 2 * pad)
    larger = range(target, min(2 * target, half - 1) + 1)
    smaller = range(min(target, half) - 1, target // 2 - 1, -1)
    fallback = target if target < half else half
    return next((b for b in (*larger, *smaller) if half % b == 0), fallback)


def _axis_windows(half: int, block: int, pad: int) -> Tensor:
    """``(blocks, window)`` band positions each block reads (all ``half`` when dense)."""
    if block == half:
        return torch.arange(half)[None]
    count = -(-half // block)
    starts = torch.arange(count)[:, None] * block - pad
    return (starts + torch.arange(block + 2 * pad)[None]) % half


def _axis_matrix(poly: _Polyphase, half: int, block: int, dtype: torch.dtype) -> Tensor:
    r"""The ``(2 b, 2 w)`` matrix taking a block's two band windows to its ``2 b`` samples.

    Row ``2 i + r`` is output sample :math:`x_{2i+r}` of the block, column
    ``c w + j`` is entry ``j`` of band ``c``'s window (:func:`_axis_windows`).
    Dense (``block == half``): the window is the whole band and the taps fold
    circularly, so this is the periodized synthesis matrix :math:`S_N` itself,
    also when the filter is longer than the signal.
    """
    dense = block == half
    window = half if dense else block + 2 * poly.pad
    taps = [(r, c, q, w) for r in (0, 1) for c, q, w in poly.taps[r]]
    phase, band, shift = (torch.tensor([t[i] for t in taps])[:, None] for i in range(3))
    weight = torch.tensor([t[3] for t in taps], dtype=torch.float64)[:, None]
    i = torch.arange(block)[None]
    col = i + shift - poly.pad
    col = col % half if dense else col + poly.pad
    rows = (2 * i + phase).flatten()
    cols = (band * window + col).flatten()
    matrix = torch.zeros(2 * block, 2 * window, dtype=torch.float64)
    matrix.index_put_((rows, cols), weight.expand(-1, block).flatten(), accumulate=True)
    return matrix.to(dtype)


class _Plan(NamedTuple):
    """Constants of one ``(m, n)`` synthesis (see :func:`_synthesize`)."""

    gather: Tensor  # flat positions of F gathered into the first axis' windows
    first: Tensor  # (2b, 2w) block matrix of the first axis
    rows_first: bool  # the first axis is the rows (m): its result is transposed
    second: Tensor  # dense S of the second axis, or its block matrix
    second_index: Tensor | None  # row windows when the second axis is blockwise too


@tensor_cache()
def _plan(poly: _Polyphase, m: int, n: int, dtype: torch.dtype, device: torch.device) -> _Plan:
    """Build the gather index and the matrices of the ``(m, n)`` synthesis."""
    hm, hn = m // 2, n // 2
    row_block, col_block = _axis_block(hm, n, poly.pad), _axis_block(hn, m, poly.pad)
    # An axis done blockwise goes first, so that the one gather of F also forms
    # its windows; the rows go first only when the columns are dense.
    rows_first = row_block != hm and col_block == hn
    # F[(J, k), (I, c)] as (J, k, I, c); G = [[a, v], [h, d]] has
    # G[(I, k), (J, c)] = F[(J, k), (I, c)]
    base = torch.arange(m * n).view(2, hm, 2, hn)
    if rows_first:  # G^T: rows (J, c), bands I, samples k
        bands = base.permute(0, 3, 2, 1).reshape(n, 2, hm)
        windows = _axis_windows(hm, row_block, poly.pad)
        first, second = _axis_matrix(poly, hm, row_block, dtype), _axis_matrix(poly, hn, hn, dtype)
    else:  # G: rows (I, k), bands J, samples c
        bands = base.permute(2, 1, 0, 3).reshape(m, 2, hn)
        windows = _axis_windows(hn, col_block, poly.pad)
        first, second = (
            _axis_matrix(poly, hn, col_block, dtype),
            _axis_matrix(poly, hm, row_block, dtype),
        )
    index = bands[:, :, windows].transpose(1, 2).flatten()  # (rows, blocks, band, window)
    second_index = None
    if not rows_first and row_block != hm:
        rows = _axis_windows(hm, row_block, poly.pad)[:, None] + torch.arange(2)[:, None] * hm
        second_index = rows.flatten().to(device)
    return _Plan(index.to(device), first.to(device), rows_first, second.to(device), second_index)


def _synthesize(spectrum: Tensor, plan: _Plan) -> Tensor:
    r""":math:`T(F) = S_m G S_n^\top` with :math:`G = \begin{bmatrix} a & v \\ h & d \end{bmatrix}`.

    One gather of ``F`` forms :math:`G` (or :math:`G^\top`) cut into the
    overlapping band windows of the first axis, circularly; one matrix product
    applies that axis' block matrix to all windows; one more product applies
    the dense :math:`S` of the other axis (when both axes are long, a gather of
    row windows and a product with its block matrix instead). Every step is a
    plain torch operation, so autograd's backward is the exact adjoint (the
    periodized analysis), with forward mode, vmap and torch.compile for free.
    """
    *batch, m, n = spectrum.shape
    length = m if plan.rows_first else n
    first_rows = n if plan.rows_first else m
    width = plan.first.shape[1]
    windows = spectrum.flatten(-2).index_select(-1, plan.gather)
    partial = windows.reshape(*batch, -1, width) @ plan.first.mT
    partial = partial.reshape(*batch, first_rows, -1)
    if partial.shape[-1] != length:
        partial = partial[..., :length]
    if plan.rows_first:  # partial = (S_m G)^T
        out: Tensor = partial.mT @ plan.second.mT
        return out
    if plan.second_index is None:  # partial = G S_n^T
        out = plan.second @ partial
        return out
    width = plan.second.shape[1]
    rows = partial.index_select(-2, plan.second_index).reshape(*batch, -1, width, n)
    out = (plan.second @ rows).reshape(*batch, -1, n)
    if out.shape[-2] != m:
        out = out[..., :m, :].contiguous()
    return out


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

    def options(self) -> dict[str, Any]:
        """Return the constructor arguments that rebuild this basis from its label.

        See :meth:`InverseTransform.options`. A basis built by a registered
        name (``haar``, ``db4``, ...) declares its wavelet only when it differs
        from the class' own (``HaarTransform(wavelet="sym4")``). A basis of no
        registered name is labelled by its wavelet, which
        ``get_basis(wavelet)`` resolves through the PyWavelets fallback, so the
        label already says everything.

        Returns:
            ``{"wavelet": name}`` or ``{}``.
        """
        if self.name and self.wavelet != type(self).wavelet:
            return {"wavelet": self.wavelet}
        return {}

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
        m, n = spectrum.shape[-2:]
        # Under torch.compile the constants are traced into the graph instead:
        # Dynamo does not honour functools caches and warns about them.
        build = _plan.__wrapped__ if torch.compiler.is_compiling() else _plan
        return _synthesize(spectrum, build(self._poly, m, n, spectrum.dtype, spectrum.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(wavelet={self.wavelet!r})"

    def active_energy(self, shape: tuple[int, int], indices: Tensor) -> float:
        r"""Return the energy of :math:`\Omega` (see :meth:`InverseTransform.active_energy`).

        An orthonormal filter bank gives :math:`\|T(e_p)\|_F = 1` for every
        ``p``, so :math:`E = k`. Otherwise (``bior``) the periodized synthesis
        is shift-invariant: moving a coefficient by one place within its band
        moves its synthesis function circularly by two samples, which keeps
        the norm. So :math:`\|T(e_p)\|_F^2` depends only on the quadrant
        (``a``, ``h``, ``v``, ``d``) of ``p``, four unit transforms give all
        of them, and :math:`E = \sum_q k_q \|T(e_{p_q})\|_F^2` with
        :math:`k_q` the active locations in quadrant :math:`q`.

        Args:
            shape: ``(m, n)``, both even.
            indices: the ``k`` distinct flat positions of :math:`\Omega`.

        Returns:
            :math:`E`.
        """
        m, n = int(shape[0]), int(shape[1])
        self.check_shape(m, n)
        flat = indices.detach().to("cpu", torch.int64).reshape(-1)
        if self.orthonormal:
            return float(flat.numel())
        hm, hn = m // 2, n // 2
        quadrant = (flat // n >= hm).long() * 2 + (flat % n >= hn).long()  # a, h, v, d
        counts = torch.bincount(quadrant, minlength=4).to(torch.float64)
        units = torch.zeros(4, m, n, dtype=torch.float64, device="cpu")
        for q, (row, col) in enumerate(((0, 0), (0, hn), (hm, 0), (hm, hn))):
            units[q, row, col] = 1.0
        energies = self(units).square().sum(dim=(-2, -1))
        return float(counts @ energies)


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
