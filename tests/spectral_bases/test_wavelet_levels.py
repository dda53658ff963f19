"""Multi-level periodized wavelets (``levels=J``) against ``pywt.waverec2``, and their options.

The spectrum is read in ``wavedec2`` order (see ``selora/spectral_bases/wavelet_levels.py``):
``a_J`` top-left ``(m / 2^J, n / 2^J)``, the details of level j in the other three
quadrants of the top-left ``(m / 2^(j-1), n / 2^(j-1))`` block, each level
placed as the one-level basis places its quadrants ([[a, h], [v, d]]).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pywt
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selora.spectral_bases import (
    Daubechies4Transform,
    Daubechies4TwoLevelTransform,
    HaarTransform,
    SparseSpectrum,
    WaveletTransform,
    basis_spec,
    build_basis,
    get_basis,
    kaiming_variance,
    spectral_locations,
    wavelet,
)

TOL = 1e-10
FAST = settings(max_examples=25, deadline=None, database=None)
# haar .. dmey: 2 to 62 taps; bior2.2 is not orthonormal
WAVELETS = ["haar", "db4", "bior2.2", "coif1", "sym8", "dmey"]
# shapes that take each synthesis route at the finest level (dense, columns, rows, both
# blockwise); the coarser levels take their own
SHAPES = [(8, 8), (16, 24), (8, 384), (384, 8), (136, 200)]


def wavedec2_list(spectrum: np.ndarray, levels: int) -> list:
    m, n = spectrum.shape[-2:]
    details = []
    for level in range(1, levels + 1):
        rows, cols = m >> (level - 1), n >> (level - 1)
        block = spectrum[..., :rows, :cols]
        hm, hn = rows // 2, cols // 2
        details.append((block[..., :hm, hn:], block[..., hm:, :hn], block[..., hm:, hn:]))
    return [spectrum[..., : m >> levels, : n >> levels], *details[::-1]]


def oracle(spectrum: np.ndarray, name: str, levels: int) -> np.ndarray:
    coefficients = wavedec2_list(spectrum, levels)
    return pywt.waverec2(coefficients, name, mode="periodization", axes=(-2, -1))


def random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(dtype)


@pytest.mark.filterwarnings("ignore:Level value of 2 is too high")  # pywt: db4 on 16 rows
def test_the_layout_is_pywavelets_wavedec2() -> None:
    # the oracle's layout itself: a_J top-left, and wavedec2 of a signal read back
    # in this layout is what waverec2 inverts
    x = np.random.default_rng(0).standard_normal((16, 24))
    coefficients = pywt.wavedec2(x, "db4", mode="periodization", level=2)
    spectrum = np.zeros_like(x)
    spectrum[:4, :6] = coefficients[0]
    for level, (h, v, d) in zip((2, 1), coefficients[1:], strict=True):
        rows, cols = 16 >> (level - 1), 24 >> (level - 1)
        spectrum[: rows // 2, cols // 2 : cols] = h
        spectrum[rows // 2 : rows, : cols // 2] = v
        spectrum[rows // 2 : rows, cols // 2 : cols] = d
    out = get_basis("db4-l2")(torch.from_numpy(spectrum))
    np.testing.assert_allclose(out.numpy(), x, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", WAVELETS)
@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_waverec2(name: str, levels: int, shape: tuple[int, int]) -> None:
    spectrum = random((2, *shape), seed=sum(shape) + levels)
    out = WaveletTransform(name, levels=levels)(spectrum)
    assert out.shape == spectrum.shape and out.dtype == torch.float64
    np.testing.assert_allclose(
        out.numpy(), oracle(spectrum.numpy(), name, levels), rtol=0, atol=TOL
    )


@pytest.mark.parametrize("name", ["db4", "bior2.2", "sym8"])
@FAST
@given(
    levels=st.integers(1, 4),
    rows=st.integers(1, 5),
    cols=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_shape_that_2_to_the_J_divides(
    name: str, levels: int, rows: int, cols: int, seed: int
) -> None:
    shape = (rows * 2**levels, cols * 2**levels)  # down to one coefficient per band
    spectrum = random(shape, seed)
    out = WaveletTransform(name, levels=levels)(spectrum)
    np.testing.assert_allclose(
        out.numpy(), oracle(spectrum.numpy(), name, levels), rtol=0, atol=TOL
    )


@pytest.mark.parametrize("name", ["haar", "db4", "bior2.2", "sym8", "dmey"])
@pytest.mark.parametrize("shape", [(2, 2), (4, 6), (74, 74), (8, 384), (3, 40, 74)])
def test_one_level_is_todays_basis_bit_for_bit(name: str, shape: tuple[int, ...]) -> None:
    x = random(shape, 1)
    m, n = shape[-2:]
    # today's route, called directly: one plan, one synthesis
    today = wavelet._synthesize(x, wavelet._plan(wavelet._polyphase(name), m, n, x.dtype, x.device))
    for dtype in (torch.float64, torch.float32):
        today_x = wavelet._synthesize(
            x.to(dtype), wavelet._plan(wavelet._polyphase(name), m, n, dtype, x.device)
        )
        assert torch.equal(WaveletTransform(name, levels=1)(x.to(dtype)), today_x)
    assert torch.equal(get_basis(name)(x), today)


def _old_quadrant_energy(basis: WaveletTransform, shape: tuple[int, int], flat: torch.Tensor):
    """The one-level energy as computed before levels existed (quadrants a, h, v, d)."""
    m, n = shape
    hm, hn = m // 2, n // 2
    quadrant = (flat // n >= hm).long() * 2 + (flat % n >= hn).long()
    counts = torch.bincount(quadrant, minlength=4).to(torch.float64)
    units = torch.zeros(4, m, n, dtype=torch.float64)
    for q, (row, col) in enumerate(((0, 0), (0, hn), (hm, 0), (hm, hn))):
        units[q, row, col] = 1.0
    return float(counts @ basis(units).square().sum(dim=(-2, -1)))


@pytest.mark.parametrize("shape", [(6, 10), (8, 384), (4096, 32)])
def test_one_level_energy_is_unchanged_bit_for_bit(shape: tuple[int, int]) -> None:
    basis = get_basis("bior")
    indices = spectral_locations(shape, shape[0] * shape[1] // 3, 0)
    assert basis.active_energy(shape, indices) == _old_quadrant_energy(basis, shape, indices)


REFUSED = [
    (levels, (m, n))
    for levels in (2, 3)
    for m, n in [(6, 8), (8, 6), (2, 8), (12, 16), (16, 4), (10, 10), (5, 8), (0, 8)]
    if not (m and n and m % 2**levels == 0 and n % 2**levels == 0)
]


@pytest.mark.parametrize(("levels", "shape"), REFUSED)
def test_other_shapes_are_refused_naming_levels_and_shape(
    levels: int, shape: tuple[int, int]
) -> None:
    m, n = shape
    basis = WaveletTransform("db4", levels=levels)
    expected = rf"'db4'.*2\^{levels} = {2**levels}.*levels={levels}.*\({m}, {n}\)"
    with pytest.raises(ValueError, match=expected):
        basis.check_shape(m, n)
    if m > 0:
        with pytest.raises(ValueError, match=expected):
            basis(torch.zeros(m, n))
        with pytest.raises(ValueError, match=expected):
            SparseSpectrum((m, n), basis, n_coeffs=1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "2", None])
def test_levels_must_be_a_positive_integer(bad: object) -> None:
    if bad is None:  # None means the class' own
        assert WaveletTransform("db4", levels=None).levels == 1
        assert Daubechies4TwoLevelTransform(levels=None).levels == 2
        return
    with pytest.raises(ValueError, match=r"levels must be an integer >= 1; got"):
        WaveletTransform("db4", levels=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"levels must be an integer >= 1"):
        get_basis("db4", levels=bad)


@pytest.mark.parametrize("name", ["db4", "bior2.2"])
@pytest.mark.parametrize("shape", [(8, 12), (16, 8)])
def test_the_gradient_is_the_transpose_of_waverec2s_matrix(
    name: str, shape: tuple[int, int]
) -> None:
    m, n = shape
    units = np.eye(m * n).reshape(m * n, m, n)
    dense = torch.from_numpy(oracle(units, name, 2).reshape(m * n, m * n).T.copy())
    x = random(shape, 1).requires_grad_()
    upstream = random(shape, 2)
    (grad,) = torch.autograd.grad(WaveletTransform(name, levels=2)(x), x, upstream)
    torch.testing.assert_close(grad, (dense.T @ upstream.reshape(-1)).view(shape), rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(8, 136), (136, 8)])  # blockwise routes at every level
def test_gradcheck_blockwise(shape: tuple[int, int]) -> None:
    x = random(shape, 3).requires_grad_()
    basis = WaveletTransform("bior2.2", levels=3)
    assert torch.autograd.gradcheck(basis, (x,), atol=1e-8, rtol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(basis, (x,), atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.filterwarnings("error")  # Dynamo warns when it meets a functools cache
@pytest.mark.parametrize("shape", [(8, 16), (8, 384)])
def test_compiles_without_graph_breaks(shape: tuple[int, int]) -> None:
    torch._dynamo.reset()
    basis = get_basis("db4-l2")
    x = random(shape, 8).requires_grad_()
    compiled = torch.compile(basis, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    np.testing.assert_allclose(
        out.detach().numpy(), oracle(x.detach().numpy(), "db4", 2), rtol=0, atol=TOL
    )
    upstream = random(shape, 9)
    (ours,) = torch.autograd.grad(out, x, upstream)
    (eager,) = torch.autograd.grad(basis(x), x, upstream)
    torch.testing.assert_close(ours, eager, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ energy and scale


@pytest.mark.parametrize("name", ["bior2.2", "bior4.4", "db4"])
@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_energy_matches_the_brute_force(
    name: str, levels: int, ratio: float, dense_operator
) -> None:
    shape = (8, 16)
    basis = WaveletTransform(name, levels=levels)
    spectrum = SparseSpectrum(shape, basis, sparse_ratio=ratio, seed=3)
    columns = dense_operator(basis, shape)[:, spectrum.indices]
    energy = columns.square().sum().item()
    assert basis.active_energy(shape, spectrum.indices) == pytest.approx(energy, rel=1e-12)
    assert spectrum.scale_factor == pytest.approx(math.sqrt(128 / energy), rel=1e-12)


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("shape", [(8, 384), (32, 4096)])
def test_energy_classes_are_shift_invariant_on_large_shapes(
    levels: int, shape: tuple[int, int]
) -> None:
    # the closed form's premise: every position of a class has its corner's energy
    m, n = shape
    basis = WaveletTransform("bior2.2", levels=levels)
    rng = np.random.default_rng(0)
    flat = torch.from_numpy(rng.choice(m * n, size=40, replace=False))
    units = torch.zeros(40, m * n, dtype=torch.float64)
    units[torch.arange(40), flat] = 1.0
    energies = basis(units.view(40, m, n)).square().sum(dim=(-2, -1))
    for p, energy in zip(flat, energies, strict=True):
        assert basis.active_energy(shape, p[None]) == pytest.approx(energy.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["db4-l2", "bior"])
@pytest.mark.parametrize("shape", [(8, 384), (4096, 32), (16, 4096)])
def test_coefficients_on_loras_scale(name: str, shape: tuple[int, int]) -> None:
    # as test_lora_scale.py, for db4-l2 and a non-orthonormal two-level basis
    basis = get_basis(name, levels=2)
    torch.manual_seed(0)
    spectrum = SparseSpectrum(shape, basis, sparse_ratio=0.6)
    with torch.no_grad():
        variance = spectrum().double().var(correction=0).item()
    assert variance == pytest.approx(kaiming_variance(shape[1]), rel=0.05)
    optimizer = torch.optim.AdamW(spectrum.parameters(), lr=1e-3, weight_decay=0.0)
    before = spectrum().detach()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (spectrum() * upstream).sum().backward()
    optimizer.step()
    with torch.no_grad():
        change = (spectrum().double() - before.double()).square().mean().sqrt().item()
    assert change == pytest.approx(1e-3, rel=0.10)


# ------------------------------------------------------------------ options and checkpoints


def round_trip(basis: WaveletTransform, shapes: list[tuple[int, int]] | None = None):
    text = json.dumps(basis_spec(basis, shapes=shapes or []))
    return build_basis(json.loads(text))


@pytest.mark.parametrize(
    ("basis", "options"),
    [
        (get_basis("db4-l2"), {}),
        (get_basis("db4-l2", levels=1), {"levels": 1}),
        (get_basis("db4-l2", levels=3, wavelet="sym4"), {"wavelet": "sym4", "levels": 3}),
        (get_basis("db4", levels=3), {"levels": 3}),
        (HaarTransform(levels=2), {"levels": 2}),
        (get_basis("bior", levels=2), {"levels": 2}),
        (get_basis("sym8", levels=2), {"levels": 2}),
        (WaveletTransform("coif3", levels=3), {"levels": 3}),
    ],
    ids=str,
)
def test_levels_round_trip_bit_identically(basis: WaveletTransform, options: dict) -> None:
    assert basis.options() == options
    rebuilt = round_trip(basis)
    assert type(rebuilt) is type(basis) and rebuilt.options() == options
    assert rebuilt.levels == basis.levels and rebuilt.wavelet == basis.wavelet
    x = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(rebuilt(x.to(dtype)), basis(x.to(dtype)))
    indices = spectral_locations((16, 24), 100, 0)
    assert rebuilt.active_energy((16, 24), indices) == basis.active_energy((16, 24), indices)


def test_registered_two_level_basis() -> None:
    basis = get_basis("db4-l2")
    assert type(basis) is Daubechies4TwoLevelTransform
    assert not isinstance(basis, Daubechies4Transform)  # its own class: its own checkpoint name
    assert (basis.wavelet, basis.levels, basis.boundary, basis.orthonormal) == (
        "db4",
        2,
        "periodization",
        True,
    )
    assert repr(basis) == "Daubechies4TwoLevelTransform(wavelet='db4', levels=2)"
    assert basis_spec("db4-l2") == {
        "name": "db4-l2",
        "cls": "selora.spectral_bases.wavelet.Daubechies4TwoLevelTransform",
        "options": {},
    }
