r"""X-LoRA's two passes: a no-grad scoring pass, then the call itself with weighted experts.

:func:`attach_classifier` registers, on the model given to :func:`selora.inject`,
a forward pre-hook that runs the scoring pass (no grad, experts off,
``output_hidden_states=True``) and the classifier, and stores each layer's
weights :math:`g(x)` on its :class:`~selora.adapters.xlora_classifier.XLoRALayer`;
a forward hook clears them after the call. During incremental decoding the
scoring pass extends a KV history of its own, kept in the model's cache object
(see :func:`_scoring_cache`), so that it sees earlier tokens as the base model
saw them. Only public transformers API is used: the cache keyword of the
forward, the :class:`transformers.Cache` object and its ``layers`` list.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
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


#: The forward keywords that carry the KV cache, newest first. transformers 5.24
#: renamed ``past_key_values`` to ``cache`` (``generate`` passes ``cache=``).
CACHE_KEYWORDS = ("cache", "past_key_values")


def _cache_keyword(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Return the keyword under which this call passes a KV cache, or ``None``.

    Raises:
        TypeError: if the call passes the cache positionally or under both names,
            where the scoring pass cannot give it a cache of its own.
    """
    given = [name for name in CACHE_KEYWORDS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError(f"X-LoRA: the call passes a KV cache under both {given}; pass one")
    if not given and args:
        try:
            bound = inspect.signature(forward).bind_partial(*args).arguments
        except (TypeError, ValueError):
            bound = {}
        if any(bound.get(name) is not None for name in CACHE_KEYWORDS):
            raise TypeError(
                "X-LoRA: pass the KV cache by keyword (cache= or past_key_values=), not "
                "positionally, so that the scoring pass can use a cache of its own"
            )
    return given[0] if given else None


def _unsupported_cache(cache: Any, why: str) -> TypeError:
    return TypeError(
        f"X-LoRA cannot run its scoring pass with this KV cache ({type(cache).__name__}): {why}. "
        "Call the model (or generate) with use_cache=False instead"
    )


#: The attribute, set on a cache X-LoRA extended, that gives the index in
#: ``cache.layers`` where the scoring pass' layers start (it survives ``deepcopy``).
SCORING_START_ATTR = "selora_xlora_scoring_start"


def _scoring_cache(cache: Any) -> tuple[Any, bool]:
    """Return the KV cache that the scoring pass extends in place of the model's ``cache``.

    The scoring pass must see earlier tokens as the base model saw them and
    must not extend the model's own cache. Its keys and values live in the
    model's cache object itself, as extra entries of the public list
    ``cache.layers``: the model's own layers first, the scoring pass' copies
    after them (from index ``cache.selora_xlora_scoring_start``). Every edit
    that ``generate`` makes through the public :class:`transformers.Cache`
    methods (``reorder_cache`` for beams, ``crop``, ``batch_select_indices``,
    ``batch_repeat_interleave``) walks the whole list, so it edits both
    histories alike. The scoring pass runs on a shallow copy of the cache
    whose ``layers`` is the scoring part of that list.

    A cache with history (sequence length > 0) must have been started by an
    X-LoRA call on an empty cache; any other is refused, never approximated.

    Returns:
        The cache for the scoring pass, and whether it is new: then
        :func:`_keep_scoring_history` must append its layers after the pass.

    Raises:
        TypeError: for a cache that is not a :class:`transformers.Cache` with a
            ``layers`` list, or whose history did not come from X-LoRA.
    """
    from transformers import Cache, EncoderDecoderCache  # optional dependency, imported late

    if not isinstance(cache, Cache) or isinstance(cache, EncoderDecoderCache):
        raise _unsupported_cache(cache, "it is not a decoder transformers.Cache with a layers list")
    layers = cache.layers
    if not isinstance(layers, list):
        raise _unsupported_cache(cache, "its layers are not a list")
    start = getattr(cache, SCORING_START_ATTR, None)
    view = copy.copy(cache)
    if cache.get_seq_length() == 0:  # a new history: drop an old scoring part, start afresh
        if start is not None:
            del layers[start:]
            delattr(cache, SCORING_START_ATTR)
        view.layers = [copy.deepcopy(layer) for layer in layers]
        return view, True
    if start is None or 2 * start != len(layers):
        raise _unsupported_cache(
            cache,
            f"it holds {cache.get_seq_length()} earlier tokens but not the scoring pass' own "
            "keys and values for them (start from an empty cache: X-LoRA keeps them beside the "
            "model's in the same cache object)",
        )
    view.layers = layers[start:]
    if view.get_seq_length() != cache.get_seq_length():
        raise _unsupported_cache(
            cache,
            f"its scoring history holds {view.get_seq_length()} tokens and the model's "
            f"{cache.get_seq_length()}: something edited one without the other",
        )
    return view, False


def _keep_scoring_history(cache: Any, view: Any) -> None:
    """After the first scoring pass, append its layers to the model's cache (see above)."""
    n_model = len(view.layers)
    if len(cache.layers) < n_model and cache.layer_class_to_replicate is not None:
        cache.layers.extend(
            cache.layer_class_to_replicate() for _ in range(n_model - len(cache.layers))
        )
    if len(cache.layers) != n_model:
        raise _unsupported_cache(
            cache, f"it has {len(cache.layers)} layers where the model filled {n_model}"
        )
    cache.layers.extend(view.layers)
    setattr(cache, SCORING_START_ATTR, n_model)


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
    keyword = _cache_keyword(forward, args, kwargs)
    if keyword is not None:
        view, fresh = _scoring_cache(kwargs[keyword])
        scoring[keyword] = view
    elif _accepts(forward, "use_cache", var_keyword=False):
        scoring["use_cache"] = False  # build no cache that nobody reads
    with torch.no_grad(), _scoring(layers):
        output = forward(*args, **scoring)
    if keyword is not None and fresh:
        _keep_scoring_history(kwargs[keyword], view)
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
