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
