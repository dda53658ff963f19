"""The wavelet synthesis routes (dense, blockwise, rows first, both blockwise) against PyWavelets.

The periodized 2-D inverse DWT is one gather of the spectrum into band
windows plus two matrix products (see ``selora/spectral_bases/wavelet.py``).
Which route a shape takes depends on its sizes, so every route is named here
by a shape that takes it, checked to take it, and compared with PyWavelets'
``idwt2(mode="periodization")`` in float64, with the exact adjoint (the
transpose of the oracle's own matrix), gradcheck, batching, low precision
and torch.compile.
"""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from selora.spectral_bases import get_basis, wavelet

TOL = 1e-10
CPU = torch.device("cpu")

# shape -> route. An axis of at most 64, and no longer than the other, is
# dense; any other goes blockwise, in blocks dividing its half length when one
# near 16 does (else the last block is cropped).
ROUTES = {
    (2, 2): "dense",
    (4, 6): "dense",
    (64, 64): "dense",
    (4, 48): "columns blockwise",  # blocks of 12
    (40, 4): "rows blockwise",  # blocks of 10
    (8, 384): "columns blockwise",
    (4, 74): "columns blockwise",  # half 37 is prime: the last block is cropped
    (384, 8): "rows blockwise",
    (74, 6): "rows blockwise",  # cropped
    (130, 200): "both blockwise",
    (74, 74): "both blockwise",  # both cropped
}
SHAPES = list(ROUTES)
WAVELETS = ["haar", "db4", "bior2.2", "coif1", "sym8", "coif3", "db10", "dmey"]


def route(name: str, m: int, n: int) -> str:
    plan = wavelet._plan(wavelet._polyphase(name), m, n, torch.float64, CPU)
    if plan.rows_first:
        return "rows blockwise"
    if plan.second_index is not None:
        return "both blockwise"
    return "columns blockwise" if plan.first.shape[0] < n else "dense"


def oracle(spectrum: np.ndarray, name: str) -> np.ndarray:
    hm, hn = spectrum.shape[-2] // 2, spectrum.shape[-1] // 2
    a, h = spectrum[..., :hm, :hn], spectrum[..., :hm, hn:]
    v, d = spectrum[..., hm:, :hn], spectrum[..., hm:, hn:]
    return pywt.idwt2((a, (h, v, d)), name, mode="periodization", axes=(-2, -1))


def oracle_matrix(name: str, m: int, n: int) -> torch.Tensor:
    """The (mn x mn) matrix of PyWavelets' synthesis, one unit spectrum at a time."""
    units = np.eye(m * n).reshape(m * n, m, n)
    return torch.from_numpy(oracle(units, name).reshape(m * n, m * n).T.copy())


