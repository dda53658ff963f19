"""``InverseTransform.synthesize``: the matrix straight from the coefficients and locations.

``fft``, ``dct`` and the periodized wavelets skip the dense spectrum
(half-spectrum ``irfft2``; Makhoul's length-N DCT with the coefficients
written into its half spectrum; the wavelet windows gathered from the
coefficients). Each must equal the oracle of the scattered spectrum (numpy,
scipy, PyWavelets) in value and, through its hand-written adjoint, in gradient;
every registered basis must agree with the default scatter-then-transform.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.fft
import torch
from basis_oracles import ORACLES
from basis_shapes import accepts, fit_shape
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from selora import SparseSpectrum
from selora._tensor_cache import LocationCache
from selora.spectral_bases import (
    InverseTransform,
    WaveletTransform,
    cosine,
    fourier,
    get_basis,
    list_bases,
    register_basis,
    wavelet_levels,
)
from selora.spectral_bases.registry import unregister_basis

FAST = settings(max_examples=25, deadline=None, database=None)
TOL = 1e-10

# (8, 384): the dct's long axis last; (384, 8): first; odd and unit sizes; a
# square (both dct axes dense) and a pair with both axes long (default route)
SHAPES = [(8, 384), (384, 8), (32, 576), (576, 32), (7, 9), (9, 7), (1, 5), (5, 1), (6, 6)]


def draw(shape: tuple[int, int], k: int, batch: tuple[int, ...] = (), seed: int = 0) -> Any:
    m, n = shape
    rng = np.random.default_rng(seed)
    flat = rng.choice(m * n, size=k, replace=False)
    coeffs = rng.standard_normal((*batch, k))
    return torch.from_numpy(flat), torch.from_numpy(coeffs)


def dense(flat: Tensor, coeffs: Tensor, shape: tuple[int, int]) -> np.ndarray:
    m, n = shape
    out = np.zeros((*coeffs.shape[:-1], m * n))
    out[..., flat.numpy()] = coeffs.detach().numpy()
    return out.reshape(*coeffs.shape[:-1], m, n)


def oracle(name: str, spectrum: np.ndarray) -> np.ndarray:
    if spectrum.ndim == 2:
        return ORACLES[name](spectrum)
    return np.stack([oracle(name, s) for s in spectrum])


def adjoint_oracle(name: str, grad: np.ndarray) -> np.ndarray:
    """The adjoint of T applied to ``grad``: fft ``Re(DFT_2) / (mn)``, dct the 2-D DCT-II."""
    if name == "fft":
        m, n = grad.shape[-2:]
        return np.fft.fft2(grad).real / (m * n)
    return scipy.fft.dctn(grad, axes=(-2, -1), norm="ortho")


@pytest.mark.parametrize("name", ["fft", "dct"])
@pytest.mark.parametrize("shape", [*SHAPES, (2, 700), (700, 2), (600, 600), (33, 577), (1, 1)])
def test_fft_and_dct_match_the_oracle_and_its_adjoint(name: str, shape: tuple[int, int]) -> None:
    m, n = shape
    flat, coeffs = draw(shape, max(1, (2 * m * n) // 5), batch=(3,))
    coeffs.requires_grad_(True)
    out = get_basis(name).synthesize(coeffs, flat, shape)
    assert out.shape == (3, m, n) and out.dtype == torch.float64
    np.testing.assert_allclose(
        out.detach().numpy(), oracle(name, dense(flat, coeffs, shape)), rtol=0, atol=TOL
    )
    grad = np.random.default_rng(1).standard_normal((3, m, n))
    (got,) = torch.autograd.grad(out, coeffs, torch.from_numpy(grad))
    expected = adjoint_oracle(name, grad).reshape(3, -1)[:, flat.numpy()]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["fft", "dct"])
@FAST
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fft_and_dct_match_the_oracle_on_drawn_shapes(
    name: str, m: int, n: int, fraction: float, seed: int
) -> None:
    k = max(1, int(fraction * m * n))
    flat, coeffs = draw((m, n), k, seed=seed)
    out = get_basis(name).synthesize(coeffs, flat, (m, n))
    np.testing.assert_allclose(
        out.numpy(), oracle(name, dense(flat, coeffs, (m, n))), rtol=0, atol=TOL
    )


@pytest.mark.parametrize("name", ["fft", "dct", "haar", "db4", "coif", "db4-l2", "db2-boundary"])
@pytest.mark.parametrize("shape", [(4, 10), (10, 4), (6, 6), (2, 8), (2, 136), (136, 2)])
def test_gradcheck_in_float64(name: str, shape: tuple[int, int]) -> None:
    """(2, 136) and (136, 2): a wavelet's long axis goes blockwise, through overlapping windows."""
    shape = fit_shape(name, shape)
    m, n = shape
    flat, coeffs = draw(shape, max(1, (m * n) // 2), batch=(2,))
    basis = get_basis(name)
    coeffs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: basis.synthesize(s, flat, shape), (coeffs,))
    assert torch.autograd.gradgradcheck(lambda s: basis.synthesize(s, flat, shape), (coeffs,))


def agrees_with_the_default(
    basis: InverseTransform, flat: Tensor, coeffs: Tensor, shape: tuple[int, int]
) -> Tensor:
    """Assert the override equals scatter-then-transform in value and gradient; return it."""
    coeffs.requires_grad_(True)
    got = basis.synthesize(coeffs, flat, shape)
    expected = InverseTransform.synthesize(basis, coeffs, flat, shape)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn(got.shape, dtype=torch.float64)
    (g_got,) = torch.autograd.grad(got, coeffs, grad)
    (g_expected,) = torch.autograd.grad(expected, coeffs, grad)
    torch.testing.assert_close(g_got, g_expected, rtol=0, atol=1e-12)
    return got


@pytest.mark.parametrize("name", list_bases())
@pytest.mark.parametrize("shape", [(8, 384), (384, 8), (6, 10), (16, 16)])
def test_every_basis_agrees_with_the_default(name: str, shape: tuple[int, int]) -> None:
    """The override equals scatter-then-transform, in value and gradient, batched or not."""
    basis = get_basis(name)
    shape = fit_shape(name, shape)
    m, n = shape
    flat, coeffs = draw(shape, (3 * m * n) // 5, batch=(2,))
    got = agrees_with_the_default(basis, flat, coeffs, shape)
    one = basis.synthesize(coeffs[1].detach(), flat, shape)
    torch.testing.assert_close(one, got[1].detach(), rtol=0, atol=1e-12)


# levels and boundaries beyond the registered ones; (136, 136) and (272, 16):
# both axes or the first long at every level; (16, 272) the columns long
LEVELLED = [
    WaveletTransform("sym4", boundary="orthogonal", levels=2),
    WaveletTransform("db2", boundary="orthogonal", levels=3),
    WaveletTransform("bior2.2", levels=3),
    WaveletTransform("coif1", levels=2),
]


@pytest.mark.parametrize("basis", LEVELLED, ids=repr)
@pytest.mark.parametrize("shape", [(136, 136), (16, 272), (272, 16), (32, 32)])
def test_levels_and_boundaries_agree_with_the_default(
    basis: WaveletTransform, shape: tuple[int, int]
) -> None:
    """Every level's gather composed with the scatter and the coarser level's result."""
    m, n = shape
    flat, coeffs = draw(shape, (2 * m * n) // 5, batch=(2,), seed=m + n)
    agrees_with_the_default(basis, flat, coeffs, shape)


@pytest.mark.parametrize("basis", [*LEVELLED[:2], WaveletTransform("db4", levels=2)], ids=repr)
@pytest.mark.parametrize("shape", [(16, 72), (72, 16)])
def test_levels_and_boundaries_pass_gradcheck(
    basis: WaveletTransform, shape: tuple[int, int]
) -> None:
    """72 > 64: the long axis of the finest level goes blockwise, the coarser ones dense."""
    flat, coeffs = draw(shape, (shape[0] * shape[1]) // 8, batch=(2,))
    coeffs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: basis.synthesize(s, flat, shape), (coeffs,))
    assert torch.autograd.gradgradcheck(lambda s: basis.synthesize(s, flat, shape), (coeffs,))


@pytest.mark.parametrize("name", ["fft", "dct", "coif"])
def test_forward_mode_vmap_and_compile(name: str) -> None:
    shape = (8, 40)
    flat, coeffs = draw(shape, 150, batch=(3,))
    basis = get_basis(name)

    def synthesize(s: Tensor) -> Tensor:
        return basis.synthesize(s, flat, shape)

    tangent = torch.randn_like(coeffs)
    out, jvp = torch.func.jvp(synthesize, (coeffs,), (tangent,))
    torch.testing.assert_close(jvp, synthesize(tangent), rtol=0, atol=1e-12)  # linear
    torch.testing.assert_close(torch.func.vmap(synthesize)(coeffs), out, rtol=0, atol=1e-12)
    torch._dynamo.reset()
    compiled = torch.compile(synthesize, backend="aot_eager", fullgraph=True)
    leaf = coeffs.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(leaf), out, rtol=0, atol=1e-12)
    compiled(leaf).square().sum().backward()
    coeffs.requires_grad_(True)
    (expected,) = torch.autograd.grad(synthesize(coeffs).square().sum(), coeffs)
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["fft", "dct", "haar"])
def test_new_locations_of_the_same_shape_get_their_own_plan(name: str) -> None:
    """The plans are cached per location tensor: another tensor never reads a stale plan."""
    shape = (8, 384)
    basis = get_basis(name)
    for seed in range(3):
        flat, coeffs = draw(shape, 1000, seed=seed)
        out = basis.synthesize(coeffs, flat, shape)
        np.testing.assert_allclose(
            out.numpy(), oracle(name, dense(flat, coeffs, shape)), rtol=0, atol=TOL
        )


def test_location_cache_follows_identity_and_builds_outside_inference_mode() -> None:
    cache = LocationCache(maxsize=2)
    first, second = torch.arange(4), torch.arange(4)
    calls: list[int] = []

    def build(tensor: Tensor) -> Any:
        def run() -> Tensor:
            calls.append(1)
            return tensor * 2

        return run

    with torch.inference_mode():
        built = cache.get(first, ("a",), build(first))
    assert not built.is_inference()
    assert cache.get(first, ("a",), build(first)) is built
    assert cache.get(second, ("a",), build(second)) is not built  # equal values, other tensor
    assert len(calls) == 2
    cache.get(first, ("b",), build(first))
    cache.get(second, ("b",), build(second))  # evicts the least recently used
    assert len(cache._entries) == 2
    cache.cache_clear()
    assert not cache._entries


def test_every_location_cache_is_cleared_between_the_inference_mode_tests() -> None:
    from test_inference_mode_caches import all_caches

    names = {name for name, _ in all_caches()}
    for module, attribute in [
        (fourier, "_plans"),
        (cosine, "_plans"),
        (wavelet_levels, "_composed"),
    ]:
        assert isinstance(getattr(module, attribute), LocationCache)
        assert f"{module.__name__}.{attribute}" in names


@pytest.mark.parametrize("name", ["fft", "dct", "haar"])
def test_spectrum_trains_after_a_first_forward_in_inference_mode(name: str) -> None:
    with torch.inference_mode():
        SparseSpectrum((8, 384), name, sparse_ratio=0.5)()
    layer = SparseSpectrum((8, 384), name, sparse_ratio=0.5)
    layer().square().sum().backward()
    assert layer.coefficients.grad is not None
    assert torch.count_nonzero(layer.coefficients.grad) > 0


def test_a_user_basis_gets_the_default() -> None:
    @register_basis("test-negate")
    class Negate(InverseTransform):
        def inverse(self, spectrum: Tensor) -> Tensor:
            return -spectrum

    try:
        flat, coeffs = draw((4, 6), 10)
        out = get_basis("test-negate").synthesize(coeffs, flat, (4, 6))
        np.testing.assert_array_equal(out.numpy(), -dense(flat, coeffs, (4, 6)))
    finally:
        unregister_basis("test-negate")


@pytest.mark.parametrize("name", ["fft", "dct", "haar"])
def test_low_precision_coefficients_take_the_default(name: str) -> None:
    flat, coeffs = draw((8, 384), 1000)
    low = coeffs.to(torch.bfloat16)
    basis = get_basis(name)
    out = basis.synthesize(low, flat, (8, 384))
    assert out.dtype == torch.bfloat16
    expected = InverseTransform.synthesize(basis, low, flat, (8, 384))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert accepts(basis, 8, 384)


@FAST
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    length=st.integers(1, 30),
    picks=st.integers(0, 40),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_select_last_is_index_select_on_the_last_dim(
    lead: list[int], length: int, picks: int, transposed: bool, seed: int
) -> None:
    from selora.spectral_bases._gather import select_last

    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(*lead, length, dtype=torch.float64, generator=gen, requires_grad=True)
    source = values.mT if transposed and values.dim() >= 2 else values  # a strided input too
    index = torch.randint(0, source.shape[-1], (picks,), generator=gen)
    out = select_last(source, index)
    expected = np.take(source.detach().numpy(), index.numpy(), axis=-1)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out.detach().numpy(), expected)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    (grad,) = torch.autograd.grad((out * weights).sum(), values)
    # the adjoint of a gather adds each output's weight back at its source (numpy oracle)
    adjoint = np.zeros(source.shape)
    np.add.at(np.moveaxis(adjoint, -1, 0), index.numpy(), np.moveaxis(weights.numpy(), -1, 0))
    if source is not values:
        adjoint = np.swapaxes(adjoint, -1, -2)
    np.testing.assert_allclose(grad.numpy(), adjoint, rtol=0, atol=1e-12)


