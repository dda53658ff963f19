r"""X-LoRA's two passes: a no-grad scoring pass, then the call itself with weighted experts.

:func:`attach_classifier` registers, on the model given to :func:`selora.inject`,
a forward pre-hook that runs the scoring pass (no grad, experts off,
``output_hidden_states=True``) and the classifier, and stores each layer's
weights :math:`g(x)` on its :class:`~selora.adapters.xlora_classifier.XLoRALayer`;
a forward hook clears them after the call. During incremental decoding the
scoring pass extends a *shadow* KV cache of its own, so that it sees earlier
tokens as the base model saw them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.xlora_classifier import (
    CLASSIFIER_ATTR,
    XLoRAClassifier,
    XLoRALayer,
    xlora_layers,
)

__all__ = ["attach_classifier", "model_hidden_size"]


def _accepts(function: Any, name: str, *, var_keyword: bool = True) -> bool:
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    return var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@contextlib.contextmanager
def _scoring(layers: list[XLoRALayer]) -> Iterator[None]:
    """Make every X-LoRA layer return its frozen output inside the block."""
    for layer in layers:
        layer.scoring = True
    try:
        yield
    finally:
        for layer in layers:
            layer.scoring = False


def _last_hidden_state(output: Any, model: nn.Module) -> Tensor:
    hidden = getattr(output, "hidden_states", None)
    if hidden is None and isinstance(output, dict):
        hidden = output.get("hidden_states")
    if not hidden:
        raise RuntimeError(
            f"X-LoRA's scoring pass called {type(model).__name__} with "
            f"output_hidden_states=True but got no hidden_states in its {type(output).__name__}"
        )
    last = hidden[-1]
    assert isinstance(last, Tensor)
    return last


_SHADOW_CACHES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_MIRRORED = ("reorder_cache", "crop", "batch_select_indices", "batch_repeat_interleave")


def _copy_cache(cache: Any) -> Any:
    copied = copy.deepcopy(cache)
    for name in (*_MIRRORED, "_selora_mirrored"):  # not the wrappers of the model's cache
        getattr(copied, "__dict__", {}).pop(name, None)
    return copied


def _mirror(cache: Any) -> None:
    """Make ``generate``'s edits of the model's cache (beam reorders, crops) edit its shadow too."""
    state = cache.__dict__
    if state.get("_selora_mirrored"):
        return
    state["_selora_mirrored"] = True
    owner = weakref.ref(cache)
    for name in _MIRRORED:
        method = getattr(cache, name, None)
        if not callable(method):
            continue

        def mirrored(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            out = _method(*args, **kwargs)
            shadow = _SHADOW_CACHES.get(owner())
            if shadow is not None:
                getattr(shadow, _name)(*args, **kwargs)
            return out

        setattr(cache, name, mirrored)


def _scoring_cache(cache: Any) -> Any:
    """Return the KV cache the scoring pass extends in place of the model's ``cache``.

    The scoring pass must see earlier tokens as the base model saw them and
    must not extend the model's own cache. A *shadow* cache, started empty
    with the model's, extended by each scoring pass and edited with it
    (``generate``'s beam reorders and crops are mirrored), does both; it lives
    as long as the model's cache. A cache met with an unknown history (or
    without ``get_seq_length``) is copied instead: correct for the cache, an
    approximation for the scoring (its earlier entries come from the adapted model).
    """
    length = getattr(cache, "get_seq_length", None)
    if not callable(length) or not hasattr(cache, "__dict__"):
        return copy.deepcopy(cache)
    try:
        shadow = _SHADOW_CACHES.get(cache)
    except TypeError:  # not weakly referable
        return copy.deepcopy(cache)
    if length() != 0 and (shadow is None or shadow.get_seq_length() != length()):
        return _copy_cache(cache)
    if length() == 0:
        shadow = _copy_cache(cache)
        _SHADOW_CACHES[cache] = shadow
        _mirror(cache)
    return shadow


def _pre_forward(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook: the no-grad scoring pass, then the classifier; sets each layer's weights.

    Args:
        model: the adapted model (the hook is registered on it).
        args: the positional arguments of the call.
        kwargs: its keyword arguments (``labels`` and all).

    Returns:
        ``None``: the call itself then runs unchanged, as the second pass.
    """
    classifier = getattr(model, CLASSIFIER_ATTR, None)
    layers = xlora_layers(model)
    if not isinstance(classifier, XLoRAClassifier) or any(layer.scoring for layer in layers):
        return None
    if all(layer.disabled or layer.merged for layer in layers):
        return None  # the base model: nothing to weight
    scoring = dict(kwargs)
    scoring.pop("labels", None)
    scoring["output_hidden_states"] = True
    forward = model.forward
    if _accepts(forward, "return_dict"):
        scoring["return_dict"] = True
    if _accepts(forward, "logits_to_keep", var_keyword=False):
        scoring["logits_to_keep"] = 1
    if scoring.get("past_key_values") is not None:
        scoring["past_key_values"] = _scoring_cache(scoring["past_key_values"])
    elif _accepts(forward, "use_cache", var_keyword=False):
        scoring["use_cache"] = False  # build no cache that nobody reads
    with torch.no_grad(), _scoring(layers):
        output = forward(*args, **scoring)
    weights = classifier(_last_hidden_state(output, model))
    for layer in layers:
        layer.expert_weights = (
            weights[..., layer.layer_index, :] if classifier.layerwise else weights
        )
    return None