def random(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_takes_its_route(shape: tuple[int, int]) -> None:
    for name in ["haar", "db4", "bior2.2", "coif1", "sym8", "coif3"]:
        assert route(name, *shape) == ROUTES[shape], name


def test_long_filters_fold_within_the_routes() -> None:
    # dmey (62 taps) on 74 samples: each block window (30 + 2 * 15 = 60 band
    # samples) is longer than the band of 37, so the gather wraps it more than
    # once; db10 and coif3 fold several times on the dense (2, 2).
    plan = wavelet._plan(wavelet._polyphase("dmey"), 4, 74, torch.float64, CPU)
    assert plan.first.shape == (60, 120)
    assert pywt.Wavelet("coif3").dec_len > 2 * 2 and pywt.Wavelet("db10").dec_len > 2 * 2


@pytest.mark.parametrize("name", ["haar", "db4", "bior2.2", "coif1", "sym8"])
@pytest.mark.parametrize("shape", [*SHAPES, (8, 4096), (4096, 8), (1024, 1024)])
def test_no_matrix_grows_with_the_layer(name: str, shape: tuple[int, int]) -> None:
    # dense (N, N) matrices only up to N = 64, block matrices of blocks up to 32 pairs
    plan = wavelet._plan(wavelet._polyphase(name), *shape, torch.float64, CPU)
    largest = max(t.numel() for t in plan if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert largest <= 64 * 64


@pytest.mark.parametrize("name", WAVELETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_route_matches_pywavelets(name: str, shape: tuple[int, int]) -> None:
    spectrum = random(shape, seed=sum(shape))
    out = get_basis(name)(spectrum)
    assert out.shape == shape and out.dtype == torch.float64 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), oracle(spectrum.numpy(), name), rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["db4", "bior2.2", "dmey"])
@pytest.mark.parametrize("shape", [(8, 384), (74, 6), (74, 74)])
def test_every_route_batched(name: str, shape: tuple[int, int]) -> None:
    spectrum = random((2, 3, *shape), seed=5)
    out = get_basis(name)(spectrum)
    np.testing.assert_allclose(out.numpy(), oracle(spectrum.numpy(), name), rtol=0, atol=TOL)
    # a non-contiguous batch too
    strided = random((*shape, 3), seed=6).movedim(-1, 0)
    np.testing.assert_allclose(
        get_basis(name)(strided).numpy(), oracle(strided.numpy(), name), rtol=0, atol=TOL
    )


@pytest.mark.parametrize("name", ["haar", "db4", "bior2.2", "coif3"])
@pytest.mark.parametrize("shape", [(4, 6), (4, 74), (74, 6), (66, 68)])
def test_the_gradient_is_the_transpose_of_pywavelets_matrix(
    name: str, shape: tuple[int, int]
) -> None:
    # the exact adjoint: the gradient is D^T y for PyWavelets' own matrix D
    dense = oracle_matrix(name, *shape)
    x = random(shape, 1).requires_grad_()
    upstream = random(shape, 2)
    (grad,) = torch.autograd.grad(get_basis(name)(x), x, upstream)
    expected = (dense.T @ upstream.reshape(-1)).view(shape)
    torch.testing.assert_close(grad, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["db4", "bior2.2"])
@pytest.mark.parametrize("shape", [(4, 74), (74, 6), (66, 68)])
def test_gradcheck_every_route(name: str, shape: tuple[int, int]) -> None:
    x = random(shape, 3).requires_grad_()
    basis = get_basis(name)
    assert torch.autograd.gradcheck(basis, (x,), atol=1e-8, rtol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(basis, (x,), atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("shape", [(8, 384), (384, 8), (74, 74)])
def test_forward_mode_and_vmap_every_route(shape: tuple[int, int]) -> None:
    basis = get_basis("coif")
    x, tangent = random((2, *shape), 5), random((2, *shape), 6)
    out, jvp = torch.func.jvp(basis, (x,), (tangent,))
    torch.testing.assert_close(out, basis(x), rtol=0, atol=0)
    torch.testing.assert_close(jvp, basis(tangent), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(basis)(x), basis(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 384), (384, 8), (74, 74)])
@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16])
def test_low_precision_every_route(shape: tuple[int, int], low: torch.dtype) -> None:
    basis = get_basis("db4")
    x = random(shape, 7, low)
    out = basis(x)
    assert out.dtype == low and out.shape == shape
    exact = basis(x.double())
    if low == torch.bfloat16:  # transformed in float32 and cast back
        torch.testing.assert_close(out, basis(x.float()).to(low))
    tol = 2 * torch.finfo(low).eps * exact.abs().max().item()
    assert (out.double() - exact).abs().max().item() <= tol


@pytest.mark.filterwarnings("error")  # Dynamo warns when it meets a functools cache
@pytest.mark.parametrize("shape", [(4, 6), (8, 384), (384, 8), (74, 74)])
def test_compiles_without_graph_breaks(shape: tuple[int, int]) -> None:
    torch._dynamo.reset()
    basis = get_basis("db4")
    x = random(shape, 8).requires_grad_()
    compiled = torch.compile(basis, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    np.testing.assert_allclose(
        out.detach().numpy(), oracle(x.detach().numpy(), "db4"), rtol=0, atol=TOL
    )
    upstream = random(shape, 9)
    (ours,) = torch.autograd.grad(out, x, upstream)
    (eager,) = torch.autograd.grad(basis(x), x, upstream)
    torch.testing.assert_close(ours, eager, rtol=0, atol=1e-12)


def test_plans_built_in_inference_mode_are_ordinary_tensors() -> None:
    wavelet._plan.cache_clear()
    try:
        with torch.inference_mode():
            get_basis("db4")(torch.randn(74, 74))
        plan = wavelet._plan(wavelet._polyphase("db4"), 74, 74, torch.float32, CPU)
        assert not any(t.is_inference() for t in plan if isinstance(t, torch.Tensor))
        x = torch.randn(74, 74, requires_grad=True)
        get_basis("db4")(x).square().sum().backward()
        assert x.grad is not None
    finally:
        wavelet._plan.cache_clear()
