"""Coefficients on LoRA's scale: M = c T(F), c^2 = mn / E, and the "paper" scale (c = 1).

E is the basis' energy on the active set (``InverseTransform.active_energy``):
sum_p ||T e_p||^2, with parallel unit matrices (fft's p and -p) grouped, since
they always move together. Checked against a float64 brute force on small
shapes, against the closed forms on large ones, and through what c is for: one
AdamW step of size lr moves the factor's entries by about lr.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from basis_shapes import fit_shape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selora.spectral_bases.registry as registry
from selora.spectral_bases import (
    InverseTransform,
    SparseSpectrum,
    get_basis,
    kaiming_variance,
    list_bases,
    scale_factor,
    spectral_locations,
)

BASES = list_bases()
EXTRA_WAVELETS = ["bior4.4", "sym4", "dmey"]  # longer filters: the wrap folds more than once
SHAPES = [(8, 384), (32, 4096), (4096, 32)]
RATIOS = [0.0, 0.6, 0.9]
RANKS = [4, 8, 16, 32, 64, 128]
BUDGET = 1024  # n_coeffs per factor, FoRA's style
SMALL_SHAPES = [(8, 16), (6, 10), (16, 8)]
LR = 1e-3
FAST = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _spectrum(name: str, shape: tuple[int, int], budget: tuple[str, float], **kw) -> SparseSpectrum:
    key, value = budget
    return SparseSpectrum(shape, name, **{key: value}, **kw)  # type: ignore[arg-type]


CASES = [
    pytest.param(
        name, shape, ("sparse_ratio", ratio), id=f"{name}-{shape[0]}x{shape[1]}-eta{ratio}"
    )
    for name in BASES
    for shape in SHAPES
    for ratio in RATIOS
] + [
    pytest.param(name, (r, 4096), ("n_coeffs", BUDGET), id=f"{name}-{r}x4096-k{BUDGET}")
    for name in BASES
    for r in RANKS
]


# --------------------------------------------------------------------- what c is for


@pytest.mark.parametrize(("name", "shape", "budget"), CASES)
def test_first_adamw_step_moves_the_factor_by_lr(
    name: str, shape: tuple[int, int], budget: tuple[str, float]
) -> None:
    torch.manual_seed(0)
    spectrum = _spectrum(name, shape, budget)
    optimizer = torch.optim.AdamW(spectrum.parameters(), lr=LR, weight_decay=0.0)
    before = spectrum().detach()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (spectrum() * upstream).sum().backward()
    optimizer.step()
    with torch.no_grad():
        change = (spectrum().double() - before.double()).square().mean().sqrt().item()
    assert change == pytest.approx(LR, rel=0.10), (name, shape, budget, change / LR)


@pytest.mark.parametrize(("name", "shape", "budget"), CASES)
def test_initial_variance_is_still_kaiming(
    name: str, shape: tuple[int, int], budget: tuple[str, float]
) -> None:
    torch.manual_seed(0)
    spectrum = _spectrum(name, shape, budget)
    with torch.no_grad():
        variance = spectrum().double().var(correction=0).item()
    assert variance == pytest.approx(kaiming_variance(shape[1]), rel=0.05)
    # The coefficients themselves sit near LoRA's scale, sqrt(1 / (3 n)) (fft's paired
    # locations, which move together, make them up to sqrt(2) larger).
    rms = spectrum.coefficients.double().square().mean().sqrt().item()
    target = math.sqrt(kaiming_variance(shape[1]))
    assert target * 0.9 < rms < target * (1.5 if name == "fft" else 1.1)


# --------------------------------------------------------------------- c against brute force


def _columns(dense_operator, name: str, shape: tuple[int, int], indices: torch.Tensor):
    return dense_operator(get_basis(name), shape)[:, indices]


@pytest.mark.parametrize("name", [*BASES, *EXTRA_WAVELETS])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("budget", [("sparse_ratio", r) for r in RATIOS] + [("n_coeffs", 1)])
def test_scale_factor_matches_the_brute_force_energy(
    name: str, shape: tuple[int, int], budget: tuple[str, float], dense_operator, energy_of
) -> None:
    shape = fit_shape(name, shape)  # (6, 10) is (8, 12) for db4-l2
    spectrum = _spectrum(name, shape, budget, seed=3)
    columns = _columns(dense_operator, name, shape, spectrum.indices)  # float64, T(e_p)
    energy = energy_of(columns)
    m, n = shape
    assert spectrum.basis.active_energy(shape, spectrum.indices) == pytest.approx(energy, rel=1e-12)
    assert spectrum.scale_factor == pytest.approx(math.sqrt(m * n / energy), rel=1e-12)
    if name != "fft":  # no two unit matrices are parallel: the plain sum
        assert energy == pytest.approx(columns.square().sum().item(), rel=1e-12)


@pytest.mark.parametrize("name", BASES)
@FAST
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_scale_factor_matches_brute_force_on_random_sets(
    name: str, data: st.DataObject, seed: int, dense_operator, energy_of
) -> None:
    half = name not in ("fft", "dct")
    m = data.draw(st.integers(1, 6)) * (2 if half else 1) + (0 if half else 1)
    n = data.draw(st.integers(1, 6)) * (2 if half else 1) + (0 if half else 1)
    m, n = fit_shape(name, (m, n))
    k = data.draw(st.integers(1, m * n))
    # init="zero": a single DC location cannot be calibrated, and c does not need it
    spectrum = SparseSpectrum((m, n), name, n_coeffs=k, seed=seed, init="zero")
    energy = energy_of(_columns(dense_operator, name, (m, n), spectrum.indices))
    assert spectrum.scale_factor == pytest.approx(math.sqrt(m * n / energy), rel=1e-12)


def test_fft_pairs_count_as_one_matrix(dense_operator) -> None:
    # p and -p give the same matrix (cos is even): 1/(2mn) each alone, 4/(2mn) together;
    # a self-mirrored p (here 0 and (4, 0) of an 8x16 grid) gives 1/(mn).
    m, n = 8, 16
    basis = get_basis("fft")
    columns = dense_operator(basis, (m, n))
    p, mirror = 1 * n + 3, 7 * n + 13
    torch.testing.assert_close(columns[:, p], columns[:, mirror], rtol=0, atol=1e-15)
    assert basis.active_energy((m, n), torch.tensor([p])) == pytest.approx(1 / (2 * m * n))
    both = torch.tensor([p, mirror])
    assert basis.active_energy((m, n), both) == pytest.approx(4 / (2 * m * n))
    selfmirrored = torch.tensor([0, 4 * n])
    assert basis.active_energy((m, n), selfmirrored) == pytest.approx(2 / (m * n))


def _fft_energy_numpy(shape: tuple[int, int], indices: torch.Tensor) -> float:
    m, n = shape
    flat = indices.numpy()
    mirror = ((-(flat // n)) % m) * n + (-(flat % n)) % n
    paired = np.isin(mirror, flat).sum()
    return (len(flat) + paired) / (2 * m * n)


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_scale_factor_matches_the_closed_form_on_large_shapes(
    name: str, shape: tuple[int, int], ratio: float
) -> None:
    m, n = shape
    k = math.floor((1 - ratio) * m * n)
    indices = spectral_locations(shape, k, 0)
    basis = get_basis(name)
    if basis.orthonormal:
        expected = float(k)
    elif name == "fft":
        expected = _fft_energy_numpy(shape, indices)
    else:
        # Shift invariance, checked: a unit spectrum anywhere in a quadrant has the
        # energy of the quadrant's corner. Sum over the active set in float64.
        rng = np.random.default_rng(0)
        rows, cols = (indices // n).numpy(), (indices % n).numpy()
        quadrant = (rows >= m // 2) * 2 + (cols >= n // 2)
        energies = []
        for q in range(4):
            corners = set()
            for _ in range(3):
                row = rng.integers(m // 2) + (m // 2) * (q // 2)
                col = rng.integers(n // 2) + (n // 2) * (q % 2)
                unit = torch.zeros(m, n, dtype=torch.float64)
                unit[row, col] = 1.0
                corners.add(round(basis(unit).square().sum().item(), 12))
            assert len(corners) == 1
            energies.append(corners.pop())
        expected = float(sum(energies[q] for q in quadrant))
    spectrum = SparseSpectrum(shape, basis, sparse_ratio=ratio)
    assert spectrum.scale_factor == pytest.approx(math.sqrt(m * n / expected), rel=1e-9)


def test_orthonormal_and_fft_orders_of_magnitude() -> None:
    # design.md: orthonormal c = 1/sqrt(k/(mn)); fft c ~ mn sqrt(2/k), a little less
    # for the few mirrored pairs (about k/(mn) = 3 % of the locations here)
    shape, k = (8, 4096), 1000
    m, n = shape
    dct = SparseSpectrum(shape, "dct", n_coeffs=k)
    assert dct.scale_factor == pytest.approx(math.sqrt(m * n / k), rel=1e-12)
    fft = SparseSpectrum(shape, "fft", n_coeffs=k)
    assert fft.scale_factor == pytest.approx(m * n * math.sqrt(2 / k), rel=0.03)


# --------------------------------------------------------------------- the "paper" scale


def _pre_change(name: str, shape: tuple[int, int], ratio: float, seed: int) -> tuple:
    """The coefficients and matrix of FoRA's eq. 3 as written (c = 1, the gain at init).

    The gain sets the mean square of the entries (the draws have zero mean) to the
    Kaiming variance, as the library does since it stopped using the sample variance,
    which calls the matrix of the constant coefficient alone "variance 0".
    """
    m, n = shape
    k = math.floor((1 - ratio) * m * n)
    indices = spectral_locations(shape, k, 0)
    basis = get_basis(name)
    sample = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = sample.new_zeros(m * n).scatter(0, indices, sample)
    variance = float(basis(flat.view(shape)).square().mean())
    coefficients = (sample * math.sqrt(kaiming_variance(n) / variance)).float()
    dense = coefficients.new_zeros(m * n).scatter(0, indices, coefficients).view(shape)
    return coefficients, basis(dense)


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("shape", [(8, 384), (32, 64)])
def test_paper_scale_reproduces_the_pre_change_output_exactly(
    name: str, shape: tuple[int, int]
) -> None:
    paper = SparseSpectrum(shape, name, sparse_ratio=0.6, scale="paper")
    assert paper.scale_factor == 1.0
    paper.reset_parameters(torch.Generator().manual_seed(5))
    coefficients, matrix = _pre_change(name, shape, 0.6, 5)
    assert torch.equal(paper.coefficients.detach(), coefficients)
    with torch.no_grad():
        formed = paper()
    if name in ("fft", "dct"):
        # formed by the basis' synthesize (half-spectrum FFTs), equal to the scatter-then-
        # transform of the pre-change code up to float32 rounding, not bit for bit
        torch.testing.assert_close(formed, matrix, rtol=0, atol=1e-6 * matrix.abs().max().item())
    else:
        assert torch.equal(formed, matrix)


@pytest.mark.parametrize("name", BASES)
def test_both_scales_give_the_same_matrix_at_init(name: str) -> None:
    shape = (8, 384)
    lora = SparseSpectrum(shape, name, sparse_ratio=0.6, scale="lora")
    paper = SparseSpectrum(shape, name, sparse_ratio=0.6, scale="paper")
    lora.reset_parameters(torch.Generator().manual_seed(11))
    paper.reset_parameters(torch.Generator().manual_seed(11))
    torch.testing.assert_close(
        lora.coefficients * lora.scale_factor, paper.coefficients, rtol=1e-6, atol=0
    )
    with torch.no_grad():
        scale = paper().abs().max().item()
        torch.testing.assert_close(lora(), paper(), rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("bad", ["LoRA", "none", None, 1.0])
def test_an_unknown_scale_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"scale must be one of \['lora', 'paper'\]"):
        SparseSpectrum((4, 8), "dct", n_coeffs=3, scale=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale must be one of"):
        scale_factor(get_basis("dct"), (4, 8), torch.arange(3), bad)  # type: ignore[arg-type]


def test_an_unknown_init_is_refused() -> None:
    with pytest.raises(ValueError, match=r"init must be one of \['kaiming', 'zero'\]"):
        SparseSpectrum((4, 8), "dct", n_coeffs=3, init="normal")  # type: ignore[arg-type]


def test_relocated_spectrum_recomputes_its_scale() -> None:
    spectrum = SparseSpectrum((8, 16), "fft", n_coeffs=6)
    pairs = torch.tensor([1 * 16 + 3, 7 * 16 + 13, 2, 14, 5, 11])  # three mirrored pairs
    spectrum.set_locations(pairs)
    assert torch.equal(spectrum.indices, pairs)
    assert spectrum.scale_factor == pytest.approx(math.sqrt(128 / (12 / 256)), rel=1e-12)
    for bad in (torch.tensor([0, 0, 1, 2, 3, 4]), torch.arange(5), torch.arange(123, 129)):
        with pytest.raises(ValueError, match="6 distinct integers in"):
            spectrum.set_locations(bad)


# --------------------------------------------------------------------- user bases: the fallback


class _Skewed(InverseTransform):
    """T(F) = P F Q^T with fixed random, non-orthogonal P, Q: no closed form, no pairs."""

    def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        m, n = spectrum.shape[-2:]
        rng = np.random.default_rng(m * 1000 + n)
        p = torch.from_numpy(rng.standard_normal((m, m))).to(spectrum.dtype)
        q = torch.from_numpy(rng.standard_normal((n, n))).to(spectrum.dtype)
        return p @ spectrum @ q.T


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_user_basis_energy_falls_back_to_the_exact_sum(
    shape: tuple[int, int], dense_operator, energy_of
) -> None:
    basis = _Skewed()
    assert type(basis).active_energy is InverseTransform.active_energy
    spectrum = SparseSpectrum(shape, basis, sparse_ratio=0.4, dtype=torch.float64)
    columns = dense_operator(basis, shape)[:, spectrum.indices]
    energy = energy_of(columns)
    assert energy == pytest.approx(columns.square().sum().item(), rel=1e-12)
    assert basis.active_energy(shape, spectrum.indices) == pytest.approx(energy, rel=1e-12)
    assert spectrum.scale_factor == pytest.approx(math.sqrt(shape[0] * shape[1] / energy))


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_user_basis_energy_estimate_is_within_its_documented_error(
    shape: tuple[int, int], dense_operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Beyond k m n = 2^22 the fallback estimates; force that route on a small shape.
    basis = _Skewed()
    indices = spectral_locations(shape, 200, 1)
    columns = dense_operator(basis, shape)[:, indices]
    exact = columns.square().sum().item()
    gram = columns.T @ columns
    documented = math.sqrt(2 * gram.square().sum().item() / registry.ENERGY_PROBES) / exact
    monkeypatch.setattr(registry, "_EXACT_ENERGY_LIMIT", 0)
    state = torch.get_rng_state()
    estimate = basis.active_energy(shape, indices)
    assert torch.equal(torch.get_rng_state(), state)  # a generator of its own
    assert estimate == pytest.approx(exact, rel=4 * documented)
    assert basis.active_energy(shape, indices) == estimate  # fixed seed: reproducible
    assert estimate != exact


def test_user_basis_flagged_orthonormal_gives_k() -> None:
    class Flipped(InverseTransform):
        orthonormal = True

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum.flip(-1)

    assert Flipped().active_energy((6, 10), torch.arange(17)) == 17.0


def test_zero_energy_refuses_the_lora_scale_but_not_the_paper_one() -> None:
    class Nothing(InverseTransform):
        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum * 0.0

    with pytest.raises(ValueError, match=r"basis 'Nothing' gives the 3 active.*energy 0.0"):
        SparseSpectrum((4, 8), Nothing(), n_coeffs=3, init="zero")
    paper = SparseSpectrum((4, 8), Nothing(), n_coeffs=3, init="zero", scale="paper")
    assert paper.scale_factor == 1.0