def _post_forward(model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook: drop the weights (kept under gradient checkpointing, which re-runs layers)."""
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return
    for layer in xlora_layers(model):
        layer.expert_weights = None


def _detach(model: nn.Module) -> None:
    """The model's ``selora_unload`` hook: remove the hooks, the classifier and itself.

    :func:`selora.unload` calls it while iterating ``model.modules()``, right
    after yielding ``model`` itself and before its children, so the
    classifier can still be removed from ``model``.
    """
    classifier = model._modules.pop(CLASSIFIER_ATTR, None)
    if isinstance(classifier, XLoRAClassifier):
        for handle in classifier.hook_handles:
            handle.remove()
        classifier.hook_handles = []
    vars(model).pop("selora_unload", None)


def attach_classifier(model: nn.Module, classifier: XLoRAClassifier) -> None:
    """Add ``classifier`` to ``model`` and hook the two passes onto its forward.

    Registers ``model.selora_xlora_classifier``, a forward pre-hook (the
    scoring pass and the classifier), a forward hook (clears the weights,
    also when the forward raises) and ``model.selora_unload``, which
    :func:`selora.unload` calls to remove all three.

    Args:
        model: the adapted model.
        classifier: the classifier; its ``n_layers`` must match the model's X-LoRA layers.
    """
    model.add_module(CLASSIFIER_ATTR, classifier)
    classifier.hook_handles = [
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        model.register_forward_hook(_post_forward, always_call=True),
    ]
    setattr(model, "selora_unload", functools.partial(_detach, model))  # noqa: B010


def model_hidden_size(model: nn.Module, override: int | None) -> int:
    """Return the hidden size the classifier reads, or raise saying what X-LoRA needs.

    Args:
        model: the model given to :func:`selora.inject`.
        override: the ``hidden_size`` option.

    Returns:
        ``override``, else ``model.config.hidden_size``.

    Raises:
        TypeError: if the model has no hidden size or its forward takes no
            ``output_hidden_states``.
    """
    hidden = override or getattr(getattr(model, "config", None), "hidden_size", None)
    need = (
        "X-LoRA needs a Hugging Face transformers model (a causal LM or an encoder): its "
        "classifier reads the last hidden states of a first pass, so the model must have "
        "config.hidden_size (or give base_options hidden_size) and a forward taking "
        "output_hidden_states=True that returns .hidden_states"
    )
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise TypeError(f"{need}; {type(model).__name__} has no config.hidden_size")
    if not _accepts(model.forward, "output_hidden_states"):
        raise TypeError(f"{need}; {type(model).__name__}.forward takes no output_hidden_states")
    return hidden
