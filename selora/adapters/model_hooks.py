"""What :func:`selora.inject` hooks onto the model itself: mixed batches and a save guard.

* ``model(x, adapter_names=[...])``: a forward pre-hook takes ``adapter_names``
  out of the call, checks it with PEFT's rules and routes the rows for the
  duration of that call (:mod:`selora.adapters.routing`); a forward hook that
  runs even when the forward raises ends the routing.
* A training forward with gradients forms every spectral factor of the call in
  one batched transform per group (:mod:`selora.adapters.factor_batch`).
* ``model.save_pretrained``: a transformers model adapted in place would write
  the wrapped layers' keys (``...base_layer.weight``, ``...selora_units...``)
  that transformers cannot read back, so it reloads with re-initialised
  weights. It is refused before anything is written, naming what to use.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from selora.adapters.factor_batch import formed_factors, spectra_to_batch
from selora.adapters.routing import check_adapter_names, routed

__all__ = ["attach_model_hooks", "detach_model_hooks"]

_HOOKS_ATTR = "_selora_model_hooks"
_GUARD_ATTR = "save_pretrained"


class _Routing:
    """The pre- and post-forward hooks; tokens are kept per thread (calls may nest)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copied model starts with no call in progress

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.local = threading.local()

    def _stack(self) -> list[Any]:
        stack: list[Any] | None = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    def before(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        names = kwargs.pop("adapter_names", None)
        call = contextlib.ExitStack()
        try:
            if names is not None:
                from selora.adapters.model import adapter_layers

                known = list(model.__dict__.get("selora_adapters", {}))
                merged = any(layer.merged for _, layer in adapter_layers(model))
                checked = check_adapter_names(names, known, training=model.training, merged=merged)
                call.enter_context(routed(checked))
            elif model.training and torch.is_grad_enabled():
                call.enter_context(formed_factors(spectra_to_batch(model)))
        except BaseException:
            call.close()
            raise
        self._stack().append(call)
        return args, kwargs

    def after(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self._stack()
        if stack:
            stack.pop().close()


class _SaveGuard:
    """Stands in for ``model.save_pretrained`` while selora adapts the model in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model_name = type(model).__name__

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{self.model_name}.save_pretrained is refused while selora adapts the model in "
            "place: it would write the wrapped layers' keys (...base_layer.weight, "
            "...selora_units...), which transformers loads back with re-initialised weights. "
            "Save the adapter with selora.save_adapter(model, directory) (and the base model "
            "as usual), or call selora.unload(model) first to get a plain, merged model that "
            "save_pretrained writes correctly. Nothing was written."
        )


def attach_model_hooks(model: nn.Module) -> None:
    """Add the mixed-batch hooks and, on a transformers model, the save guard.

    Args:
        model: the model :func:`selora.inject` adapts (its first adapter).
    """
    if _HOOKS_ATTR in model.__dict__:
        return
    routing = _Routing()
    handles: list[RemovableHandle] = [
        model.register_forward_pre_hook(routing.before, with_kwargs=True),
        model.register_forward_hook(routing.after, always_call=True),
    ]
    model.__dict__[_HOOKS_ATTR] = handles
    if callable(getattr(type(model), _GUARD_ATTR, None)):
        model.__dict__[_GUARD_ATTR] = _SaveGuard(model)


def detach_model_hooks(model: nn.Module) -> None:
    """Remove what :func:`attach_model_hooks` added (on unload).

    Args:
        model: the model.
    """
    for handle in model.__dict__.pop(_HOOKS_ATTR, []):
        handle.remove()
    if isinstance(model.__dict__.get(_GUARD_ATTR), _SaveGuard):
        del model.__dict__[_GUARD_ATTR]
