"""Shapes a basis accepts, for contract tests that run over every basis of ``list_bases()``.

Import it as ``from basis_shapes import fit_shape`` (pytest puts this folder
on ``sys.path``; the name is unique). A test written for a small shape such
as ``(4, 6)`` runs a basis that refuses it (``db4-l2`` needs 4 to divide both
sides, ``db2-boundary`` sides of at least 4) on the nearest shape it accepts,
found through the basis' own ``check_shape``, so the test needs no knowledge
of the basis.
"""

from __future__ import annotations

import functools

from selora.spectral_bases import InverseTransform, get_basis

_SEARCH = 64  # how far beyond the asked sizes a shape is looked for


def accepts(basis: InverseTransform | str, m: int, n: int) -> bool:
    """Whether ``basis`` transforms an ``(m, n)`` matrix (its ``check_shape`` passes)."""
    instance = get_basis(basis) if isinstance(basis, str) else basis
    try:
        instance.check_shape(m, n)
    except ValueError:
        return False
    return True


@functools.cache
def _fit(name: str, m: int, n: int) -> tuple[int, int]:
    candidates = sorted(
        ((m + i, n + j) for i in range(_SEARCH) for j in range(_SEARCH)),
        key=lambda s: (s[0] + s[1], s[0]),
    )
    basis = get_basis(name)
    for rows, cols in candidates:
        if accepts(basis, rows, cols):
            return rows, cols
    raise AssertionError(f"basis {name!r} accepts no shape near ({m}, {n})")


def fit_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return ``shape``, its last two sizes grown (least first) until ``name`` accepts them.

    Args:
        name: a basis name for :func:`get_basis`.
        shape: ``(..., m, n)``; leading (batch) sizes are kept.

    Returns:
        ``shape`` itself when the basis accepts ``(m, n)``; otherwise the
        accepted ``(..., m', n')`` with ``m' >= m``, ``n' >= n`` and the least
        ``m' + n'``.
    """
    *batch, m, n = shape
    return (*batch, *_fit(name, m, n))
