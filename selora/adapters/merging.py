r"""Merging several adapters into one frozen weight, and undoing it exactly.

Every base of adaptation gives an affine merge update :math:`(S, C)`
(:meth:`~selora.AdaptationBase.update`); the adapters :math:`i` of a layer merge
as :math:`W = W_0 + \sum_i (W_0 \odot S_i + C_i)`, the sum its forward computes,
and unmerge as :math:`W_0 = (W - \sum_i C_i) / (1 + \sum_i S_i)` with the updates
recorded at the merge (:meth:`~selora.adapters.unit.AdapterUnit.merged_update`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from selora.adapters.layer_types import compute_dtype
from selora.adapters.quantized import read_weight
from selora.adapters.registry import Update

if TYPE_CHECKING:
    from selora.adapters.layer import SpectralLayer

__all__ = [
    "UNITS_ATTR",
    "check_round_trip",
    "current_weight0",
    "layer_merged_weight",
    "refuse_load_while_merged",
]

UNITS_ATTR = "selora_units"
"""A layer's per-adapter ``nn.ModuleDict``: keys ``<layer>.selora_units.<adapter>.<tensor>``."""


def refuse_load_while_merged(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """``load_state_dict`` pre-hook: refuse the tensors of a merged adapter."""
    merged = getattr(module, "merged_adapters", None) or []
    prefixes = tuple(f"{prefix}{UNITS_ATTR}.{name}." for name in merged)
    keys = [k for k in state_dict if prefixes and k.startswith(prefixes)]
    if keys:
        name = getattr(module, "name", "") or prefix.rstrip(".") or "this layer"
        raise RuntimeError(
            f"{name}: cannot load {keys[0]!r} while its adapter is merged into the frozen "
            "weight (the merged weight would keep the old update); unmerge first, load, "
            "then merge again"
        )


def _sum_updates(updates: Sequence[Update]) -> Update:
    scale: Tensor | None = None
    shift: Tensor | None = None
    for s, c in updates:
        if s is not None:
            scale = s if scale is None else scale + s
        if c is not None:
            shift = c if shift is None else shift + c
    return scale, shift


def _apply(weight0: Tensor, update: Update) -> Tensor:
    r"""Return :math:`W_0 \odot S + C` (zero if both are ``None``)."""
    scale, shift = update
    out = torch.zeros_like(weight0) if shift is None else shift.to(weight0.dtype)
    return out if scale is None else out + weight0 * scale.to(weight0.dtype)


def _invert(weight: Tensor, update: Update, where: str) -> Tensor:
    r"""Return :math:`W_0 = (W - C) / (1 + S)` (see :meth:`~selora.AdaptationBase.update`)."""
    scale, shift = update
    rest = weight if shift is None else weight - shift.to(weight.dtype)
    if scale is None:
        return rest
    denominator = 1 + scale.to(weight.dtype)
    zero = denominator == 0
    if bool(zero.any()):
        # A per-row scale of -1 maps a whole row to C; with the row of W - C at zero
        # (DoRA's m_i = 0 on an all-zero row of W0) zero is the exact W0. Anywhere else
        # the merge lost W0 for good.
        lost = zero & (rest != 0) if scale.shape[-1] == 1 else zero
        if bool(lost.any()):
            raise RuntimeError(
                f"{where}: cannot unmerge: the merge multiplied {int(lost.sum())} entries of "
                "W0 by 1 + S = 0 (HiRA: 1 + B A has a zero entry), so W0 is lost there"
            )
        denominator = torch.where(zero, torch.ones_like(denominator), denominator)
    return rest / denominator


def current_weight0(layer: SpectralLayer, weight: Tensor) -> Tensor:
    """Return :math:`W_0` in the compute dtype from ``layer``'s stored (maybe merged) weight.

    Args:
        layer: the layer.
        weight: its stored weight, dequantized, ``(d_out, d_in)``.

    Returns:
        :math:`W_0`.

    Raises:
        RuntimeError: if a merge lost :math:`W_0` (see :func:`_invert`).
    """
    stored = weight.to(compute_dtype(weight.dtype))
    if not layer.merged_adapters:
        return stored
    merged = [layer.unit(n).merged_update() for n in layer.merged_adapters]
    return _invert(stored, _sum_updates(merged), layer.name or "this layer")


def layer_merged_weight(layer: SpectralLayer, names: Sequence[str], *, safe: bool) -> Tensor:
    """Return ``layer``'s stored weight with ``names`` merged too (``SpectralLayer.merged_weight``).

    Args:
        layer: the layer.
        names: the adapters to merge (not merged yet).
        safe: run the checks.

    Returns:
        The merged weight, the stored (dequantized) weight's dtype and shape.
    """
    where = layer.name or "this layer"
    names = names
    weight = read_weight(layer.get_base_layer())  # dequantized if quantized
    if safe:
        for name in names:
            bad = layer.unit(name).nonfinite()
            if bad:
                raise ValueError(
                    f"{where}: adapter {name!r} tensor {bad[0]!r} holds NaN or inf; "
                    "nothing was merged"
                )
    weight0 = current_weight0(layer, weight)
    update = _sum_updates([layer.unit(n).update(weight0) for n in names])
    stored = weight.to(weight0.dtype)
    merged = (stored + _apply(weight0, update)).to(weight.dtype)
    if safe:
        every = [layer.unit(n).merged_update() for n in layer.merged_adapters]
        check_round_trip(weight0, merged, _sum_updates([*every, update]), where)
    return merged


def check_round_trip(weight0: Tensor, merged: Tensor, update: Update, where: str) -> None:
    r"""Refuse a merge that is not finite or that unmerging would not undo.

    Args:
        weight0: :math:`W_0` in the compute dtype.
        merged: the merged weight in the stored dtype.
        update: the sum of every merged update, :math:`(\sum S_i, \sum C_i)`.
        where: the layer, for messages.

    Raises:
        ValueError: if the merged weight holds NaN or inf, or the round trip is
            off by more than :math:`\sqrt{\epsilon}\,\max|W_0|`.
    """
    if not bool(torch.isfinite(merged).all()):
        raise ValueError(
            f"{where}: the merged weight holds NaN or inf in {merged.dtype}; nothing was merged"
        )
    try:
        restored = _invert(merged.to(weight0.dtype), update, where)
    except RuntimeError as exc:
        raise ValueError(
            f"{where}: merging could not be undone ({exc}); nothing was merged"
        ) from exc
    restored = restored.to(merged.dtype).to(weight0.dtype)
    eps = torch.finfo(merged.dtype).eps
    scale = float(weight0.abs().max()) if weight0.numel() else 0.0
    error = float((restored - weight0).abs().max()) if weight0.numel() else 0.0
    tolerance = math.sqrt(eps) * scale if scale > 0 else 4 * eps * float(merged.abs().max())
    if not error <= tolerance:  # NaN fails too
        raise ValueError(
            f"{where}: unmerging would not restore the frozen weight (a merge and unmerge "
            f"round trip is off by up to {error:.3g} for entries up to {scale:.3g}, "
            f"tolerance {tolerance:.3g} in {merged.dtype}): the update is too large to "
            "merge reversibly; nothing was merged"
        )