@FAST
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    head=st.integers(1, 12),
    tail=st.integers(0, 12),
    places=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_gather_with_zero_and_its_adjoint(
    lead: list[int], head: int, tail: int, places: int, seed: int
) -> None:
    """Entries read never, once or many times, the zero slot read too (numpy oracle)."""
    from selora.spectral_bases._gather import gather_plan, gather_with_zero

    gen = torch.Generator().manual_seed(seed)
    count = head + tail
    positions = torch.randint(0, count + 1, (places,), generator=gen)  # count: the zero
    first = torch.randn(*lead, head, dtype=torch.float64, generator=gen, requires_grad=True)
    second = torch.randn(*lead, tail, dtype=torch.float64, generator=gen, requires_grad=True)
    plan = gather_plan(positions, count)
    out = gather_with_zero(first, plan, tail=second if tail else None)
    source = np.concatenate(
        [first.detach().numpy(), second.detach().numpy(), np.zeros((*lead, 1))], axis=-1
    )
    np.testing.assert_array_equal(out.detach().numpy(), source[..., positions.numpy()])
    weights = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad((out * weights).sum(), [first, second] if tail else [first])
    adjoint = np.zeros(source.shape)
    np.add.at(np.moveaxis(adjoint, -1, 0), positions.numpy(), np.moveaxis(weights.numpy(), -1, 0))
    got = np.concatenate([g.numpy() for g in grads], axis=-1)
    np.testing.assert_allclose(got, adjoint[..., :count], rtol=0, atol=1e-12)
    if tail:  # forward mode: linear, a part without a tangent moves nothing
        _, jvp = torch.func.jvp(
            lambda h: gather_with_zero(h, plan, tail=second.detach()),
            (first.detach(),),
            (torch.ones_like(first),),
        )
        expected = (positions.numpy() < head).astype(float)  # ones where the head is read
        np.testing.assert_array_equal(jvp.numpy(), np.broadcast_to(expected, jvp.shape))
