r"""X-LoRA as a wrapper of the whole model: :class:`XLoRAModel` (the formula: :mod:`selora.xlora`).

With one-hot weights the model is the chosen expert alone; with one expert and
:math:`g = 1`, that adapter.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.io import load_adapter
from selora.adapters.layer import SpectralLayer
from selora.adapters.model import active_adapters, adapter_layers, set_adapter
from selora.xlora.classifier import CLASSIFIER_ATTR, XLoRAClassifier
from selora.xlora.config import XLoRAConfig
from selora.xlora.passes import Passes, model_hidden_size

__all__ = ["XLoRAModel", "wrap"]

MERGE_ERROR = (
    "X-LoRA cannot be merged: its update sum_i g_i(x) (f_i(x) - W0 x - b) depends on each "
    "token through the classifier's weights g(x), so no fixed matrix can replace W0. Merge "
    "an expert alone (unwrap() first), or keep the model unmerged"
)


def _expert_layers(model: nn.Module, names: tuple[str, ...]) -> list[SpectralLayer]:
    """The layers holding at least one expert, in module order; every expert must be somewhere."""
    layers = [layer for _, layer in adapter_layers(model)]
    held = {n for layer in layers for n in layer.selora_units}
    missing = [n for n in names if n not in held]
    if missing:
        raise ValueError(
            f"{type(model).__name__} holds no adapter {missing} (it holds {sorted(held)}); add "
            "the experts with selora.inject(model, adapter, name=...) or "
            "selora.load_adapter(model, path, name=...), or give XLoRAConfig.experts as a "
            "mapping name -> checkpoint directory"
        )
    merged = [layer.name for layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(f"{merged[0]}: {MERGE_ERROR} (its adapters are merged; unmerge first)")
    return [layer for layer in layers if any(n in layer.selora_units for n in names)]


class XLoRAModel(nn.Module):
    """A model whose named adapters are mixed per token by a classifier (X-LoRA).

    Wraps ``model`` (a Hugging Face causal LM or encoder holding the experts:
    it needs ``config.hidden_size``, or ``XLoRAConfig.hidden_size``, and a
    forward taking ``output_hidden_states``) the way PEFT's ``XLoraModel``
    wraps a ``LoraModel``. Construction loads the experts named with a
    checkpoint, makes every expert active (trainable unless
    ``freeze_experts``), adds the classifier (``self.selora_xlora_classifier``,
    on the model's device) and hooks the two passes onto ``model``'s forward,
    so that calling this wrapper, ``model`` itself or ``generate`` mixes the
    experts. Unknown attributes are looked up on ``model``.

    Args:
        model: the adapted model.
        config: the X-LoRA configuration.

    Raises:
        ValueError: if an expert is missing, an adapter is merged, or a
            checkpoint does not fit (an ``AdapterCheckpointError``); the model
            is then as it was, except for experts loaded before the failure.
        TypeError: if ``model`` is not a Hugging Face-like model.
    """

    def __init__(self, model: nn.Module, config: XLoRAConfig) -> None:
        super().__init__()
        hidden = model_hidden_size(model, config.hidden_size)
        if any(
            isinstance(getattr(h, "__self__", None), Passes) for h in model._forward_hooks.values()
        ):
            raise ValueError(f"{type(model).__name__} is wrapped by X-LoRA already; unwrap() first")
        for name, path in config.checkpoints.items():
            load_adapter(model, path, name=name)
        names = config.names
        layers = _expert_layers(model, names)
        self.model = model
        self.xlora_config = config
        classifier = XLoRAClassifier(
            hidden,
            len(names),
            len(layers),
            layerwise=config.layerwise,
            temperature=config.temperature,
            top_k=config.top_k,
            renormalize=config.renormalize,
            enable_softmax=config.enable_softmax,
            depth=config.classifier_depth,
            width=config.classifier_width,
        )
        weight = next(iter(model.parameters()), None)
        if weight is not None:
            classifier.to(weight.device)
        self.add_module(CLASSIFIER_ATTR, classifier.train(model.training))
        self._previous_active = active_adapters(model)
        if "selora_adapters" in model.__dict__:
            set_adapter(model, list(names))
        for layer in layers:
            layer.set_adapter([n for n in names if n in layer.selora_units])
            if config.freeze_experts:
                layer.selora_units.requires_grad_(False)
        self.passes = Passes(
            classifier,
            names,
            {layer: i for i, layer in enumerate(layers)},
            layerwise=config.layerwise,
        )
        self.passes.attach(model)
        self.train(model.training)

    # ------------------------------------------------------------------ access

    def __getattr__(self, name: str) -> Any:
        """Look up ``name`` on the wrapped model when this wrapper lacks it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "_modules") or "model" not in self._modules:
                raise
            return getattr(self._modules["model"], name)

    @property
    def classifier(self) -> XLoRAClassifier:
        """The classifier (``self.selora_xlora_classifier``)."""
        classifier = self._modules[CLASSIFIER_ATTR]
        assert isinstance(classifier, XLoRAClassifier)
        return classifier

    @property
    def experts(self) -> tuple[str, ...]:
        """The experts' adapter names, in the classifier's order."""
        return self.xlora_config.names

    @property
    def expert_layers(self) -> list[SpectralLayer]:
        """The layers holding an expert, in the order of the per-layer weights."""
        return [layer for layer in self.passes.layers if isinstance(layer, SpectralLayer)]

    # ------------------------------------------------------------------ calls

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model (its hooks run the scoring pass, classifier, mixed pass)."""
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with the experts mixed at every step (KV cache supported)."""
        generate: Any = getattr(self.model, "generate")  # noqa: B009 - a transformers method
        return generate(*args, **kwargs)

    @torch.no_grad()
    def expert_weights(self, *args: Any, **kwargs: Any) -> Tensor:
        """Return the classifier's weights :math:`g` for a call's arguments.

        Returns:
            ``(batch, seq, K)``, or ``(batch, seq, L, K)`` when layerwise.
        """
        return self.passes.weights(self.model, args, kwargs)

    # ------------------------------------------------------------------ surgery

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """Refuse (``RuntimeError``): per-token weights cannot be folded into :math:`W_0`."""
        raise RuntimeError(MERGE_ERROR)

    merge_and_unload = merge

    def unwrap(self) -> nn.Module:
        """Remove the classifier and the hooks; return the model with its experts as adapters.

        The adapters active before wrapping are active again; the experts'
        ``requires_grad`` flags follow :func:`selora.set_adapter`'s rule.

        Returns:
            The wrapped model (then :func:`selora.unload` gives the plain base model).
        """
        self.passes.detach()
        del self._modules[CLASSIFIER_ATTR]
        model = self.model
        if "selora_adapters" in model.__dict__ and self._previous_active:
            set_adapter(model, self._previous_active)
        return model

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Save the classifier and the experts to directory ``path`` (:func:`selora.xlora.save`)."""
        from selora.xlora.checkpoint import save

        save(self, path)


wrap = XLoRAModel
"""Wrap ``model`` as an X-LoRA model over its named adapters: ``wrap(model, config)``."""
