"""Module-level caches of constant tensors that are safe under ``torch.inference_mode``.

A tensor created inside ``torch.inference_mode()`` is an *inference tensor*:
autograd refuses to save it for backward. A plain ``functools.cache`` around a
function that builds constant tensors (transform plans, location sets) keeps
whatever the first call made, so a first call under ``inference_mode`` (a
``generate``, an evaluation) would poison every later training step that reads
the constant ("Inference tensors cannot be saved for backward"). Every cached
constant tensor in selora goes through :func:`tensor_cache`, which builds it
with inference mode and gradient recording switched off.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

import torch
from torch import Tensor

__all__ = ["CachedBuilder", "LocationCache", "tensor_cache"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class CachedBuilder(Protocol, Generic[_P, _R]):
    """What :func:`tensor_cache` returns: the cached builder, the raw one, and a reset."""

    __wrapped__: Callable[_P, _R]

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """Return the cached result for these arguments (building it on first use)."""

    def cache_clear(self) -> None:
        """Forget every cached result."""


def tensor_cache(
    maxsize: int | None = None,
) -> Callable[[Callable[_P, _R]], CachedBuilder[_P, _R]]:
    """Return a decorator caching a builder of constant tensors, safely for inference mode.

    The builder runs under ``torch.inference_mode(False)`` and
    ``torch.no_grad()``, so the cached tensors are ordinary tensors that
    require no grad, whatever mode the first caller was in. The decorated
    function keeps ``__wrapped__`` (the uncached builder, for tracing under
    ``torch.compile``) and ``cache_clear``.

    Args:
        maxsize: the most results kept (least recently used go first); ``None``
            keeps every result.

    Returns:
        The decorator.
    """

    def decorator(build: Callable[_P, _R]) -> CachedBuilder[_P, _R]:
        @functools.wraps(build)
        def outside_inference(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with torch.inference_mode(False), torch.no_grad():
                return build(*args, **kwargs)

        cached = functools.lru_cache(maxsize=maxsize)(outside_inference)
        functools.update_wrapper(cached, build)
        cached.selora_tensor_cache = True  # type: ignore[attr-defined]  # found by the tests
        return cached

    return decorator


class LocationCache:
    r"""Constants derived from a location tensor, cached per tensor object (least recently used go).

    A basis' synthesis plan depends on the values of :math:`\Omega`, which a
    :class:`~selora.SparseSpectrum` keeps in one tensor shared by every factor
    of its shape and replaces (never edits) when the locations change. Keying by
    the tensor's identity and version costs nothing per call, where hashing its
    values would cost a pass over them. Each entry holds the tensor itself, so
    its ``id`` cannot be reused by another tensor while the entry lives. The
    builder runs like :func:`tensor_cache`'s, outside inference mode and
    without gradients; under ``torch.compile`` it is traced instead.

    Args:
        maxsize: the most entries kept.
    """

    def __init__(self, maxsize: int = 512) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[Hashable, ...], tuple[Tensor, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, indices: Tensor, key: tuple[Hashable, ...], build: Callable[[], _R]) -> _R:
        """Return ``build()`` for ``indices`` and ``key``, building it on first use.

        Args:
            indices: the location tensor the result derives from.
            key: whatever else the result depends on (shape, dtype, ...).
            build: computes the result from ``indices``.

        Returns:
            The cached or new result.
        """
        if torch.compiler.is_compiling():
            return build()
        full = (id(indices), indices._version, *key)
        with self._lock:
            found = self._entries.get(full)
            if found is not None and found[0] is indices:
                self._entries.move_to_end(full)
                result: _R = found[1]
                return result
        with torch.inference_mode(False), torch.no_grad():
            result = build()
        with self._lock:
            self._entries[full] = (indices, result)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return result

    def cache_clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
