"""Adapting a whole model: named adapters, inject, set, delete, merge, unmerge, unload.

A model adapted by :func:`inject` keeps its adapters by name in
``model.selora_adapters`` (name -> :class:`~selora.SpectralAdapter`, in the
order they were added), and every targeted layer is one
:class:`~selora.SpectralLayer` holding one unit per adapter that targets it.
The semantics are PEFT's: the first adapter is active, an adapter added later
is inactive (and frozen) until :func:`set_adapter` makes it active, several
can be active at once (their updates add), and ``model(x, adapter_names=...)``
routes each row of a batch to its own adapter.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence

from torch import nn

from selora.adapters.config import SpectralAdapter
from selora.adapters.diagnostics import (
    check_finite,
    parameter_summary,
    print_trainable_parameters,
    set_finite_checks,
    trainable_parameters,
)
from selora.adapters.layer import SpectralLayer
from selora.adapters.layer_types import (
    is_adaptable_layer,
    is_supported_layer,
    is_unsupported_quantized_layer,
    quantized_layer_error,
)
from selora.adapters.model_hooks import attach_model_hooks, detach_model_hooks
from selora.adapters.patterns import (
    in_modules_to_save,
    layer_selected,
    saved_modules,
    warn_unmatched_patterns,
)
from selora.adapters.routing import BASE_NAME
from selora.adapters.unit import AdapterUnit

__all__ = [
    "active_adapters",
    "adapter_config",
    "adapter_layers",
    "check_finite",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "merge",
    "parameter_summary",
    "print_trainable_parameters",
    "set_adapter",
    "set_finite_checks",
    "trainable_parameters",
    "unload",
    "unmerge",
]

ADAPTERS_ATTR = "selora_adapters"
_ACTIVE_ATTR = "selora_active_adapters"


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
    if isinstance(head, SpectralLayer):
        head = head.base_layer
    found = set()
    for name, module in model.named_modules():
        if head is not None and module is head:
            found.add(name.removesuffix(".base_layer"))
    return found


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield the model's modules by name, a SpectralLayer standing for its base layer."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, SpectralLayer):
            inside.append(name + ".")
        yield name, module


def _is_target(name: str, adapter: SpectralAdapter, skip: set[str], module: nn.Module) -> bool:
    # PEFT's check_target_module_exists: a modules_to_save module (or one inside it) is
    # never adapted; layers_to_transform filters suffix matches, not exact full names.
    targets = adapter.target_modules
    if (
        name in skip
        or _name_matches(name, adapter.exclude_modules)
        or in_modules_to_save(name, adapter.modules_to_save)
    ):
        return False
    if targets == "all-linear":  # linear layers only (not embeddings, convolutions), as PEFT
        base = module.get_base_layer() if isinstance(module, SpectralLayer) else module
        return is_supported_layer(base)
    if isinstance(targets, str) or name in targets:
        return _name_matches(name, targets)
    return _name_matches(name, targets) and layer_selected(
        name, adapter.layers_to_transform, adapter.layers_pattern
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _registry(model: nn.Module) -> dict[str, SpectralAdapter]:
    adapters = model.__dict__.get(ADAPTERS_ATTR)
    return adapters if isinstance(adapters, dict) else {}


def _check_name(name: str, model: nn.Module) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_NAME:
        raise ValueError(
            f"an adapter name must be a non-empty string without '.', and not {BASE_NAME!r}; "
            f"got {name!r}"
        )
    if name in _registry(model):
        raise ValueError(
            f"{type(model).__name__} already holds an adapter named {name!r}; "
            "pick another name or delete_adapter() it first"
        )


def _matched(model: nn.Module, adapter: SpectralAdapter) -> list[tuple[str, nn.Module]]:
    skip = _output_embedding_names(model) if adapter.target_modules == "all-linear" else set()
    matched = [(n, m) for n, m in _candidates(model) if _is_target(n, adapter, skip, m)]
    if not matched:
        seen = [n for n, m in _candidates(model) if is_supported_layer(m)]
        shown = ", ".join(seen[:40]) + (f", ... ({len(seen)} in all)" if len(seen) > 40 else "")
        raise ValueError(
            f"target_modules={adapter.target_modules!r} matches no module of "
            f"{type(model).__name__}; its linear layers are: {shown or 'none'}"
        )
    if adapter.exclude_modules and not any(
        _name_matches(n, adapter.exclude_modules) for n, _ in _candidates(model)
    ):
        # PEFT warns here too: a misspelt exclusion would otherwise adapt silently.
        warnings.warn(
            f"exclude_modules={adapter.exclude_modules!r} matches no module of "
            f"{type(model).__name__}, so nothing was excluded",
            UserWarning,
            stacklevel=3,
        )
    warn_unmatched_patterns(adapter, [n for n, _ in matched])
    for name, module in matched:
        if isinstance(module, SpectralLayer):
            continue
        if is_unsupported_quantized_layer(module):
            raise quantized_layer_error(module, name)
        if not is_adaptable_layer(module):
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}; selora adapts nn.Linear, "
                "transformers' Conv1D, nn.Embedding, nn.Conv1d and nn.Conv2d (narrow "
                "target_modules)"
            )
    return matched


def _build(
    matched: list[tuple[str, nn.Module]], adapter: SpectralAdapter, name: str
) -> list[tuple[str, nn.Module, AdapterUnit | None]]:
    """Build every new wrapper or unit before the model is touched (errors name the module)."""
    built: list[tuple[str, nn.Module, AdapterUnit | None]] = []
    for module_name, module in matched:
        try:
            if isinstance(module, SpectralLayer):
                built.append((module_name, module, module.make_unit(name, adapter)))
            else:
                layer = SpectralLayer(module, adapter, name=module_name, adapter_name=name)
                built.append((module_name, layer, None))
        except ValueError as exc:
            weight = getattr(module, "weight", None)
            shape = f" (weight {tuple(weight.shape)})" if weight is not None else ""
            raise ValueError(
                f"cannot adapt {module_name!r}{shape}: {exc} "
                f"(factors: A is r x d_in, B is d_out x r with r={adapter.r})"
            ) from exc
    return built


def inject(model: nn.Module, adapter: SpectralAdapter, name: str = "default") -> nn.Module:
    r"""Add the adapter ``name`` to every targeted layer of ``model``, in place.

    The first call freezes every parameter of the model, replaces each
    targeted ``nn.Linear`` / ``Conv1D`` by a :class:`~selora.SpectralLayer`
    and makes the adapter active and trainable, with the modules named in
    ``adapter.modules_to_save``. A later call with another ``name`` adds a
    second adapter to the layers it targets (wrapping new ones if needed),
    inactive and frozen until :func:`set_adapter` (PEFT's ``add_adapter``).
    Every wrapper and unit is built before the model is touched, so a failure
    leaves the model as it was.

    Args:
        model: any PyTorch model, Hugging Face models included.
        adapter: the adapter description.
        name: the adapter's name (non-empty, no ``"."``, not ``"__base__"``).

    Returns:
        ``model`` itself, adapted.

    Raises:
        ValueError: if the name is taken or invalid; if no module matches the
            targets (the message lists the candidate layers seen); if a
            ``modules_to_save`` name matches nothing; if a target cannot be
            adapted (a budget larger than a factor, an odd size for a wavelet
            basis: the message names the module).
        TypeError: if a matched module is of an unsupported type, or quantized in
            a form selora does not adapt (the message names the module and its type).

    Warns:
        UserWarning: if ``adapter.exclude_modules`` matches no module of the
            model (as PEFT warns); if ``adapter.r`` exceeds
            :math:`\min(d_{in}, d_{out})` of a layer.
    """
    _check_name(name, model)
    registry = _registry(model)
    if not registry and any(isinstance(m, SpectralLayer) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} holds selora layers but no adapter registry (adapted by "
            "the PEFT bridge?); use that front door, or unload() first"
        )
    matched = _matched(model, adapter)
    saved = saved_modules(list(_candidates(model)), adapter, type(model).__name__)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        built = _build(matched, adapter, name)
    except BaseException:
        for p, flag in flags:  # a wrapper built before the failure froze its base layer
            p.requires_grad_(flag)
        raise
    first = not registry
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    for module_name, module, unit in built:
        if unit is not None:
            assert isinstance(module, SpectralLayer)
            module.add_adapter(name, adapter, unit)
            module.set_adapter(module.active_adapters)  # the new one stays frozen
        else:
            # A wrapper starts in train mode; it must follow the model's mode (dropout).
            module.train(model.training)
            if isinstance(module, SpectralLayer) and not first:
                module.set_adapter([])  # added, not active: PEFT's add_adapter
            _set_submodule(model, module_name, module)
    if first:
        for module in saved:
            for p in module.parameters():
                p.requires_grad_(True)
    model.__dict__[ADAPTERS_ATTR] = {**registry, name: adapter}
    if first:
        model.__dict__[_ACTIVE_ATTR] = [name]
        attach_model_hooks(model)
    return model


def adapter_config(model: nn.Module, name: str = "default") -> SpectralAdapter:
    """Return the adapter ``name`` that :func:`inject` put on ``model``.

    Args:
        model: an adapted model.
        name: the adapter's name.

    Returns:
        The adapter description.

    Raises:
        ValueError: if the model holds no such adapter (naming the ones it holds).
    """
    registry = _registry(model)
    if name not in registry:
        held = f"it holds {list(registry)}" if registry else "call inject first"
        raise ValueError(f"{type(model).__name__} holds no selora adapter {name!r} ({held})")
    return registry[name]


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


def active_adapters(model: nn.Module) -> list[str]:
    """Return the active adapters of ``model``, in order.

    Args:
        model: an adapted model.

    Returns:
        Their names.
    """
    active = model.__dict__.get(_ACTIVE_ATTR)
    return list(active) if isinstance(active, list) else []


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapters of ``model``; only they are trainable.

    Args:
        model: an adapted model.
        names: an adapter name, or several (their updates add).

    Returns:
        ``model``.

    Raises:
        ValueError: for a name the model does not hold.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        adapter_config(model, name)
    for _, layer in adapter_layers(model):
        layer.set_adapter([n for n in wanted if n in layer.selora_units])
    model.__dict__[_ACTIVE_ATTR] = wanted
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter ``name`` from ``model``; with the last one, the plain layers return.

    Args:
        model: an adapted model.
        name: an adapter of the model.

    Returns:
        ``model``.

    Raises:
        ValueError: for a name the model does not hold.
        RuntimeError: if the adapter is merged on some layer (unmerge first);
            nothing is deleted.
    """
    adapter_config(model, name)
    layers = list(adapter_layers(model))
    for layer_name, layer in layers:
        if name in layer.merged_adapters:
            raise RuntimeError(f"{layer_name}: adapter {name!r} is merged; unmerge() it first")
    registry = dict(_registry(model))
    del registry[name]
    if not registry:
        return unload(model, merge_weights=False)
    for _, layer in layers:
        if name in layer.selora_units:
            del layer.selora_units[name]
    model.__dict__[ADAPTERS_ATTR] = registry
    active = [n for n in active_adapters(model) if n != name] or [next(iter(registry))]
    return set_adapter(model, active)


def merge(model: nn.Module, names: Sequence[str] | None = None, *, safe: bool = False) -> nn.Module:
    r"""Fold adapters into their frozen weights; inference then costs what the base model costs.

    Merging writes :math:`W = W_0 + \sum_i (W_0 \odot S_i + C_i)` (LoRA:
    :math:`W_0 + \Delta W`; DoRA and HiRA likewise, see
    :meth:`~selora.AdaptationBase.update`) in the weight's dtype, the same sum
    the unmerged forward computes, so outputs agree. :func:`unmerge` gives back
    :math:`W_0` up to float rounding, about :math:`\epsilon \max|W|` per entry;
    the adapter may even change while merged. It cannot restore a weight once
    a NaN or inf update was merged, nor one that an update much larger than
    :math:`W_0` rounded away: ``safe=True`` refuses such merges up front.

    Args:
        model: an adapted model.
        names: the adapters to merge; the active ones if ``None``.
        safe: check every layer before writing any: every adapter tensor is
            finite, every merged weight is finite in its dtype, and unmerging
            would restore :math:`W_0` to within :math:`\sqrt{\epsilon}\,\max|W_0|`
            (:meth:`~selora.SpectralLayer.merged_weight`). On failure nothing
            changes. It costs a second dense computation per layer.

    Returns:
        ``model``.

    Raises:
        ValueError: for a name the model does not hold; with ``safe``, if a
            check fails, naming the layer (and the tensor, for a non-finite one).
        RuntimeError: if a base of adaptation cannot be merged (registered with
            ``mergeable=False``); with ``safe``, before anything is written.
    """
    wanted = active_adapters(model) if names is None else list(names)
    for name in wanted:
        adapter_config(model, name)
    layers = [layer for _, layer in adapter_layers(model)]
    if safe:
        for layer in layers:
            layer.check_merge(wanted)
    for layer in layers:
        layer.merge(adapter_names=wanted)
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
    """Put plain layers back, with the active adapters merged into them (or dropped).

    Args:
        model: an adapted model.
        merge_weights: merge the active adapters first (``False`` restores the
            base model). An active adapter whose base of adaptation was
            registered with ``mergeable=False`` is not merged: its layers are
            put back without it (with a warning).

    Returns:
        ``model`` with no selora module left in it.

    Warns:
        UserWarning: with ``merge_weights``, naming the active adapters that
            cannot be merged and were dropped.
    """
    dropped: set[str] = set()
    for name, layer in list(adapter_layers(model)):
        layer.unmerge()
        if merge_weights:
            active = [n for n in layer.active_adapters if n in layer.selora_units]
            mergeable = [n for n in active if layer.unit(n).base.mergeable]
            dropped.update(set(active) - set(mergeable))
            if mergeable:
                layer.merge(adapter_names=mergeable)
        _set_submodule(model, name, layer.base_layer)
    if dropped:
        warnings.warn(
            f"unload: adapters {sorted(dropped)} cannot be merged (their base of adaptation is "
            "registered with mergeable=False); the plain layers were put back without them",
            UserWarning,
            stacklevel=2,
        )
    for attr in (ADAPTERS_ATTR, _ACTIVE_ATTR):
        model.__dict__.pop(attr, None)
    detach_model_hooks(model)
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
    before = [(layer.disabled, list(layer.merged_adapters)) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, before, strict=True):
            layer.disabled = disabled
            if merged:
                layer.merge(adapter_names=merged)
