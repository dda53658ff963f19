r"""X-LoRA's two passes: a no-grad scoring pass with the adapters off, then the mixed call.

:class:`Passes` hooks them onto the wrapped model (a forward pre-hook and a
forward hook), so that ``model(...)``, ``model.generate(...)`` and the
:class:`~selora.xlora.XLoRAModel` around it all run them:

1. the scoring pass: ``model.forward`` itself (no hooks) under ``torch.no_grad()``
   inside :func:`~selora.adapters.routing.mixed` with no adapter (every layer
   gives :math:`W_0 x + b`), with ``output_hidden_states=True``, ``labels``
   dropped and, where the forward takes them, ``use_cache=False`` and
   ``logits_to_keep=1``;
2. the classifier on the last hidden states gives :math:`g`;
3. the call itself runs inside :func:`~selora.adapters.routing.mixed` with
   :math:`g`: the weights travel with the call (a context variable), never on
   the shared layers, so concurrent calls from several threads are safe.

During incremental decoding the scoring pass extends a KV history of its own,
kept in the model's cache object (see :func:`_scoring_cache`), so that it sees
earlier tokens as the base model saw them: cached generation equals uncached.
Only public transformers API is used: the cache keyword of the forward, the
:class:`transformers.Cache` object and its ``layers`` list.

Cost: the scoring pass stores no activations, so a training step costs about
one extra forward on top of the mixed step.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from selora.adapters.routing import Mixture, current_mixture, current_routing, mixed

__all__ = ["CACHE_KEYWORDS", "SCORING_START_ATTR", "Passes", "model_hidden_size", "scoring_pass"]


def _accepts(function: Any, name: str, *, var_keyword: bool = True) -> bool:
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    return var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


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


def scoring_pass(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """Run the scoring pass (``model.forward``, no hooks, grad or adapters): last hidden states.

    Raises:
        TypeError: for a KV cache the scoring pass cannot extend (see :func:`_scoring_cache`).
    """
    scoring = dict(kwargs)
    scoring.pop("labels", None)
    scoring["output_hidden_states"] = True
    forward = model.forward
    if _accepts(forward, "return_dict"):
        scoring["return_dict"] = True
    if _accepts(forward, "logits_to_keep", var_keyword=False):
        scoring["logits_to_keep"] = 1
    keyword = _cache_keyword(forward, args, kwargs)
    view, fresh = None, False
    if keyword is not None:
        view, fresh = _scoring_cache(kwargs[keyword])
        scoring[keyword] = view
    elif _accepts(forward, "use_cache", var_keyword=False):
        scoring["use_cache"] = False  # build no cache that nobody reads
    with torch.no_grad(), mixed(Mixture()):
        output = forward(*args, **scoring)
    if keyword is not None and fresh:
        _keep_scoring_history(kwargs[keyword], view)
    return _last_hidden_state(output, model)


_KEEPS_MIXTURE = "selora_keeps_mixture"


def _keeping_mixture(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a gradient-checkpointing function so that its recomputation sees the call's mixture.

    Activation checkpointing re-runs a block in the backward pass, after the
    call (and its context variable) ended; the wrapped function captures the
    mixture when the block first runs and sets it again around every run.
    """

    @functools.wraps(checkpoint)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        mixture = current_mixture()

        def body(*a: Any, **k: Any) -> Any:
            with mixed(mixture):
                return function(*a, **k)

        return checkpoint(body, *args, **kwargs)

    setattr(run, _KEEPS_MIXTURE, True)
    return run


class _OpenCalls:
    """The mixtures of the calls in progress, one stack per thread (calls may nest).

    Not copied with the model: a copy starts with no call in progress.
    """

    def __init__(self) -> None:
        self.local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.local = threading.local()

    def stack(self) -> list[AbstractContextManager[None] | None]:
        stack: list[AbstractContextManager[None] | None] | None = getattr(self.local, "s", None)
        if stack is None:
            stack = self.local.s = []
        return stack


class Passes:
    """The forward pre-hook and forward hook that run X-LoRA's two passes on a model.

    Args:
        classifier: the classifier giving the weights from the hidden states.
        names: the experts' adapter names, in the classifier's order.
        layers: each layer holding an expert -> its index (for per-layer weights).
        layerwise: whether the classifier gives one set of weights per layer.
    """

    def __init__(
        self,
        classifier: nn.Module,
        names: tuple[str, ...],
        layers: Mapping[nn.Module, int],
        *,
        layerwise: bool,
    ) -> None:
        self.classifier = classifier
        self.names = names
        self.layers = dict(layers)
        self.layerwise = layerwise
        self.calls = _OpenCalls()
        self.handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        """Register the two hooks on ``model``."""
        self.handles = [
            model.register_forward_pre_hook(self.before, with_kwargs=True),
            model.register_forward_hook(self.after, always_call=True),
        ]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def weights(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """Run the scoring pass and the classifier on a call's arguments: :math:`g`."""
        weights: Tensor = self.classifier(scoring_pass(model, args, kwargs))
        return weights

    def _keep_mixture_in_checkpoints(self, model: nn.Module) -> None:
        for module in model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if callable(func) and not getattr(func, _KEEPS_MIXTURE, False):
                setattr(module, "_gradient_checkpointing_func", _keeping_mixture(func))  # noqa: B010

    def before(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook: scoring pass, classifier, then open the call's mixture.

        Raises:
            ValueError: for ``adapter_names`` (X-LoRA mixes its experts itself).
        """
        stack = self.calls.stack()
        stack.append(None)  # the forward hook pops it even if this hook raises
        if kwargs.get("adapter_names") is not None or current_routing() is not None:
            raise ValueError(
                "X-LoRA mixes its experts per token itself; adapter_names is not supported"
            )
        if current_mixture() is not None:
            return None  # inside an outer mixture (a recomputation): keep it
        if all(getattr(layer, "disabled", False) for layer in self.layers):
            return None  # selora.disable_adapters: the base model
        if torch.is_grad_enabled():
            self._keep_mixture_in_checkpoints(model)
        weights = self.weights(model, args, kwargs)
        block = mixed(Mixture(self.names, weights, self.layers if self.layerwise else None))
        block.__enter__()
        stack[-1] = block
        return None

    def after(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook (also when the forward raises): close the call's mixture."""
        stack = self.calls.stack()
        block = stack.pop() if stack else None
        if block is not None:
            block.__exit__(None, None, None)


def model_hidden_size(model: nn.Module, override: int | None) -> int:
    """Return ``override``, else ``model.config.hidden_size``: what the classifier reads.

    Raises:
        TypeError: if the model has no hidden size or its forward takes no
            ``output_hidden_states``.
    """
    hidden = override or getattr(getattr(model, "config", None), "hidden_size", None)
    need = (
        "X-LoRA needs a Hugging Face transformers model (a causal LM or an encoder): its "
        "classifier reads the last hidden states of a first pass, so the model must have "
        "config.hidden_size (or give XLoRAConfig.hidden_size) and a forward taking "
        "output_hidden_states=True that returns .hidden_states"
    )
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise TypeError(f"{need}; {type(model).__name__} has no config.hidden_size")
    if not _accepts(model.forward, "output_hidden_states"):
        raise TypeError(f"{need}; {type(model).__name__}.forward takes no output_hidden_states")
    return hidden
