r"""Boundary wavelets: the 2-D inverse DWT of ptwt's orthogonalized boundary filters.

ptwt's matrix transforms (``MatrixWavedec2`` / ``MatrixWaverec2``) handle the
ends of a signal with *boundary filters* instead of a periodic wrap: along an
axis of :math:`N` samples the one-level analysis matrix :math:`A_N` is the
strided convolution with the analysis filters, truncated at both ends, whose
truncated rows are then orthonormalized by a QR decomposition (the interior
rows of an orthogonal wavelet already are). For an orthogonal wavelet the
result is an orthogonal :math:`N \times N` matrix and the synthesis matrix is
its transpose, :math:`S_N = A_N^\top` (checked to rounding for haar, db, sym
and coif). For a biorthogonal wavelet the separately orthonormalized
analysis and synthesis matrices are not inverse to each other, so
:class:`~selora.spectral_bases.WaveletTransform` refuses that combination.

Here ptwt builds :math:`S_N` once per ``(wavelet, N)`` in float64 on the CPU
(:func:`ptwt.matmul_transform.construct_boundary_s`, the matrix its own
``MatrixWaverec2`` applies) and selora applies it with plain torch
operations, so autograd, forward mode, ``vmap`` and any dtype or device work
as for the periodized path: an axis of at most :data:`DENSE_MAX` samples by
its dense matrix; a longer one blockwise, as the periodized path does: its
output samples in blocks of about 32, each block reading a window of each
band (one gather), all interior blocks multiplied by the one matrix they
share (ptwt's interior rows are the plain strided filter, shifted by one
coefficient per two samples) and the few edge blocks, which hold the
boundary filters, corrected by the difference of their own. No matrix grows
with the layer. The one gather also swaps the mixed quadrants, and a
factor's gather reads its coefficients directly
(:func:`boundary_plan`, :func:`finish_boundary` and
:func:`~selora.spectral_bases.wavelet_levels.synthesize_levels_sparse`).
Building in float64 on the CPU and casting afterwards makes the matrices
identical on every device (QR's signs are not).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, cast

import pywt
import torch
from ptwt.matmul_transform import construct_boundary_s
from torch import Tensor

from selora._tensor_cache import tensor_cache
from selora.spectral_bases._gather import select_last

__all__ = [
    "DENSE_MAX",
    "boundary_matrix",
    "boundary_plan",
    "finish_boundary",
    "synthesize_boundary",
]

DENSE_MAX = 64
"""Axes of at most this many samples are applied by their dense ``(N, N)`` matrix."""


_NOISE = 1e-10
"""The largest entry :func:`boundary_matrix` may drop as rounding noise."""


@tensor_cache()
def boundary_matrix(wavelet: str, length: int) -> Tensor:
    r"""Return ptwt's one-level boundary synthesis matrix :math:`S_N`: sparse COO, float64, CPU.

    Column ``k`` of :math:`S_N` (``k < N/2``) is the synthesis function of
    low-pass coefficient ``k``, column ``N/2 + k`` that of high-pass
    coefficient ``k``: :math:`x = S_N \begin{bmatrix} a \\ d \end{bmatrix}`.
    It holds about :math:`L N` non-zeros for :math:`L` taps: coefficient
    ``k``'s function lives on samples near :math:`2k`. ptwt orthonormalizes
    the boundary rows of both ends in one QR decomposition, which leaves
    rounding noise (1e-17 for db2, 1e-14 for sym8) coupling the first
    samples with the last coefficients and vice versa; entries farther than
    :math:`4L + 4` samples from :math:`2k` are that noise (checked to be
    under 1e-10) and are dropped, so the matrix is banded. Built once per
    ``(wavelet, length)``, coalesced (non-zeros sorted by row, then column);
    ptwt's warnings about beta sparse formats are silenced.

    Args:
        wavelet: an orthogonal PyWavelets discrete wavelet name.
        length: :math:`N`, even and at least the filter length.

    Returns:
        The sparse ``(N, N)`` float64 matrix.

    Raises:
        RuntimeError: if an entry far from the band is not rounding noise
            (a ptwt that builds other matrices than this code expects).
    """
    taps = pywt.Wavelet(wavelet).dec_len
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sparse = construct_boundary_s(pywt.Wavelet(wavelet), length, "cpu", dtype=torch.float64)
    sparse = sparse.coalesce()
    rows, cols = sparse.indices()
    values = sparse.values()
    far = (rows - 2 * (cols % (length // 2))).abs() > 4 * taps + 4
    if far.any() and float(values[far].abs().max()) > _NOISE:
        raise RuntimeError(
            f"ptwt's boundary matrix of {wavelet!r} at length {length} has an entry of "
            f"{float(values[far].abs().max()):.3g} far from its band; expected rounding noise"
        )
    keep = ~far & (values != 0)
    return torch.sparse_coo_tensor(
        torch.stack((rows[keep], cols[keep])), values[keep], (length, length)
    ).coalesce()


class _AxisOperator(NamedTuple):
    r""":math:`S_N` in the form applied along one axis (see :func:`_axis_operator`).

    Short axis: ``dense`` only. Long axis: output samples go in blocks of
    ``2 b``; block ``i`` reads a window of ``w`` positions of each band
    (``gather``) and multiplies it by ``interior``, the ``(2 b, 2 w)`` matrix
    all interior blocks share; the blocks near the ends (``edges``), whose
    rows hold ptwt's boundary filters, have matrices of their own, applied as
    the interior product plus ``edge_corrections`` (their differences from
    ``interior``, taken in float64), so the edge blocks are added to, not
    copied over.
    """

    length: int  # N
    dense: Tensor | None  # (N, N) when N <= DENSE_MAX
    gather: Tensor | None  # (blocks * 2 w,) band positions read: low window, then high window
    interior: Tensor | None  # (2 b, 2 w)
    edges: Tensor | None  # (e,) blocks with matrices of their own
    edge_corrections: Tensor | None  # (e, 2 b, 2 w): each edge block's matrix - interior


def _block_pairs(half: int) -> int:
    """Output pairs per block: a divisor of ``half`` near 16 if there is one, else 16."""
    candidates: list[int] = [*range(16, 33), *range(15, 7, -1)]
    return next((pairs for pairs in candidates if half % pairs == 0), 16)


def _blocks(matrix: Tensor, length: int) -> tuple[Tensor, Tensor, int] | None:
    r"""Cut sparse :math:`S_N` into per-block windows and matrices (``None``: use it dense).

    Each non-zero :math:`S[r, c]` (``c`` in band ``c // (N/2)``, at position
    ``c % (N/2)``) lands in block ``r // 2b``; a block's window of each band
    starts at its smallest position (moved left where it would run past the
    band's end) and is as wide as the widest block needs. Interior blocks
    then hold the same matrix, shifted by ``b`` positions per block, since
    ptwt's interior rows are the plain strided filter.

    Returns:
        ``(gather, matrices, pairs)``: the ``(blocks, 2, w)`` band positions
        (high band offset by ``N/2``), the ``(blocks, 2 b, 2 w)`` float64
        matrices, and ``b``; ``None`` when a window would span a whole band.
    """
    half = length // 2
    pairs = _block_pairs(half)
    count = -(-half // pairs)
    rows, cols = matrix.indices()
    values = matrix.values()
    block, band, position = rows // (2 * pairs), cols // half, cols % half
    slot = block * 2 + band
    low = torch.full((count * 2,), half, dtype=torch.int64).scatter_reduce(
        0, slot, position, "amin"
    )
    high = torch.full((count * 2,), -1, dtype=torch.int64).scatter_reduce(0, slot, position, "amax")
    width = int((high - low + 1).clamp(min=0).max())
    if width >= half:
        return None
    start = low.clamp(max=half - width).view(count, 2)
    gather = start[:, :, None] + torch.arange(width) + torch.tensor([0, half])[:, None]
    offset = position - start[block, band]
    assert bool(((offset >= 0) & (offset < width)).all()), "a block window misses a non-zero"
    matrices = torch.zeros(count, 2 * pairs, 2 * width, dtype=torch.float64)
    matrices[block, rows - block * 2 * pairs, band * width + offset] = values
    return gather, matrices, pairs


@tensor_cache()
def _axis_operator(
    wavelet: str, length: int, dtype: torch.dtype, device: torch.device
) -> _AxisOperator:
    """Return :math:`S_N` for one axis, in ``dtype`` on ``device`` (cached)."""
    matrix = boundary_matrix(wavelet, length)
    cut = _blocks(matrix, length) if length > DENSE_MAX else None
    if cut is None:
        dense = matrix.to_dense().to(device=device, dtype=dtype)
        return _AxisOperator(length, dense, None, None, None, None)
    gather, matrices, _ = cut
    interior = matrices[matrices.shape[0] // 2]
    edges = [i for i, block in enumerate(matrices) if not torch.equal(block, interior)]
    index = torch.tensor(edges, dtype=torch.int64)

    def place(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype)

    return _AxisOperator(
        length,
        None,
        gather.flatten().to(device),
        place(interior),
        index.to(device),
        place(matrices[index] - interior),
    )


class _BoundaryPlan(NamedTuple):
    """Constants of one ``(m, n)`` boundary synthesis (see :func:`finish_boundary`)."""

    gather: Tensor  # flat positions of F read into the first axis' windows (or into G)
    rows_first: bool  # the rows are blockwise and the columns dense: windows along the rows
    rows: _AxisOperator
    columns: _AxisOperator


@tensor_cache()
def _boundary_plan(
    wavelet: str, m: int, n: int, dtype: torch.dtype, device: torch.device
) -> _BoundaryPlan:
    """Build the gather of :func:`finish_boundary`'s windows, with the quadrant swap in it."""
    rows = _axis_operator(wavelet, m, dtype, device)
    columns = _axis_operator(wavelet, n, dtype, device)
    half_m, half_n = m // 2, n // 2
    # F[(J, k), (I, c)] as (J, k, I, c); G = [[a, v], [h, d]] has
    # G[(I, k), (J, c)] = F[(J, k), (I, c)]
    swap = torch.arange(m * n).view(2, half_m, 2, half_n).permute(2, 1, 0, 3).reshape(m, n)
    rows_first = rows.dense is None and columns.dense is not None
    if rows_first:  # G^T's rows cut into windows along m
        assert rows.gather is not None
        gather = swap.T[:, rows.gather]
    elif columns.dense is None:  # G's rows cut into windows along n
        assert columns.gather is not None
        gather = swap[:, columns.gather]
    else:
        gather = swap
    return _BoundaryPlan(gather.flatten().to(device), rows_first, rows, columns)


# ptwt builds sparse tensors, which Dynamo cannot trace: torch.compile breaks
# the graph here and runs this (cached) lookup eagerly.
_Lookup = Callable[[str, int, int, torch.dtype, torch.device], _BoundaryPlan]
boundary_plan = cast(_Lookup, torch.compiler.disable(_boundary_plan))  # type: ignore[no-untyped-call]
"""``(wavelet, m, n, dtype, device) -> plan``, cached; what :func:`finish_boundary` takes."""


def _apply_windows(op: _AxisOperator, windows: Tensor) -> Tensor:
    r"""The blocks of :math:`S_N` applied to their band windows ``(..., R, blocks, 2 w)``.

    Returns ``(..., R, N)``: row ``i`` is :math:`S_N` applied to the signal
    whose windows are ``windows[..., i, :, :]``. All blocks go through the
    interior matrix in one product; the few edge blocks then get their
    corrections added in place, in one product batched over the edges
    (``einsum``, so no matrix is copied per row as a broadcast ``matmul``
    would, and nothing of the full size is copied forward or backward).
    """
    assert op.interior is not None and op.edges is not None and op.edge_corrections is not None
    out = windows @ op.interior.mT  # (..., R, blocks, 2b); the product saves no output
    if op.edges.numel():
        edge = windows.index_select(-2, op.edges)
        out.index_add_(-2, op.edges, torch.einsum("...ej,eij->...ei", edge, op.edge_corrections))
    out = out.flatten(-2)
    return out if out.shape[-1] == op.length else out[..., : op.length]


def _apply_rows(op: _AxisOperator, x: Tensor) -> Tensor:
    r""":math:`S_m X` for ``x`` of shape ``(..., m, n)``."""
    if op.dense is not None:
        return op.dense @ x
    assert op.gather is not None and op.interior is not None
    assert op.edges is not None and op.edge_corrections is not None
    *batch, _, n = x.shape
    width = op.interior.shape[1]
    windows = x.index_select(-2, op.gather).reshape(*batch, -1, width, n)
    out = op.interior @ windows  # (..., blocks, 2b, n)
    if op.edges.numel():
        out.index_add_(-3, op.edges, op.edge_corrections @ windows.index_select(-3, op.edges))
    out = out.reshape(*batch, -1, n)
    return out if out.shape[-2] == op.length else out[..., : op.length, :]


def _apply_columns(op: _AxisOperator, x: Tensor) -> Tensor:
    r""":math:`X S_n^\top` for ``x`` of shape ``(..., m, n)``."""
    if op.dense is not None:
        return x @ op.dense.mT
    assert op.gather is not None and op.interior is not None
    *batch, m, _ = x.shape
    windows = select_last(x, op.gather).reshape(*batch, m, -1, op.interior.shape[1])
    return _apply_windows(op, windows)


def finish_boundary(windows: Tensor, plan: _BoundaryPlan, m: int, n: int) -> Tensor:
    r""":math:`T(F) = S_m G S_n^\top` from ``F`` read at ``plan.gather`` (``(..., L)``).

    The gather holds the quadrant swap and the first axis' band windows:
    with the rows blockwise and the columns dense, the windows of
    :math:`G^\top`'s rows, so :math:`(S_m G)^\top` comes out of one product
    and :math:`S_n` is applied to its transpose; otherwise those of
    :math:`G`'s rows (or :math:`G` itself when both axes are dense), then
    :math:`S_m` from the left.

    Args:
        windows: ``F.flatten(-2)[..., plan.gather]``.
        plan: :func:`boundary_plan` of ``(m, n)``.
        m: rows.
        n: columns.

    Returns:
        :math:`T(F)`, ``(..., m, n)``.
    """
    batch = windows.shape[:-1]
    if plan.rows_first:
        assert plan.rows.interior is not None and plan.columns.dense is not None
        width = plan.rows.interior.shape[1]
        part = _apply_windows(plan.rows, windows.view(*batch, n, -1, width))  # (S_m G)^T
        out: Tensor = part.mT @ plan.columns.dense.mT
        return out
    if plan.columns.dense is None:
        assert plan.columns.interior is not None
        width = plan.columns.interior.shape[1]
        part = _apply_windows(plan.columns, windows.view(*batch, m, -1, width))  # G S_n^T
    else:
        part = windows.view(*batch, m, n) @ plan.columns.dense.mT
    return _apply_rows(plan.rows, part)


def synthesize_boundary(spectrum: Tensor, wavelet: str) -> Tensor:
    r"""One level of the boundary-wavelet 2-D inverse DWT of ``F = [[a, h], [v, d]]``.

    .. math::

        T(F) = S_m \begin{bmatrix} a & v \\ h & d \end{bmatrix} S_n^\top,

    with ``h`` high-pass along the rows (axis 0), as PyWavelets' ``cH`` and as
    in the periodized basis. (ptwt's matrix transforms name the two mixed
    quadrants the other way round: their ``(h, v)`` is PyWavelets'
    ``(v, h)``; the matrices are the same.) The quadrant swap
    ``G[(I, k), (J, c)] = F[(J, k), (I, c)]`` (half indices ``I, J``) is part
    of the one gather that forms the first axis' windows (:func:`finish_boundary`).

    Args:
        spectrum: real tensor ``(..., m, n)``, ``m`` and ``n`` even and at
            least the filter length.
        wavelet: an orthogonal PyWavelets discrete wavelet name.

    Returns:
        :math:`T(F)`, same shape and dtype.
    """
    m, n = spectrum.shape[-2:]
    plan = boundary_plan(wavelet, m, n, spectrum.dtype, spectrum.device)
    return finish_boundary(select_last(spectrum.flatten(-2), plan.gather), plan, m, n)
