"""Every basis against an independent float64 oracle: numpy, scipy, PyWavelets, ptwt."""

from __future__ import annotations

import numpy as np
import ptwt
import pytest
import pywt
import scipy.fft
import torch
from basis_oracles import (
    EXTRA_WAVELETS,
    ORACLES,
    REGISTERED_VARIANTS,
    REGISTERED_WAVELETS,
    idwt2_oracle,
)
from basis_shapes import fit_shape
from hypothesis import given, settings
from hypothesis import strategies as st

from selora.spectral_bases import WaveletTransform, get_basis, list_bases

FAST = settings(max_examples=20, deadline=None, database=None)
TOL = 1e-10

ALL_NAMES = [*list_bases(), *EXTRA_WAVELETS]


def is_wavelet(name: str) -> bool:
    return name not in ("fft", "dct")


def check_against_oracle(name: str, shape: tuple[int, ...], seed: int) -> None:
    spectrum = np.random.default_rng(seed).standard_normal(shape)
    expected = ORACLES[name](spectrum)
    assert expected.shape == spectrum.shape  # the oracle itself keeps the shape
    out = get_basis(name)(torch.from_numpy(spectrum))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=TOL)


def test_every_registered_basis_has_an_oracle() -> None:
    assert set(list_bases()) <= set(ORACLES)
    for name, wavelet in REGISTERED_WAVELETS.items():
        basis = get_basis(name)
        assert isinstance(basis, WaveletTransform)
        assert basis.wavelet == wavelet
        assert (basis.levels, basis.boundary) == (1, "periodization")
    for name, (wavelet, levels, boundary) in REGISTERED_VARIANTS.items():
        basis = get_basis(name)
        assert isinstance(basis, WaveletTransform)
        assert (basis.wavelet, basis.levels, basis.boundary) == (wavelet, levels, boundary)


@pytest.mark.parametrize("name", ALL_NAMES)
@FAST
@given(data=st.data())
def test_matches_oracle_on_drawn_shapes(name: str, data: st.DataObject) -> None:
    if is_wavelet(name):
        m = 2 * data.draw(st.integers(1, 12), label="m/2")
        n = 2 * data.draw(st.integers(1, 12), label="n/2")
        m, n = fit_shape(name, (m, n))  # multi-level and boundary bases take fewer shapes
    else:
        m = data.draw(st.integers(1, 24), label="m")
        n = data.draw(st.integers(1, 24), label="n")
    batch = data.draw(st.sampled_from([(), (3,), (2, 1, 2)]), label="batch")
    check_against_oracle(name, (*batch, m, n), data.draw(st.integers(0, 2**32 - 1)))


# dct takes a dense-matrix route along a dimension no longer than the other
# one (and than 512), and an FFT route along the rest: (16, 9), (8, 512),
# (3, 600), (513, 2), (4, 1025) and (1, 1024) run it on odd and even lengths.
@pytest.mark.parametrize("name", ["fft", "dct"])
@pytest.mark.parametrize(
    "shape",
    [
        *[(1, 1), (1, 7), (5, 1), (3, 5), (16, 9), (32, 64), (64, 32)],
        *[(8, 512), (3, 600), (513, 2), (4, 1025), (1, 1024)],
    ],
)
def test_fourier_and_cosine_explicit_shapes(name: str, shape: tuple[int, int]) -> None:
    check_against_oracle(name, shape, seed=sum(shape))


@pytest.mark.parametrize("shape", [(2, 513), (515, 3)])
def test_cosine_fft_route_gradients(shape: tuple[int, int]) -> None:
    """gradcheck on the FFT route (long dimensions), which the small drawn shapes miss."""
    basis = get_basis("dct")
    spectrum = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(basis, (spectrum,), fast_mode=True)


@pytest.mark.parametrize("name", [*REGISTERED_WAVELETS, "sym8", "dmey", "db10", "coif3"])
@pytest.mark.parametrize(
    "shape", [(2, 2), (2, 4), (4, 2), (4, 6), (6, 4), (2, 16), (10, 14), (32, 64), (64, 8)]
)
def test_wavelet_explicit_shapes(name: str, shape: tuple[int, int]) -> None:
    # (2, 2), (2, 4), (4, 6) put filters of 8 to 62 taps on bands of 1 to 3
    # samples: the periodic wrap folds them several times.
    check_against_oracle(name, shape, seed=sum(shape))


