"""Cached constants built under ``torch.inference_mode`` must not poison later training.

A first transform under ``inference_mode`` (a ``generate`` or an evaluation)
used to cache inference tensors (dct plans, location sets); every later
training step at the same size then failed with "Inference tensors cannot be
saved for backward".
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterator

import pytest
import torch
from basis_shapes import fit_shape

import selora
from selora import SparseSpectrum
from selora._tensor_cache import LocationCache
from selora.spectral_bases import cosine, spectrum, wavelet


def all_caches() -> Iterator[tuple[str, functools._lru_cache_wrapper | LocationCache]]:  # type: ignore[type-arg]
    for info in pkgutil.walk_packages(selora.__path__, "selora."):
        if info.name.startswith("selora.demo"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, (functools._lru_cache_wrapper, LocationCache)):
                yield f"{info.name}.{name}", value


@pytest.fixture(autouse=True)
def _cold_caches() -> Iterator[None]:
    for _, cache in all_caches():
        cache.cache_clear()
    yield
    for _, cache in all_caches():
        cache.cache_clear()


@pytest.mark.parametrize("basis", selora.list_bases())
@pytest.mark.parametrize("shape", [(8, 384), (6, 10), (600, 4)])
def test_training_after_a_first_use_in_inference_mode(basis: str, shape: tuple[int, int]) -> None:
    if basis not in ("fft", "dct") and any(s % 2 for s in shape):
        pytest.skip("wavelets need even sizes")
    shape = fit_shape(basis, shape)  # (6, 10) is (8, 12) for db4-l2
    torch.manual_seed(0)
    with torch.inference_mode():
        first = SparseSpectrum(shape, basis, sparse_ratio=0.5)().clone()
    layer = SparseSpectrum(shape, basis, sparse_ratio=0.5)
    (layer() ** 2).sum().backward()  # failed for dct and for the cached locations
    assert layer.coefficients.grad is not None
    assert torch.count_nonzero(layer.coefficients.grad) > 0
    assert first.shape == shape


def test_locations_first_drawn_in_inference_mode_train() -> None:
    with torch.inference_mode():
        drawn = spectrum.spectral_locations((16, 32), 100, seed=3)
    assert not drawn.is_inference()
    coeffs = torch.randn(100, requires_grad=True)
    torch.zeros(16 * 32).scatter(0, drawn, coeffs).sum().backward()
    assert coeffs.grad is not None


def test_every_module_level_cache_is_inference_safe() -> None:
    """The mechanism: a cache of tensors goes through ``tensor_cache``; others hold no tensor."""
    holds_no_tensor = {"selora.spectral_bases.wavelet._polyphase": ("db4",)}
    found = dict(all_caches())
    assert "selora.spectral_bases.cosine._dense_plan" in found  # the scan sees the caches
    for name, cache in found.items():
        if getattr(cache, "selora_tensor_cache", False) or isinstance(cache, LocationCache):
            continue  # both build outside inference mode
        assert name in holds_no_tensor, (
            f"{name} is a functools cache that is not selora._tensor_cache.tensor_cache: "
            "a tensor it builds under torch.inference_mode would poison training"
        )
        result = cache(*holds_no_tensor[name])
        assert not any(isinstance(v, torch.Tensor) for v in vars(result).values())


def test_the_dct_plans_are_ordinary_tensors_after_inference_mode() -> None:
    with torch.inference_mode():
        plan = cosine._dense_plan(24, torch.float32, torch.device("cpu"))
        route = cosine._fft_plan(24, torch.float32, torch.device("cpu"))
    assert not plan.is_inference()
    assert not route.is_inference()
    assert spectrum._cached_locations is not None and wavelet is not None
