"""The basis contract: linear, keeps shape and dtype, differentiable, orthonormal when it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from basis_shapes import fit_shape
from hypothesis import given, settings
from hypothesis import strategies as st

from selora.spectral_bases import get_basis, list_bases

FAST = settings(max_examples=15, deadline=None, database=None)
EXTRA_WAVELETS = ["sym8", "sym4", "coif3", "db10", "bior4.4", "dmey"]
ALL_NAMES = [*list_bases(), *EXTRA_WAVELETS]

# What the design says, name by name; checked against the dense matrix below.
EXPECTED_ORTHONORMAL = {
    "fft": False,  # scale 1/(mn), and only the real part
    "dct": True,
    "haar": True,
    "db4": True,
    "coif": True,
    "bior": False,  # bior2.2 is biorthogonal
    "db4-l2": True,  # two periodized db4 levels: a product of orthogonal maps
    "db2-boundary": True,  # ptwt's QR-orthonormalized boundary filters
    "sym4": True,
    "sym8": True,
    "coif3": True,
    "db10": True,
    "bior4.4": False,
    # PyWavelets flags dmey orthogonal, but its FIR Meyer filters miss by ~2e-3.
    "dmey": False,
}


def draw_shape(data: st.DataObject, name: str, largest: int = 12) -> tuple[int, int]:
    if name in ("fft", "dct"):
        return data.draw(st.integers(1, largest)), data.draw(st.integers(1, largest))
    m = 2 * data.draw(st.integers(1, largest // 2))
    n = 2 * data.draw(st.integers(1, largest // 2))
    fitted = fit_shape(name, (m, n))  # the nearest shape a multi-level or boundary basis takes
    return fitted[0], fitted[1]


def random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(dtype)


def test_expectations_cover_every_registered_basis() -> None:
    assert set(list_bases()) <= set(EXPECTED_ORTHONORMAL)


@pytest.mark.parametrize("name", ALL_NAMES)
@FAST
@given(
    data=st.data(),
    a=st.floats(-1e3, 1e3, allow_nan=False),
    b=st.floats(-1e3, 1e3, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear(name: str, data: st.DataObject, a: float, b: float, seed: int) -> None:
    m, n = draw_shape(data, name)
    batch = data.draw(st.sampled_from([(), (2,)]), label="batch")
    x = random((*batch, m, n), seed)
    y = random((*batch, m, n), seed + 1)
    basis = get_basis(name)
    lhs = basis(a * x + b * y)
    rhs = a * basis(x) + b * basis(y)
    scale = max(abs(a), abs(b), 1.0)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (3, 2, 8), (2, 1, 2, 2)])
def test_keeps_shape_dtype_and_device(
    name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    x = random(fit_shape(name, shape), 0, dtype)
    out = get_basis(name)(x)
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device
    assert out.is_floating_point()
    # float32 is computed in float32, yet agrees with the float64 transform
    reference = get_basis(name)(x.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=tol)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_in_low_precision_out(name: str, low: torch.dtype) -> None:
    x = random(fit_shape(name, (3, 8, 12)), 1, low)
    out = get_basis(name)(x)
    assert out.dtype == low
    assert out.shape == x.shape
    # the transform runs in float32 and is cast back
    via_float32 = get_basis(name)(x.float()).to(low)
    torch.testing.assert_close(out, via_float32)
    # and it is the float64 transform up to the low precision's rounding
    exact = get_basis(name)(x.double())
    eps = torch.finfo(low).eps
    assert (out.double() - exact).abs().max() <= 2 * eps * max(exact.abs().max().item(), 1e-3)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("shape", [(4, 6), (2, 2, 4)])
def test_gradcheck(name: str, shape: tuple[int, ...]) -> None:
    x = random(fit_shape(name, shape), 2).requires_grad_()
    assert torch.autograd.gradcheck(get_basis(name), (x,), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n not in ("fft", "dct")])
def test_gradgradcheck_wavelets(name: str) -> None:
    # the wavelets' backward is a custom adjoint; its own backward must be right too
    x = random(fit_shape(name, (2, 4)), 2).requires_grad_()
    assert torch.autograd.gradgradcheck(get_basis(name), (x,), atol=1e-8, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_mode_and_vmap(name: str) -> None:
    basis = get_basis(name)
    shape = fit_shape(name, (3, 4, 6))
    x, tangent = random(shape, 5), random(shape, 6)
    out, jvp = torch.func.jvp(basis, (x,), (tangent,))
    torch.testing.assert_close(out, basis(x), rtol=0, atol=0)
    torch.testing.assert_close(jvp, basis(tangent), rtol=0, atol=1e-12)  # T is linear
    torch.testing.assert_close(torch.func.vmap(basis)(x), basis(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_backward_is_the_transpose(name: str, dense_operator) -> None:
    # <T x, y> = <x, T* y>, with T* the transpose of the dense matrix of T
    shape = fit_shape(name, (4, 6))
    dense = dense_operator(get_basis(name), shape)
    x = random(shape, 3).requires_grad_()
    upstream = random(shape, 4)
    (grad,) = torch.autograd.grad(get_basis(name)(x), x, upstream)
    expected = (dense.T @ upstream.reshape(-1)).view(shape)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_orthonormal_flag(name: str) -> None:
    assert get_basis(name).orthonormal is EXPECTED_ORTHONORMAL[name]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("shape", [(2, 2), (2, 4), (4, 6), (8, 8)])
def test_orthonormal_flag_matches_the_dense_matrix(
    name: str, shape: tuple[int, int], dense_operator
) -> None:
    # The flag against an independent fact: D^T D = I for the matrix D of T,
    # built from unit spectra. (2, 2) and (2, 4) fold long filters several times.
    shape = fit_shape(name, shape)
    basis = get_basis(name)
    dense = dense_operator(basis, shape)
    gram = dense.T @ dense
    deviation = (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()
    if basis.orthonormal:
        assert deviation < 1e-10
    elif shape[0] * shape[1] >= 24:
        # a non-orthonormal basis must visibly fail on a non-trivial shape
        assert deviation > 1e-3


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if EXPECTED_ORTHONORMAL[n]])
@FAST
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_orthonormal_bases_keep_the_frobenius_norm(
    name: str, data: st.DataObject, seed: int
) -> None:
    m, n = draw_shape(data, name, largest=24)
    x = random((2, m, n), seed)
    out = get_basis(name)(x)
    # PyWavelets' symlet filters are orthonormal to ~1e-12 only (pywt's tabulated values)
    torch.testing.assert_close(
        torch.linalg.matrix_norm(out), torch.linalg.matrix_norm(x), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("name", ["fft", "bior", "bior4.4"])
def test_non_orthonormal_bases_change_the_norm(name: str) -> None:
    x = random((16, 32), 5)
    ratio = (get_basis(name)(x).norm() / x.norm()).item()
    assert abs(ratio - 1.0) > 1e-3
