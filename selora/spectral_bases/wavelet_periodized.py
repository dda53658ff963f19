"""The fast periodized one-level 2-D inverse DWT: polyphase taps, plans, synthesis.

The synthesis is separable and written in plain torch as three large
operations: one gather of the spectrum into overlapping, circularly wrapped
band windows along one axis, one matrix product with that axis' small block
matrix (or its dense synthesis matrix when the axis is short), and one
product with the dense synthesis matrix of the other axis. Autograd's
backward through them is the exact adjoint (the periodized analysis), so
forward and backward run at FFT-like speed or better on the CPU and issue a
handful of kernels on a GPU. Filters of any length work, also when a filter
is longer than half the signal and the periodic wrap folds it more than once.
The basis classes are in :mod:`selora.spectral_bases.wavelet`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pywt
import torch
from torch import Tensor

from selora._tensor_cache import tensor_cache
from selora.spectral_bases._gather import select_last

__all__ = ["polyphase_taps"]


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


def polyphase_taps(wavelet: str) -> _Polyphase:
    """Return the polyphase taps of a PyWavelets discrete wavelet (``wavelet._polyphase`` caches).

    Args:
        wavelet: a PyWavelets discrete wavelet name.

    Returns:
        Its :class:`_Polyphase`.
    """
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
# preferred). A block's matrix costs 2 (b + 2 pad) products per output sample,
# so smaller blocks waste less on the overlap, down to where the products get
# too small to run fast. Forming SmolLM2's factor shapes batched, forward and
# backward, one thread, paired: 8 pairs took 0.92 (db4), 0.85 (haar), 0.91
# (coif1) and 0.95 (bior2.2) of the time of 16 pairs, 12 pairs 0.95-1.08 of
# it; 6 pairs took 1.01-1.09 of the time of 8, and 4 pairs 1.32-1.40.
_BLOCK = 8


def _axis_block(half: int, other: int, pad: int) -> int:
    """Output pairs per block along an axis of ``2 half`` samples (``half``: dense).

    ``other`` is the length of the other axis. Blocks of a divisor of ``half``
    near ``max(8, 2 pad)`` are preferred (no cropped block); an axis too short
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
    m, n = spectrum.shape[-2:]
    return _synthesize_windows(select_last(spectrum.flatten(-2), plan.gather), plan, m, n)


def _synthesize_windows(windows: Tensor, plan: _Plan, m: int, n: int) -> Tensor:
    """The synthesis from the gathered windows ``(..., len(plan.gather))`` (:func:`_synthesize`)."""
    batch = windows.shape[:-1]
    length = m if plan.rows_first else n
    first_rows = n if plan.rows_first else m
    width = plan.first.shape[1]
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
