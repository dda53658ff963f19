"""The eval-mode cache of an adapter's factors, and the check that keeps it current.

Unmerged inference (generation, mixed-batch serving) would otherwise form
every factor again at every token. A cache entry holds copies of the tensors
the factors were formed from; it is used only while every tensor still equals
its copy, whatever route changed it (an optimizer step, ``p.data = ...``, an
EMA swap), so outputs always follow the current parameters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CacheEntry", "cache_key", "factor_key", "factor_state", "unchanged"]


# (key, the buffers (held: their ids are in the key), copies of the parameters, A, B)
CacheEntry = tuple[tuple[Any, ...], tuple[Tensor, ...], tuple[Tensor, ...], Tensor, Tensor]


def factor_state(factor: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The tensors a factor is formed from: its parameters and its buffers."""
    if not factor._modules:  # no recursion for the built-in factors: this runs per token
        params: list[Tensor] = [p for p in factor._parameters.values() if p is not None]
        return params, [b for b in factor._buffers.values() if b is not None]
    return [*factor.parameters()], [*factor.buffers()]


def cache_key(
    dtype: torch.dtype, factor_a: nn.Module, factor_b: nn.Module
) -> tuple[list[Tensor], list[Tensor], tuple[Any, ...]]:
    """The parameters and buffers of the two factors, and the cache key of everything else.

    The key holds the dtype, the factor modules, their non-tensor state
    (:func:`factor_key`) and each buffer's id and version counter. One pass:
    this runs for every adapted layer at every generated token.
    """
    params: list[Tensor] = []
    buffers: list[Tensor] = []
    key: list[Any] = [dtype, factor_a, factor_b]
    for factor in (factor_a, factor_b):
        p, b = factor_state(factor)
        params += p
        buffers += b
        key += factor_key(factor)
        key += [(id(t), t._version) for t in b]
    return params, buffers, tuple(key)


def factor_key(factor: nn.Module) -> tuple[Any, ...]:
    """The non-tensor state a factor is formed from (compared with ``==``)."""
    return (
        getattr(factor, "basis", None),
        getattr(factor, "shape", None),
        getattr(factor, "scale_factor", None),
    )


def _load_memcmp() -> Callable[[int, int, int], int] | None:
    """C's ``memcmp``, to compare CPU tensors bytewise at memory speed (``None`` if absent).

    ``torch.equal`` compares element by element (about 1 ns per float32 on one
    CPU thread); ``memcmp`` is several times faster, and this comparison runs
    for every adapted layer at every generated token.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        memcmp = libc.memcmp
    except (OSError, AttributeError):  # pragma: no cover - platforms without a C library
        return None
    memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    memcmp.restype = ctypes.c_int
    compare: Callable[[int, int, int], int] = memcmp
    return compare


_MEMCMP = _load_memcmp()
_PLAIN = (Tensor, nn.Parameter)  # not subclasses (DTensor...): their data_ptr is not the data


def unchanged(tensors: list[Tensor], copies: tuple[Tensor, ...]) -> bool:
    """Tell whether each tensor still equals its copy (device, dtype, shape, values).

    Contiguous CPU tensors are compared bytewise (``memcmp``: a NaN equals an
    identical NaN, ``-0.0`` differs from ``0.0``, which only costs a rebuild),
    others with ``torch.equal``. The copies are contiguous clones.
    """
    if len(tensors) != len(copies):
        return False
    for t, c in zip(tensors, copies, strict=True):
        if t.dtype != c.dtype or t.shape != c.shape:
            return False
        if t.is_cpu:  # cheaper than building two torch.device objects
            if not c.is_cpu:
                return False
            if _MEMCMP is not None and type(t) in _PLAIN and t.is_contiguous():
                if _MEMCMP(t.data_ptr(), c.data_ptr(), t.numel() * t.element_size()) != 0:
                    return False
                continue
        elif t.device != c.device:
            return False
        if not torch.equal(t, c):
            return False
    return True
