"""Every bad input to a basis or a SparseSpectrum gets its own, explicit error."""

from __future__ import annotations

import math

import pytest
import torch

from selora.spectral_bases import (
    SparseSpectrum,
    UnknownBasisError,
    coefficient_budget,
    get_basis,
    list_bases,
    spectral_locations,
)

BASES = list_bases()
WAVELETS = [name for name in BASES if name not in ("fft", "dct")]


def test_wavelet_list_is_not_empty() -> None:
    assert {"haar", "db4", "bior", "coif"} <= set(WAVELETS)


@pytest.mark.parametrize(
    "budget",
    [{}, {"sparse_ratio": 0.5, "n_coeffs": 3}, {"sparse_ratio": None, "n_coeffs": None}],
)
def test_exactly_one_budget(budget: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"exactly one of sparse_ratio.*n_coeffs"):
        SparseSpectrum((4, 6), "fft", **budget)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ratio", [1.0, -0.1, 1.5, True, False, math.nan, math.inf, -math.inf, "0.5", 1 + 0j]
)
def test_sparse_ratio_outside_unit_interval(ratio: object) -> None:
    # the message names the range itself (not just "leaves no coefficient" for 1.0)
    with pytest.raises(ValueError, match=r"sparse_ratio.*\[0, 1\)"):
        SparseSpectrum((4, 6), "fft", sparse_ratio=ratio)  # type: ignore[arg-type]


def test_sparse_ratio_edges_that_are_fine() -> None:
    assert SparseSpectrum((4, 6), "fft", sparse_ratio=0.0).n_coeffs == 24
    assert SparseSpectrum((4, 6), "fft", sparse_ratio=0).n_coeffs == 24
    assert coefficient_budget((4, 6), sparse_ratio=0.95) == 1  # floor(0.05 * 24)


@pytest.mark.parametrize(("shape", "ratio"), [((2, 2), 0.9), ((4, 6), 0.99), ((1, 1), 0.5)])
def test_ratio_that_leaves_no_coefficient(shape: tuple[int, int], ratio: float) -> None:
    assert math.floor((1 - ratio) * shape[0] * shape[1]) == 0
    with pytest.raises(ValueError, match="leaves no coefficient"):
        SparseSpectrum(shape, "fft", sparse_ratio=ratio)


@pytest.mark.parametrize("k", [0, -1, 25, 10**9, 2.0, 3.5, True, "3", None])
def test_bad_n_coeffs(k: object) -> None:
    with pytest.raises(ValueError, match="n_coeffs"):
        SparseSpectrum((4, 6), "fft", n_coeffs=k)  # type: ignore[arg-type]


def test_n_coeffs_edges_that_are_fine() -> None:
    assert SparseSpectrum((4, 6), "fft", n_coeffs=1).n_coeffs == 1
    assert SparseSpectrum((4, 6), "fft", n_coeffs=24).n_coeffs == 24


@pytest.mark.parametrize(
    "shape",
    [(0, 4), (4, 0), (-2, 4), (4,), (4, 4, 4), (), (4.0, 4), (True, 4), "44", None, 16, (4, None)],
)
def test_bad_shape(shape: object) -> None:
    with pytest.raises(ValueError, match="shape"):
        SparseSpectrum(shape, "fft", n_coeffs=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        spectral_locations(shape, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, -(2**40), 1.5, True, "0", None])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        SparseSpectrum((4, 6), "fft", n_coeffs=3, seed=seed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        spectral_locations((4, 6), 3, seed=seed)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [0, 25, -3])
def test_locations_bad_k(k: int) -> None:
    with pytest.raises(ValueError):
        spectral_locations((4, 6), k)


@pytest.mark.parametrize("name", WAVELETS)
@pytest.mark.parametrize("shape", [(5, 6), (6, 5), (1, 4), (7, 7)])
def test_odd_shape_with_a_wavelet(name: str, shape: tuple[int, int]) -> None:
    expected = rf"{name}.*\({shape[0]}, {shape[1]}\)"
    with pytest.raises(ValueError, match=expected):
        SparseSpectrum(shape, name, n_coeffs=1)
    with pytest.raises(ValueError, match=expected):
        get_basis(name)(torch.zeros(shape))


@pytest.mark.parametrize("name", ["sym8", "dmey"])
def test_odd_shape_with_a_pywavelets_name(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}.*\(3, 8\)"):
        SparseSpectrum((3, 8), name, n_coeffs=1)


@pytest.mark.parametrize("name", ["fft", "dct"])
def test_fourier_and_cosine_take_odd_shapes(name: str) -> None:
    assert SparseSpectrum((5, 7), name, n_coeffs=3)().shape == (5, 7)


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("shape", [(), (6,), (1,)])
def test_fewer_than_two_dimensions(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"{name}.*\(\.\.\., m, n\)"):
        get_basis(name)(torch.zeros(shape))


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
)
def test_non_real_floating_tensor(name: str, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"{name}.*real floating.*{str(dtype).split('.')[-1]}"):
        get_basis(name)(torch.zeros((4, 6), dtype=dtype))


@pytest.mark.parametrize("basis", [3, None, torch.fft.ifft2, object()])
def test_basis_that_is_neither_name_nor_transform(basis: object) -> None:
    with pytest.raises(TypeError, match="basis"):
        SparseSpectrum((4, 6), basis, n_coeffs=3)  # type: ignore[arg-type]


def test_unknown_basis_name() -> None:
    with pytest.raises(UnknownBasisError, match="haar"):
        SparseSpectrum((4, 6), "haarr", n_coeffs=3)
