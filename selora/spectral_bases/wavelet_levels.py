r"""Multi-level wavelet synthesis: the wavedec2 layout, its shape rule and its energy classes.

A :math:`J`-level spectrum :math:`F \in \mathbb{R}^{m \times n}` is read in
PyWavelets' ``wavedec2`` order: the level-:math:`j` block
:math:`F_j = F[{:}m_j, {:}n_j]`, :math:`m_j = m / 2^{j-1}`,
:math:`n_j = n / 2^{j-1}`, holds four quadrants
:math:`\begin{bmatrix} a_j & h_j \\ v_j & d_j \end{bmatrix}` of shape
:math:`(m_j / 2, n_j / 2)`, and the approximation :math:`a_j` of every level
but the coarsest is itself the next block :math:`F_{j+1}`. So the
approximation :math:`a_J` sits in the top-left :math:`(m / 2^J, n / 2^J)`
block, and the details of level :math:`j` in the three other quadrants of
:math:`F_j`. The synthesis runs from the coarsest level to the finest,

.. math::

    x_J = T_1\big(F_J\big), \qquad
    x_{j} = T_1\Big(\begin{bmatrix} x_{j+1} & h_j \\ v_j & d_j \end{bmatrix}\Big),
    \qquad T(F) = x_1,

with :math:`T_1` the one-level synthesis of the block's size; this equals
``pywt.waverec2([a_J, (h_J, v_J, d_J), ..., (h_1, v_1, d_1)], wavelet)``.
Each quadrant is placed as in the one-level basis (``h``, PyWavelets'
``cH``, top-right), so :math:`J = 1` is the one-level basis itself.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from selora._tensor_cache import LocationCache
from selora.spectral_bases._gather import SourceGather, gather_plan, gather_with_zero

__all__ = [
    "LevelStep",
    "level_classes",
    "level_corners",
    "shape_problem",
    "synthesize_levels",
    "synthesize_levels_sparse",
]

LevelStep = Callable[[int, int], tuple[Tensor, Callable[[Tensor], Tensor]]]
"""``(m_j, n_j) -> (gather, finish)``: a one-level synthesis as a gather and the rest.