@pytest.mark.parametrize("name", ["db4", "sym8", "dmey"])
def test_wavelet_batched_explicit(name: str) -> None:
    check_against_oracle(name, (2, 3, 4, 6), seed=7)


def test_long_filters_are_exercised() -> None:
    # The small-shape cases above only mean something if the filters are longer.
    for name, half in [("db4", 1), ("sym8", 2), ("dmey", 3), ("db10", 3)]:
        assert pywt.Wavelet(name).dec_len > 2 * half


# --- ptwt: a second, differentiable reference for the wavelets -------------------------


def ptwt_periodized(spectrum: torch.Tensor, wavelet: str) -> torch.Tensor:
    """Periodized one-level inverse DWT through ptwt's zero-padding ``waverec2``.

    ptwt has no periodization mode. With L taps and p = ceil(L / 4), pad every
    quadrant circularly by p coefficients on each side, run ``waverec2`` and
    crop c = 2p - L/2 + 1 samples from each end: ptwt's own crop of L - 2 plus
    c lands exactly on PyWavelets' periodized sample 0 (which sits L/2 - 1
    samples into the unwrapped synthesis), and p >= L/4 coefficients of wrap
    cover every tap of every kept sample. The padding wraps by indexing, not
    ``F.pad(mode="circular")``: torch's circular pad refuses a pad larger than
    the band, which is exactly the long-filter case (dmey on 2x2); with the
    index wrap, ptwt matches on every even shape.
    """
    m, n = spectrum.shape[-2:]
    hm, hn = m // 2, n // 2
    taps = pywt.Wavelet(wavelet).dec_len
    pad = -(-taps // 4)
    crop = 2 * pad - taps // 2 + 1

    def wrap(band: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(-pad, band.shape[-2] + pad) % band.shape[-2]
        cols = torch.arange(-pad, band.shape[-1] + pad) % band.shape[-1]
        return band[..., rows, :][..., cols]

    a, h = spectrum[..., :hm, :hn], spectrum[..., :hm, hn:]
    v, d = spectrum[..., hm:, :hn], spectrum[..., hm:, hn:]
    out = ptwt.waverec2((wrap(a), (wrap(h), wrap(v), wrap(d))), pywt.Wavelet(wavelet))
    return out[..., crop : crop + m, crop : crop + n]


PTWT_CASES = [
    (wavelet, shape)
    for wavelet in ["haar", "db4", "bior2.2", "coif1", "sym8", "dmey"]
    for shape in [(2, 2), (4, 6), (8, 10), (16, 32), (2, 3, 6, 4)]
]


@pytest.mark.parametrize(("wavelet", "shape"), PTWT_CASES)
def test_ptwt_reference_matches_pywavelets_and_selora(wavelet: str, shape: tuple[int, ...]) -> None:
    spectrum = torch.from_numpy(np.random.default_rng(len(shape)).standard_normal(shape))
    reference = ptwt_periodized(spectrum, wavelet)
    # the reference itself is right ...
    np.testing.assert_allclose(
        reference.numpy(), idwt2_oracle(wavelet)(spectrum.numpy()), rtol=0, atol=TOL
    )
    # ... and selora agrees with it
    torch.testing.assert_close(get_basis(wavelet)(spectrum), reference, rtol=0, atol=TOL)


@pytest.mark.parametrize("wavelet", ["haar", "db4", "bior2.2", "coif1", "sym8"])
@pytest.mark.parametrize("shape", [(4, 6), (16, 8)])
def test_gradient_matches_ptwt(wavelet: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    spectrum = torch.from_numpy(rng.standard_normal(shape)).requires_grad_()
    upstream = torch.from_numpy(rng.standard_normal(shape))
    (ours,) = torch.autograd.grad(get_basis(wavelet)(spectrum), spectrum, upstream)
    (theirs,) = torch.autograd.grad(ptwt_periodized(spectrum, wavelet), spectrum, upstream)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)


@pytest.mark.filterwarnings("error")  # Dynamo warns when it meets a functools cache
@pytest.mark.parametrize("shape", [(4, 40), (2, 600)])
def test_cosine_compiles_without_graph_breaks(shape: tuple[int, int]) -> None:
    torch._dynamo.reset()
    basis = get_basis("dct")
    spectrum = torch.randn(shape, dtype=torch.float64)
    compiled = torch.compile(basis, backend="aot_eager", fullgraph=True)
    expected = scipy.fft.idctn(spectrum.numpy(), norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(compiled(spectrum).numpy(), expected, atol=1e-12)
