"""Adapting a whole model: inject, merge, unmerge, unload and parameter counts."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from selora.adapters.config import SpectralAdapter
from selora.adapters.layer import AdapterUnit, SpectralLayer
from selora.adapters.layer_types import (
    is_quantized_layer,
    is_supported_layer,
    quantized_layer_error,
)
from selora.adapters.registry import get_adapter_base

__all__ = [
    "adapter_config",
    "adapter_layers",
    "check_finite",
    "disable_adapters",
    "inject",
    "merge",
    "parameter_summary",
    "print_trainable_parameters",
    "set_finite_checks",
    "trainable_parameters",
    "unload",
    "unmerge",
]

_CONFIG_ATTR = "selora_adapter"


def _name_matches(name: str, names: str | Sequence[str]) -> bool:
    # PEFT's rule, so that a config means the same in both: a string is a regex
    # on the full name, a sequence matches a name or a "." + name suffix.
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return any(name == t or name.endswith("." + t) for t in names)


def _output_embedding_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return set()
    head = getter()
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _is_target(name: str, adapter: SpectralAdapter, skip: set[str], module: nn.Module) -> bool:
    targets = adapter.target_modules
    if name in skip or _name_matches(name, adapter.exclude_modules):
        return False
    if targets == "all-linear":
        return is_supported_layer(module)
    return _name_matches(name, targets)


def _restore_grad_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, adapter: SpectralAdapter) -> nn.Module:
    r"""Wrap every targeted layer of ``model`` in place and freeze everything else.

    Every parameter of the model is frozen, each targeted ``nn.Linear`` /
    ``Conv1D`` is replaced by the base's wrapper (a :class:`SpectralLayer`),
    and the modules named in ``adapter.modules_to_save`` are made trainable.
    The adapter is remembered on the model for :func:`selora.save_adapter`.

    Args:
        model: any PyTorch model, Hugging Face models included.
        adapter: the adapter description.

    Returns:
        ``model`` itself, adapted.

    Raises:
        ValueError: if the model already holds a selora adapter, if no module
            matches the targets (the message lists the candidate layers seen),
            a ``modules_to_save`` name matches nothing, or a target cannot be
            adapted (a budget larger than a factor, an odd size for a wavelet
            basis: the message names the module, and the model is left as it was).
        TypeError: if a matched module is of an unsupported type, or quantized
            (bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` and the like, see
            :func:`~selora.adapters.layer.is_quantized_layer`): the message names
            the module and its type.

    Warns:
        UserWarning: if ``adapter.exclude_modules`` matches no module of the
            model (as PEFT warns), since a misspelt exclusion changes nothing;
            if ``adapter.r`` exceeds :math:`\min(d_{in}, d_{out})` of a layer
            (see :class:`~selora.adapters.AdapterUnit`).
    """
    if any(isinstance(m, SpectralLayer) for m in model.modules()) or hasattr(model, _CONFIG_ATTR):
        raise ValueError("this model already holds a selora adapter; unload() it first")
    skip = _output_embedding_names(model) if adapter.target_modules == "all-linear" else set()
    matched = [
        (name, module)
        for name, module in model.named_modules()
        if name and _is_target(name, adapter, skip, module)
    ]
    if not matched:
        seen = [name for name, module in model.named_modules() if is_supported_layer(module)]
        shown = ", ".join(seen[:40]) + (f", ... ({len(seen)} in all)" if len(seen) > 40 else "")
        raise ValueError(
            f"target_modules={adapter.target_modules!r} matches no module of "
            f"{type(model).__name__}; its linear layers are: {shown or 'none'}"
        )
    if adapter.exclude_modules and not any(
        _name_matches(name, adapter.exclude_modules) for name, _ in model.named_modules() if name
    ):
        # PEFT warns here too: a misspelt exclusion would otherwise adapt silently.
        warnings.warn(
            f"exclude_modules={adapter.exclude_modules!r} matches no module of "
            f"{type(model).__name__}, so nothing was excluded",
            UserWarning,
            stacklevel=2,
        )
    for name, module in matched:
        if is_quantized_layer(module):
            raise quantized_layer_error(module, name)
        if not is_supported_layer(module):
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}; selora adapts nn.Linear "
                "and transformers' Conv1D (narrow target_modules)"
            )
    saved = []
    for wanted in adapter.modules_to_save:
        found = [m for name, m in model.named_modules() if name and _name_matches(name, (wanted,))]
        if not found:
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module")
        saved.extend(found)
    base = get_adapter_base(adapter.base)()
    # Build every wrapper before touching the model, so that a target that cannot
    # be adapted (a budget larger than a factor, an odd size for a wavelet) fails
    # naming the module and leaves the model as it was.
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    wrapped = []
    try:
        for name, module in matched:
            wrapped.append((name, base.wrap(name, module, adapter)))
    except ValueError as exc:
        _restore_grad_flags(grad_flags)
        weight = getattr(module, "weight", None)
        shape = f" (weight {tuple(weight.shape)})" if weight is not None else ""
        raise ValueError(
            f"cannot adapt {name!r}{shape}: {exc} "
            f"(factors: A is r x d_in, B is d_out x r with r={adapter.r})"
        ) from exc
    except BaseException:
        _restore_grad_flags(grad_flags)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, wrapper in wrapped:
        # A wrapper starts in train mode; it must follow the model's mode (dropout).
        wrapper.train(model.training)
        _set_submodule(model, name, wrapper)
    for module in saved:
        for p in module.parameters():
            p.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, adapter)
    base.prepare_model(model, adapter)
    return model


def adapter_config(model: nn.Module) -> SpectralAdapter:
    """Return the adapter :func:`inject` put on ``model``.

    Args:
        model: an adapted model.

    Returns:
        The adapter description.

    Raises:
        ValueError: if the model holds no selora adapter.
    """
    adapter = getattr(model, _CONFIG_ATTR, None)
    if not isinstance(adapter, SpectralAdapter):
        raise ValueError(f"{type(model).__name__} holds no selora adapter (call inject first)")
    return adapter


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, SpectralLayer]]:
    """Yield ``(name, layer)`` for every :class:`SpectralLayer` of ``model``.

    Args:
        model: an adapted model.

    Yields:
        The layers in module order.
    """
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            yield name, module


def merge(model: nn.Module, *, safe: bool = False) -> nn.Module:
    r"""Fold every adapter into its frozen weight; inference then costs what the base model costs.

    What :func:`unmerge` can restore. Merging writes :math:`W = W_0 + \Delta W`
    (LoRA; DoRA and HiRA likewise) in the weight's dtype, and unmerging
    computes :math:`W - \Delta W`. That gives back :math:`W_0` up to float
    rounding, about :math:`\epsilon \max|W|` per entry (:math:`\epsilon`:
    the dtype's machine epsilon, so more for bfloat16 than float32); the
    adapter may even change while merged (:func:`unmerge` subtracts the
    update that was merged). It cannot restore a weight once a NaN or inf
    update was merged, nor one that an update much larger than :math:`W_0`
    rounded away (:math:`W_0 + 10^{30} = 10^{30}` in float32): the base
    weight is then lost for good. ``safe=True`` refuses such merges up front.

    Args:
        model: an adapted model.
        safe: check every layer before writing any: every adapter tensor is
            finite (:func:`check_finite`), every merged weight is finite in its
            dtype, and unmerging would restore :math:`W_0` to within
            :math:`\sqrt{\epsilon}\,\max|W_0|`
            (:meth:`~selora.adapters.AdapterUnit.merged`). On failure nothing
            changes. It costs a second dense computation per layer.

    Returns:
        ``model``.

    Raises:
        RuntimeError: if a base of adaptation cannot be merged (X-LoRA); with
            ``safe``, before anything is written.
        ValueError: with ``safe``, if a check fails, naming the layer (and the
            tensor, for a non-finite one); nothing is merged.
    """
    layers = [layer for _, layer in adapter_layers(model)]
    if safe:
        for layer in layers:
            layer.check_merge()
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring each frozen weight (up to float rounding, see :func:`merge`).

    Args:
        model: an adapted model.

    Returns:
        ``model``.
    """
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, *, merge_weights: bool = True) -> nn.Module:
    """Put plain layers back, with the adapters merged into them (or dropped).

    Args:
        model: an adapted model.
        merge_weights: merge each adapter first (``False`` restores the base model).
            Layers that cannot be merged (X-LoRA's) are put back unmerged.

    Returns:
        ``model`` with no selora module left in it.
    """
    for name, layer in list(adapter_layers(model)):
        if merge_weights and getattr(layer, "mergeable", True):  # X-LoRA: never mergeable
            layer.merge()
        else:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    for module in model.modules():
        unload_hook = getattr(module, "selora_unload", None)
        if callable(unload_hook):
            unload_hook()
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block (adapters contribute nothing).

    Merged layers are unmerged for the block (their weight holds the update)
    and merged again on the way out.

    Args:
        model: an adapted model.

    Yields:
        ``model``.
    """
    layers = [layer for _, layer in adapter_layers(model)]
    before = [(layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, before, strict=True):
            layer.disabled = disabled
            if merged:
                layer.merge()


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
    them there (:func:`inject`, the PEFT bridge, X-LoRA's experts), and every
    other trainable parameter (``modules_to_save``, X-LoRA's classifier). Not
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