:math:`T_1(F_j)` = ``finish(F_j.flatten(-2)[..., gather])`` for a block of
``(m_j, n_j)``: the gather forms the first axis' band windows, ``finish``
applies the axes' matrices.
"""


def shape_problem(m: int, n: int, levels: int, min_length: int = 1) -> str | None:
    r"""Say why a ``levels``-level transform cannot map ``(m, n)`` to itself (``None`` if it can).

    Every level halves both sides of its block, so :math:`2^J` must divide
    ``m`` and ``n``; a boundary wavelet also needs each level's block at
    least as long as its filter: :math:`m / 2^{J-1} \ge L` and
    :math:`n / 2^{J-1} \ge L` (``min_length`` :math:`= L`).

    Args:
        m: number of rows.
        n: number of columns.
        levels: :math:`J \ge 1`.
        min_length: the shortest block side allowed at every level.

    Returns:
        The reason, to follow ``"... needs "``, or ``None``.
    """
    step = 2**levels
    if m < step or n < step or m % step or n % step:
        if levels == 1:
            return "even m and n >= 2"
        return f"m and n divisible by 2^{levels} = {step} (levels={levels})"
    coarsest = (m >> (levels - 1), n >> (levels - 1))
    if min(coarsest) < min_length:
        if levels == 1:
            return f"m and n >= {min_length}, its filter length"
        return (
            f"m / 2^{levels - 1} and n / 2^{levels - 1} >= {min_length}, its filter length "
            f"(levels={levels}: the coarsest level's block is {coarsest})"
        )
    return None


def synthesize_levels(
    spectrum: Tensor, levels: int, one_level: Callable[[Tensor], Tensor]
) -> Tensor:
    r"""Run ``one_level`` from the coarsest block to the finest (see the module docstring).

    Args:
        spectrum: real tensor ``(..., m, n)``, ``m`` and ``n`` divisible by :math:`2^J`.
        levels: :math:`J \ge 1`; ``1`` returns ``one_level(spectrum)`` itself.
        one_level: the one-level synthesis :math:`T_1` of a block ``(..., m_j, n_j)``.

    Returns:
        :math:`T(F)`, same shape and dtype.
    """
    if levels == 1:
        return one_level(spectrum)
    m, n = spectrum.shape[-2:]
    shift = levels - 1
    out = one_level(spectrum[..., : m >> shift, : n >> shift])
    for level in range(shift - 1, -1, -1):
        rows, cols = m >> level, n >> level
        top = torch.cat((out, spectrum[..., : rows // 2, cols // 2 : cols]), dim=-1)
        block = torch.cat((top, spectrum[..., rows // 2 : rows, :cols]), dim=-2)
        out = one_level(block)
    return out


_composed = LocationCache()


def synthesize_levels_sparse(
    coefficients: Tensor,
    indices: Tensor,
    shape: tuple[int, int],
    levels: int,
    step: LevelStep,
    key: Hashable,
) -> Tensor:
    r""":func:`synthesize_levels` of :math:`\operatorname{scatter}(s, \Omega)`, blocks never built.

    Each level's gather reads its block :math:`F_j` at fixed positions.
    Composed with the scatter and with the block's layout, it reads a source
    instead: the coarsest level reads :math:`[s, 0]`; level :math:`j < J`
    reads :math:`[x_{j+1}, s, 0]` (the coarser level's synthesis flattened,
    which fills the top-left quadrant, then the coefficients for the detail
    quadrants; every inactive position reads the zero). So no dense spectrum,
    no block and no concatenation of quadrants is formed, and the backward of
    each gather is a gather plus an indexed add where windows overlap
    (:func:`~selora.spectral_bases._gather.gather_plan`).
    The composed positions are cached per location tensor (``key`` names
    whatever else the blocks' layouts depend on: the wavelet, the boundary).

    Args:
        coefficients: real tensor ``(..., k)``.
        indices: the ``k`` distinct flat positions of :math:`\Omega` in ``F``.
        shape: ``(m, n)``, divisible by :math:`2^J`.
        levels: :math:`J \ge 1`.
        step: the one-level synthesis of each block size (:data:`LevelStep`).
        key: hashable; equal keys must give equal gathers for equal sizes.

    Returns:
        :math:`T(F)`, ``(..., m, n)``.
    """
    m, n = shape
    k = coefficients.shape[-1]
    sizes = [(m >> level, n >> level) for level in range(levels - 1, -1, -1)]
    steps = [step(rows, cols) for rows, cols in sizes]

    def build() -> list[SourceGather]:
        device = indices.device
        inverse = torch.full((m * n,), k, dtype=torch.int64, device=device)
        inverse[indices.reshape(-1).to(torch.int64)] = torch.arange(k, device=device)
        plans = []
        for level, ((size_m, size_n), (gather, _)) in enumerate(zip(sizes, steps, strict=True)):
            rows, cols = gather.to(device) // size_n, gather.to(device) % size_n
            source = inverse[rows * n + cols]  # the block is F's top-left corner
            count = k
            if level:  # below the coarsest: the top-left quadrant is x_{j+1}
                half_m, half_n = size_m // 2, size_n // 2
                inside = (rows < half_m) & (cols < half_n)
                source = torch.where(inside, rows * half_n + cols, source + half_m * half_n)
                count += half_m * half_n
            plans.append(gather_plan(source, count))
        return plans

    plans = _composed.get(indices, (indices.device, key, m, n, levels), build)
    out: Tensor | None = None
    for (_, finish), plan in zip(steps, plans, strict=True):
        if out is None:
            out = finish(gather_with_zero(coefficients, plan))
        else:
            out = finish(gather_with_zero(out.flatten(-2), plan, tail=coefficients))
    assert out is not None
    return out


def level_classes(shape: tuple[int, int], levels: int, flat: Tensor) -> Tensor:
    r"""Return the class ``3 (j - 1) + q`` of each flat position (``0`` for :math:`a_J`).

    Position :math:`(r, c)` lies in the block of level :math:`j`, the largest
    with :math:`r < m_j` and :math:`c < n_j`, in its quadrant
    :math:`q \in \{1, 2, 3\}` (``h``, ``v``, ``d``), or in :math:`a_J`
    (:math:`q = 0` at :math:`j = J`). A periodized synthesis is
    shift-invariant within a class: moving a level-:math:`j` coefficient one
    place along its band moves its synthesis function circularly by
    :math:`2^j` samples, which keeps its norm. So
    :math:`\|T(e_p)\|_F` depends on the class of :math:`p` only.

    Args:
        shape: ``(m, n)``, both divisible by :math:`2^J`.
        levels: :math:`J`.
        flat: int64 flat positions ``r n + c``.

    Returns:
        int64 classes in ``[0, 3 J]``, the shape of ``flat``: for :math:`J = 1`
        the quadrants ``a, h, v, d`` in this order.
    """
    m, n = shape
    rows, cols = flat // n, flat % n
    classes = torch.zeros_like(flat)
    for level in range(1, levels + 1):  # a position is a detail of one level at most
        size_m, size_n = m >> (level - 1), n >> (level - 1)
        inside = (rows < size_m) & (cols < size_n)
        quadrant = (rows >= size_m // 2).long() * 2 + (cols >= size_n // 2).long()
        detail = inside & (quadrant > 0)
        classes = torch.where(detail, 3 * (level - 1) + quadrant, classes)
    return classes


def level_corners(shape: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Return one position per class of :func:`level_classes`: each quadrant's top-left corner.

    Args:
        shape: ``(m, n)``, both divisible by :math:`2^J`.
        levels: :math:`J`.

    Returns:
        ``3 J + 1`` ``(row, col)`` pairs, in class order.
    """
    m, n = shape
    corners = [(0, 0)]
    for level in range(1, levels + 1):
        half_m, half_n = m >> level, n >> level
        corners += [(0, half_n), (half_m, 0), (half_m, half_n)]
    return corners
