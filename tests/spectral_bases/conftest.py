"""Shared fixtures of the spectral-basis tests (no __init__.py: module names are unique)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from selora.spectral_bases import InverseTransform, list_bases, register_basis, unregister_basis

DenseOperator = Callable[..., torch.Tensor]


def _dense_operator(
    basis: InverseTransform, shape: tuple[int, int], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The (mn x mn) matrix D of T on row-major flattened matrices: D[:, p] = vec T(e_p).

    Built one unit spectrum at a time (no batching), so it relies on nothing
    but T applied to a single (m, n) matrix.
    """
    m, n = shape
    columns = []
    for p in range(m * n):
        unit = torch.zeros(m * n, dtype=dtype)
        unit[p] = 1.0
        columns.append(basis(unit.view(m, n)).reshape(-1))
    return torch.stack(columns, dim=1)


@pytest.fixture
def dense_operator() -> DenseOperator:
    """Return a builder of the dense float64 matrix of a basis (see ``_dense_operator``)."""
    return _dense_operator


def brute_force_energy(columns: torch.Tensor, tol: float = 1e-9) -> float:
    """The energy of an active set from its unit matrices, the columns of ``columns``.

    ``sum_p ||T e_p||^2``, except that parallel columns (fft's p and -p) form one
    group of energy ``(sum of their norms)^2``: found by comparing every pair of
    normalised columns, so it needs no knowledge of the basis.
    """
    norms = columns.norm(dim=0)
    unit = columns / norms
    gram = (unit.T @ unit).abs()
    k = columns.shape[1]
    group = list(range(k))
    for p in range(k):
        if group[p] == p:
            for q in torch.nonzero(gram[p, p + 1 :] > 1.0 - tol).flatten().tolist():
                group[p + 1 + q] = p
    sums: dict[int, float] = {}
    for p in range(k):
        sums[group[p]] = sums.get(group[p], 0.0) + float(norms[p])
    return sum(v * v for v in sums.values())


@pytest.fixture
def energy_of() -> Callable[[torch.Tensor], float]:
    """Return :func:`brute_force_energy`."""
    return brute_force_energy


@pytest.fixture
def temporary_basis() -> Iterator[Callable[..., type[InverseTransform]]]:
    """Register bases for one test and unregister every one of them afterwards."""
    names: list[str] = []

    def register(
        name: str, cls: type[InverseTransform], *, override: bool = False
    ) -> type[InverseTransform]:
        registered = register_basis(name, override=override)(cls)
        names.append(name)
        return registered

    yield register
    for name in dict.fromkeys(names):
        if name in list_bases():
            unregister_basis(name)
