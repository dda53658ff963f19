"""SparseSpectrum: one trainable vector, exact sparse gradients, Kaiming calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from basis_shapes import fit_shape

from selora.spectral_bases import SparseSpectrum, get_basis, kaiming_variance, list_bases

BASES = list_bases()
ORTHONORMAL = [name for name in BASES if get_basis(name).orthonormal]
CALIBRATION_SHAPES = [(8, 768), (32, 4096), (4096, 32)]
CALIBRATION_RATIOS = [0.0, 0.3, 0.6, 0.9, 0.95]


def test_some_bases_are_orthonormal() -> None:
    # the energy tests below must not run over an empty list
    assert {"dct", "haar", "db4", "coif"} <= set(ORTHONORMAL)


# --- parameters and gradients ------------------------------------------------------------


@pytest.mark.parametrize("name", BASES)
def test_coefficients_are_the_only_parameter(name: str) -> None:
    m, n = fit_shape(name, (6, 10))
    spectrum = SparseSpectrum((m, n), name, sparse_ratio=0.5)
    k = math.floor(0.5 * m * n)
    params = dict(spectrum.named_parameters())
    assert list(params) == ["coefficients"]
    assert params["coefficients"].shape == (k,)
    assert spectrum.n_coeffs == k
    assert not spectrum.indices.requires_grad
    assert set(spectrum.state_dict()) == {"coefficients"}  # locations follow from the seed
    spectrum().square().sum().backward()
    assert spectrum.coefficients.grad is not None
    assert spectrum.coefficients.grad.shape == (k,)
    assert all(buffer.grad is None for buffer in spectrum.buffers())


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize(("shape", "k"), [((6, 10), 23), ((8, 4), 32), ((2, 2), 1), ((4, 12), 40)])
def test_forward_and_gradient_against_the_dense_reference(
    name: str, shape: tuple[int, int], k: int, dense_operator, energy_of
) -> None:
    m, n = shape = fit_shape(name, shape)
    spectrum = SparseSpectrum(shape, name, n_coeffs=k, seed=3, dtype=torch.float64)
    dense = dense_operator(get_basis(name), shape)  # float64, column p = vec T(e_p)
    rng = np.random.default_rng(k)
    with torch.no_grad():
        spectrum.coefficients.copy_(torch.from_numpy(rng.standard_normal(k)))
    coefficients = spectrum.coefficients.detach()
    idx = spectrum.indices

    # F is the coefficients at the active locations and zero elsewhere
    full = torch.zeros(m * n, dtype=torch.float64)
    full[idx] = coefficients
    torch.testing.assert_close(spectrum.dense_spectrum().reshape(-1), full, rtol=0, atol=0)

    # M = c T(F), c = sqrt(mn / E), E the energy of the active columns of D
    c = spectrum.scale_factor
    assert c == pytest.approx(math.sqrt(m * n / energy_of(dense[:, idx])), rel=1e-12)
    out = spectrum()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.reshape(-1), c * (dense @ full), rtol=0, atol=1e-12)

    upstream = torch.from_numpy(rng.standard_normal((m, n)))
    (out * upstream).sum().backward()
    expected = c * (dense.T @ upstream.reshape(-1))[idx]  # adjoint, read on Omega
    torch.testing.assert_close(spectrum.coefficients.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", BASES)
def test_float32_gradient_matches_float64(name: str) -> None:
    shape = (16, 24)
    low = SparseSpectrum(shape, name, sparse_ratio=0.6, seed=1)
    high = SparseSpectrum(shape, name, sparse_ratio=0.6, seed=1, dtype=torch.float64)
    with torch.no_grad():
        high.coefficients.copy_(low.coefficients.double())
    upstream = torch.randn(shape, dtype=torch.float64)
    (low() * upstream.float()).sum().backward()
    (high() * upstream).sum().backward()
    assert low.coefficients.grad is not None and high.coefficients.grad is not None
    scale = high.coefficients.grad.abs().max().item()
    torch.testing.assert_close(
        low.coefficients.grad.double(), high.coefficients.grad, rtol=0, atol=1e-5 * scale
    )


@pytest.mark.parametrize("name", BASES)
def test_adam_state_holds_k_numbers_per_tensor(name: str) -> None:
    spectrum = SparseSpectrum((32, 64), name, sparse_ratio=0.9)
    k = math.floor(0.1 * 32 * 64)
    assert spectrum.n_coeffs == k
    optimizer = torch.optim.Adam(spectrum.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        spectrum().square().mean().backward()
        optimizer.step()
    assert list(optimizer.state) == [spectrum.coefficients]
    state = optimizer.state[spectrum.coefficients]
    assert state["exp_avg"].numel() == k
    assert state["exp_avg_sq"].numel() == k
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
    assert len(tensors) == 2
    assert all(t.numel() == k for t in tensors)


@pytest.mark.parametrize("name", BASES)
def test_forward_dtype_argument(name: str) -> None:
    spectrum = SparseSpectrum((8, 12), name, sparse_ratio=0.5)
    with torch.no_grad():
        reference = spectrum()
        scale = reference.abs().max().item()
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            out = spectrum(dtype)
            assert out.dtype == dtype
            assert out.shape == (8, 12)
            tol = 2 * torch.finfo(dtype).eps * scale if dtype != torch.float64 else 1e-6 * scale
            torch.testing.assert_close(out.double(), reference.double(), rtol=0, atol=tol)


# --- calibration -------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("shape", CALIBRATION_SHAPES)
def test_calibrated_variance_is_kaiming(name: str, shape: tuple[int, int]) -> None:
    m, n = shape
    target = 1.0 / (3.0 * n)  # torch's nn.Linear: U(-1/sqrt(n), 1/sqrt(n))
    assert kaiming_variance(n) == pytest.approx(target, rel=1e-12)
    torch.manual_seed(0)
    for ratio in CALIBRATION_RATIOS:
        spectrum = SparseSpectrum(shape, name, sparse_ratio=ratio)
        assert spectrum.n_coeffs == math.floor((1.0 - ratio) * m * n)
        with torch.no_grad():
            variance = spectrum().double().var(correction=0).item()
        assert variance == pytest.approx(target, rel=0.05), (name, shape, ratio)


@pytest.mark.parametrize("name", ORTHONORMAL)
@pytest.mark.parametrize("shape", [(32, 4096), (4096, 32)])
@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.95])
def test_orthonormal_energy_follows_theory(name: str, shape: tuple[int, int], ratio: float) -> None:
    # Uncalibrated: unit-variance coefficients give E[var(M)] = k / (mn) for an
    # orthonormal T, with relative spread sqrt(2 / k) (on the paper's scale, c = 1).
    m, n = shape
    spectrum = SparseSpectrum(shape, name, sparse_ratio=ratio, dtype=torch.float64, scale="paper")
    k = spectrum.n_coeffs
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        spectrum.coefficients.copy_(torch.randn(k, generator=generator, dtype=torch.float64))
        variance = spectrum().var(correction=0).item()
    assert variance == pytest.approx(k / (m * n), rel=6 * math.sqrt(2.0 / k))

    # Calibrated: the gain sets the mean square of M's entries to the Kaiming variance
    # 1 / (3n) (the draws have zero mean), and T keeps the norm, so exactly
    # ||s||^2 = ||M||^2 = mn / (3n) = m / 3.
    spectrum.reset_parameters(torch.Generator().manual_seed(99))
    with torch.no_grad():
        energy = spectrum.coefficients.square().sum().item()
        mean_square = spectrum().square().mean().item()
    assert energy == pytest.approx(m / 3.0, rel=1e-9)
    assert mean_square == pytest.approx(1.0 / (3.0 * n), rel=1e-9)


@pytest.mark.parametrize("name", BASES)
def test_expected_energy_of_every_basis(name: str, dense_operator) -> None:
    # For any linear T and i.i.d. unit-variance coefficients on Omega,
    # E ||M||^2 = sum over p in Omega of ||T e_p||^2 (the active columns of D).
    shape = (8, 16)
    spectrum = SparseSpectrum(shape, name, sparse_ratio=0.5, seed=5, dtype=torch.float64)
    dense = dense_operator(get_basis(name), shape)
    expected = dense[:, spectrum.indices].square().sum().item()
    draws = 4000
    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(draws, spectrum.n_coeffs, generator=generator, dtype=torch.float64)
    spectra = torch.zeros(draws, shape[0] * shape[1], dtype=torch.float64)
    spectra[:, spectrum.indices] = coefficients
    energy = get_basis(name)(spectra.view(draws, *shape)).square().sum(dim=(-2, -1))
    # relative standard error of the mean is at most sqrt(2 / draws)
    assert energy.mean().item() == pytest.approx(expected, rel=5 * math.sqrt(2.0 / draws))


def test_calibration_uses_the_generator_and_is_reproducible() -> None:
    a = SparseSpectrum((16, 32), "dct", sparse_ratio=0.5)
    b = SparseSpectrum((16, 32), "dct", sparse_ratio=0.5)
    a.reset_parameters(torch.Generator().manual_seed(7))
    b.reset_parameters(torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.coefficients, b.coefficients, rtol=0, atol=0)
    b.reset_parameters(torch.Generator().manual_seed(8))
    assert not torch.equal(a.coefficients, b.coefficients)


@pytest.mark.parametrize("name", BASES)
def test_reset_zero(name: str) -> None:
    spectrum = SparseSpectrum((8, 12), name, sparse_ratio=0.3)
    indices = spectrum.indices.clone()
    assert spectrum().abs().max() > 0
    spectrum.reset_zero()
    assert torch.count_nonzero(spectrum.coefficients) == 0
    assert torch.count_nonzero(spectrum()) == 0
    assert torch.equal(spectrum.indices, indices)
    # and it stays trainable
    assert spectrum.coefficients.requires_grad


@pytest.mark.parametrize("seed", range(4))
def test_a_constant_matrix_calibrates(seed: int) -> None:
    """One coefficient at the constant (DC) position gives a constant matrix: its entries'
    mean square is the Kaiming variance (the sample variance would be 0 and refuse it)."""
    spectrum = SparseSpectrum((1, 4), "dct", sparse_ratio=0.6, seed=seed, dtype=torch.float64)
    with torch.no_grad():
        mean_square = spectrum().square().mean().item()
    assert mean_square == pytest.approx(1.0 / (3.0 * 4), rel=1e-9)
