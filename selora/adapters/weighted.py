r"""Weighted combinations of adapters (PEFT's ``add_weighted_adapter``), for both front doors.

Two of PEFT's combination types are supported, with PEFT's semantics; the new
adapter has scale 1 (``alpha=None``, no rsLoRA), the sources' scales
:math:`s_i` (:math:`\alpha_i / r_i`, or :math:`\alpha_i/\sqrt{r_i}` with
rsLoRA; 1 for HiRA, which has no scale) folded into its factors:

``"cat"``
    Rank concatenation: :math:`\tilde A = [w_1 s_1 \tilde A_1; w_2 s_2 \tilde A_2; \dots]`,
    :math:`\tilde B = [\tilde B_1, \tilde B_2, \dots]`, so
    :math:`\tilde B \tilde A = \sum_i w_i s_i \tilde B_i \tilde A_i`: **exact** for the
    summed update (LoRA: :math:`\Delta W = \sum_i w_i \Delta W_i`; HiRA:
    :math:`W_0 \odot \sum_i w_i \tilde B_i \tilde A_i`), whatever the sources'
    bases, ranks and locations. The stacked rows of several spectra are not one
    sparse spectrum, so the new adapter has **dense** factors (``basis=None``)
    of rank :math:`\sum_i r_i` (with ``rank_pattern``, the sum of each source's
    largest rank, zero-padded, as PEFT does).

``"linear"``
    PEFT's factor-wise combination:
    :math:`\tilde A = \sum_i \mathrm{sign}(w_i s_i)\sqrt{|w_i s_i|}\,\tilde A_i`,
    :math:`\tilde B = \sum_i \sqrt{|w_i s_i|}\,\tilde B_i`. A spectral factor is
    linear in its coefficients (:math:`c\,T(\mathrm{scatter}(s, \Omega))`), so when
    the sources share basis, shapes, locations and scale constant the
    combination is done on the coefficients and the new factors equal PEFT's
    formula on the formed factors **exactly** (up to float rounding). The update
    :math:`\tilde B \tilde A` is bilinear, though: it equals the weighted sum of
    the sources' updates only for a single source (PEFT itself says ``linear``
    is "a very rough approximation" otherwise); the cross terms
    :math:`\tilde B_i \tilde A_j` remain.

PEFT's SVD, TIES, DARE and magnitude-prune types are refused (they approximate
the summed update that ``"cat"`` gives exactly); so are DoRA adapters (their
normalisation is not linear in the factors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.config import SpectralAdapter
from selora.adapters.factors import DenseFactor
from selora.adapters.layer import SpectralLayer
from selora.adapters.model import adapter_config, adapter_layers, delete_adapter, inject
from selora.adapters.patterns import PATTERN_FIELDS
from selora.adapters.unit import AdapterUnit
from selora.spectral_bases import SparseSpectrum, basis_spec

__all__ = [
    "COMBINATION_TYPES",
    "add_weighted_adapter",
    "check_sources",
    "combined_adapter",
    "fill_combined",
]

COMBINATION_TYPES: tuple[str, ...] = ("cat", "linear")
"""The combination types selora supports (PEFT's names)."""

_PEFT_ONLY = (
    "svd",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_COMBINABLE_BASES = ("lora", "hira")
_SHARED_FIELDS = ("base", "r", "sparse_ratio", "n_coeffs", "seed", "scale", "rank_pattern")
"""What ``"linear"`` needs the sources to share (with the basis): same factor shapes and budgets."""


@contextlib.contextmanager
def quiet_rank_warning() -> Iterator[None]:
    """Silence the ``r exceeds min(d_in, d_out)`` warning: "cat" sums the sources' ranks."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"r=\d+ exceeds min", category=UserWarning)
        yield


def _check_type(combination_type: str, count: int) -> str:
    if combination_type in _PEFT_ONLY:
        raise ValueError(
            f"combination_type={combination_type!r} is not supported by selora: it approximates "
            "the weighted sum of the updates; use 'cat' (exact for the summed update) or "
            "'linear' (PEFT's factor-wise combination, exact in coefficient space)"
        )
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"combination_type must be one of {list(COMBINATION_TYPES)}; got {combination_type!r}"
        )
    return "linear" if count == 1 else combination_type  # PEFT: one adapter is linear


def _check_weights(adapters: Sequence[str], weights: Sequence[float]) -> list[float]:
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names; got {adapters!r}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters must be distinct; got {list(adapters)}")
    values = list(weights)
    if len(values) != len(adapters):
        raise ValueError(
            f"got {len(values)} weights for {len(adapters)} adapters; give one weight each"
        )
    for w in values:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"weights must be finite numbers; got {w!r}")
    return [float(w) for w in values]


def _basis_key(adapter: SpectralAdapter) -> object:
    return None if adapter.basis is None else basis_spec(adapter.basis)


def check_sources(
    specs: Sequence[SpectralAdapter], names: Sequence[str], combination_type: str
) -> None:
    """Check that the source adapters can be combined (their descriptions only).

    Args:
        specs: the sources' adapter descriptions.
        names: their names, for messages.
        combination_type: ``"cat"`` or ``"linear"``.

    Raises:
        ValueError: for a base that is not LoRA or HiRA, mixed bases, or, for
            ``"linear"``, sources that differ in basis, rank, budget, seed or scale.
    """
    for name, spec in zip(names, specs, strict=True):
        if spec.base not in _COMBINABLE_BASES:
            raise ValueError(
                f"adapter {name!r} has base {spec.base!r}; weighted combinations support "
                f"{list(_COMBINABLE_BASES)} (a DoRA update is not linear in its factors)"
            )
    first = specs[0]
    for name, spec in zip(names[1:], specs[1:], strict=True):
        if spec.base != first.base:
            raise ValueError(
                f"adapters {names[0]!r} and {name!r} have different bases ({first.base!r}, "
                f"{spec.base!r}); they cannot be combined"
            )
        if combination_type != "linear":
            continue
        differ = [f for f in _SHARED_FIELDS if getattr(spec, f) != getattr(first, f)]
        differ += [f for f in PATTERN_FIELDS[2:] if getattr(spec, f) != getattr(first, f)]
        if _basis_key(spec) != _basis_key(first):
            differ.insert(0, "basis")
        if differ:
            raise ValueError(
                f"combination_type='linear' combines coefficients, so the adapters must share "
                f"basis, shapes and locations; {names[0]!r} and {name!r} differ in {differ} "
                "(use 'cat', exact for the summed update)"
            )


def _rank(spec: SpectralAdapter) -> int:
    return max(spec.r, *spec.rank_pattern.values()) if spec.rank_pattern else spec.r


def combined_adapter(
    specs: Sequence[SpectralAdapter], combination_type: str, layer_names: Iterable[str]
) -> SpectralAdapter:
    r"""Return the description of the combined adapter (targets: exactly ``layer_names``).

    Args:
        specs: the sources' descriptions (checked by :func:`check_sources`).
        combination_type: ``"cat"`` or ``"linear"``.
        layer_names: the full names of the layers that hold any source.

    Returns:
        The first source's description with scale 1 (``alpha=None``, no rsLoRA,
        no ``alpha_pattern``), targets the given layers; for ``"cat"``, dense
        factors of rank :math:`\sum_i r_i` and no pattern.
    """
    first = specs[0]
    pattern = "|".join(re.escape(n) for n in sorted(layer_names))
    common: dict[str, Any] = {
        "alpha": None,
        "alpha_pattern": {},
        "use_rslora": False,
        "target_modules": f"(?:{pattern})",
        "exclude_modules": (),
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if combination_type == "linear":
        return dataclasses.replace(first, **common)
    cleared: dict[str, Any] = {f: {} for f in PATTERN_FIELDS if f != "alpha_pattern"}
    return dataclasses.replace(
        first,
        **common,
        basis=None,
        sparse_ratio=None,
        n_coeffs=None,
        r=sum(_rank(s) for s in specs),
        **cleared,
    )


def _scale(unit: AdapterUnit) -> float:
    return unit.scaling if unit.adapter.base == "lora" else 1.0  # HiRA has no scale


def _present(
    layer: SpectralLayer, sources: Sequence[str], weights: Sequence[float]
) -> list[tuple[AdapterUnit, float]]:
    return [
        (layer.unit(n), w) for n, w in zip(sources, weights, strict=True) if n in layer.selora_units
    ]


def _same_locations(units: Sequence[AdapterUnit], where: str) -> None:
    for side in ("lora_A", "lora_B"):
        factors = [getattr(u, side) for u in units]
        first = factors[0]
        for other in factors[1:]:
            same = type(other) is type(first) and other.shape == first.shape
            if same and isinstance(first, SparseSpectrum):
                assert isinstance(other, SparseSpectrum)
                same = (
                    torch.equal(other.indices.cpu(), first.indices.cpu())
                    and other.scale_factor == first.scale_factor
                )
            if not same:
                raise ValueError(
                    f"{where}: the adapters' {side} factors differ in shape or locations, so "
                    "combination_type='linear' cannot combine their coefficients (use 'cat')"
                )


def check_layers(
    layers: Iterable[tuple[str, SpectralLayer]],
    sources: Sequence[str],
    combination_type: str,
) -> list[str]:
    """Check the sources' units layer by layer; return the names of the layers holding any.

    Raises:
        ValueError: if no layer holds a source; for ``"linear"``, if the units
            of one layer differ in factor shape or locations (naming the layer).
    """
    names = []
    for name, layer in layers:
        units = [layer.unit(n) for n in sources if n in layer.selora_units]
        if not units:
            continue
        names.append(name)
        if combination_type == "linear":
            _same_locations(units, name)
    if not names:
        raise ValueError(f"no layer holds any of the adapters {list(sources)}")
    return names


def _param(factor: nn.Module) -> Tensor:
    if isinstance(factor, SparseSpectrum):
        return factor.coefficients
    assert isinstance(factor, DenseFactor)
    return factor.weight


@torch.no_grad()
def _fill_layer(
    layer: SpectralLayer,
    name: str,
    sources: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
) -> None:
    present = _present(layer, sources, weights)
    new = layer.unit(name)
    if combination_type == "cat":
        a_new, b_new = _param(new.lora_A), _param(new.lora_B)
        a_new.zero_()
        b_new.zero_()
        row = 0
        for unit, weight in present:
            a, b = unit.lora_A(None), unit.lora_B(None)
            rank = a.shape[0]
            a_new[row : row + rank] = (a.to(torch.float64) * (weight * _scale(unit))).to(
                a_new.dtype
            )
            b_new[:, row : row + rank] = b.to(b_new.dtype)
            row += rank
    else:
        for side in ("lora_A", "lora_B"):
            target = getattr(new, side)
            source = getattr(present[0][0], side)
            if isinstance(target, SparseSpectrum):
                target.set_locations(source.indices)
            total = torch.zeros_like(_param(source), dtype=torch.float64)
            for unit, weight in present:
                scaled = weight * _scale(unit)
                factor = math.sqrt(abs(scaled))
                if side == "lora_A" and scaled < 0:
                    factor = -factor  # PEFT: the sign goes on A only
                total += _param(getattr(unit, side)).to(torch.float64) * factor
            _param(target).copy_(total)
    new.train(new.training)  # drops the factor cache


def fill_combined(
    layers: Iterable[SpectralLayer],
    name: str,
    sources: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
) -> None:
    """Write the combination of ``sources`` into the new unit ``name`` of every layer holding it.

    Args:
        layers: the model's selora layers.
        name: the new adapter (injected already, see :func:`combined_adapter`).
        sources: the source adapters.
        weights: one weight each.
        combination_type: ``"cat"`` or ``"linear"``.
    """
    for layer in layers:
        if name in layer.selora_units:
            _fill_layer(layer, name, sources, weights, combination_type)


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    combination_type: str = "cat",
) -> nn.Module:
    """Add the adapter ``name``, a weighted combination of ``adapters`` (PEFT's semantics).

    See the module docstring for ``"cat"`` (exact for the summed update; dense
    factors) and ``"linear"`` (PEFT's factor-wise combination, done exactly on
    the coefficients). The new adapter is added inactive and frozen, as PEFT
    adds it: :func:`~selora.set_adapter` activates it.

    Args:
        model: a model adapted by :func:`selora.inject`.
        adapters: the source adapters.
        weights: one weight each (negative subtracts).
        name: the new adapter's name.
        combination_type: ``"cat"`` (default; PEFT's default ``"svd"`` is not
            supported) or ``"linear"``. With a single adapter it is ``"linear"``.

    Returns:
        ``model``.

    Raises:
        ValueError: for an unknown or taken name, mismatched weights, an
            unsupported combination type, base or pair of adapters (naming it).
    """
    values = _check_weights(adapters, weights)
    kind = _check_type(combination_type, len(adapters))
    specs = [adapter_config(model, n) for n in adapters]
    check_sources(specs, list(adapters), kind)
    layers = list(adapter_layers(model))
    names = check_layers(layers, list(adapters), kind)
    with quiet_rank_warning():
        inject(model, combined_adapter(specs, kind, names), name=name)
    try:
        fill_combined((layer for _, layer in layers), name, list(adapters), values, kind)
    except BaseException:
        delete_adapter(model, name)
        raise
    return model
