"""Diagnostics of an adapted model: finite checks and parameter counts."""

from __future__ import annotations

import torch
from torch import nn

from selora.adapters.unit import AdapterUnit

__all__ = [
    "check_finite",
    "parameter_summary",
    "print_trainable_parameters",
    "set_finite_checks",
    "trainable_parameters",
]


def _nonfinite_adapter_tensors(model: nn.Module) -> list[str]:
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterUnit)]
    bad = [
        f"{name}.{local}" if name else local for name, unit in units for local in unit.nonfinite()
    ]
    in_units = {id(p) for _, unit in units for p in unit.parameters()}
    for name, p in model.named_parameters():
        candidate = p.requires_grad and id(p) not in in_units and p.is_floating_point()
        if candidate and not p.is_meta and not bool(torch.isfinite(p).all()):
            bad.append(name)
    return bad


def check_finite(model: nn.Module) -> None:
    """Check every adapter tensor of ``model`` for NaN and inf (PEFT's check at merge).

    Checked: the parameters and floating-point buffers of every adapter unit
    (coefficients, dense factors, DoRA magnitudes), whichever front door put
    them there (:func:`inject`, the PEFT bridge), and every other trainable
    parameter (``modules_to_save``, a model-level wrapper's classifier). Not
    checked: the frozen base weights, activations, gradients and optimizer
    state. :func:`merge` with ``safe=True`` runs the same check. One
    ``isfinite`` pass over each tensor (:math:`O(k)` per factor).

    Args:
        model: an adapted model.

    Raises:
        ValueError: naming the first non-finite tensor (and how many there are).
    """
    bad = _nonfinite_adapter_tensors(model)
    if bad:
        raise ValueError(
            f"{bad[0]} holds NaN or inf ({len(bad)} non-finite adapter tensor(s): {bad[:5]})"
        )


def set_finite_checks(model: nn.Module, enabled: bool = True) -> nn.Module:
    r"""Make every adapted layer raise on NaN or inf in its adapter at each forward (fail fast).

    Off by default, at no cost. On, each adapter unit checks its parameters
    and the factors it forms (:math:`\tilde A`, :math:`\tilde B`) at every
    forward and raises ``ValueError`` naming the layer and the tensor; the
    eval factor cache is bypassed meanwhile. A training run then stops at the
    first forward after a step that made a coefficient non-finite, instead of
    training on silently. Not checked: activations, gradients, optimizer
    state and the frozen weights (``torch.autograd.set_detect_anomaly``
    catches NaN in the backward pass). Each check reads the tensors back
    (a device sync on a GPU).

    Args:
        model: an adapted model.
        enabled: turn the checks on (``True``) or off.

    Returns:
        ``model``.

    Raises:
        ValueError: if ``model`` holds no adapter unit.
    """
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterUnit)]
    if not units:
        raise ValueError(f"{type(model).__name__} holds no selora adapter")
    for name, unit in units:
        unit.finite_checks = enabled
        unit.name = unit.name or name
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Count the parameters that will be trained (``requires_grad``), shared ones once.

    Args:
        model: any model.

    Returns:
        The count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_summary(model: nn.Module) -> str:
    """Return PEFT's one-line summary: trainable, all, and the trainable percentage.

    Args:
        model: any model.

    Returns:
        ``"trainable params: T || all params: N || trainable%: P"``.
    """
    trainable = trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    percent = 100.0 * trainable / total if total else 0.0
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`parameter_summary` (as PEFT's ``print_trainable_parameters``).

    Args:
        model: any model.
    """
    print(parameter_summary(model))
