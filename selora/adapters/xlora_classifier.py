r"""X-LoRA's gating: the classifier, the gated layers and the two passes that connect them.

The classifier reads the last hidden states :math:`h \in \mathbb{R}^{H}` of each
token (from the scoring pass) and returns the weights :math:`g` that the
second pass gives the experts:

.. math::

    z = \mathrm{MLP}(h) \in \mathbb{R}^{L \times K}\ (\text{layerwise})
    \text{ or } \mathbb{R}^{K}, \qquad
    g = \operatorname{softmax}(z / \tau) \text{ over the experts},

followed, with ``top_k = k``, by the mask :math:`g_i \leftarrow g_i\,[i \in
\operatorname{top}_k(g)]` and, with ``renormalize``, by
:math:`g \leftarrow g / \sum_i g_i`. Without softmax the raw outputs :math:`z`
are the weights (the temperature is then unused).

:func:`attach_classifier` registers, on the model given to :func:`selora.inject`,
a forward pre-hook that runs the scoring pass (no grad, experts off,
``output_hidden_states=True``) and the classifier, and stores each layer's
weights on its :class:`XLoRALayer`; a forward hook clears them after the call.
The base of adaptation itself (options, experts) is :mod:`selora.adapters.xlora`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from selora.adapters.config import SpectralAdapter
from selora.adapters.layer import AdapterUnit, SpectralLayer
from selora.adapters.lora import low_rank_update

__all__ = [
    "CLASSIFIER_ATTR",
    "MERGE_ERROR",
    "XLoRAClassifier",
    "XLoRALayer",
    "attach_classifier",
    "get_xlora_classifier",
    "xlora_layers",
]

CLASSIFIER_ATTR = "selora_xlora_classifier"
"""Name of the classifier submodule that :func:`selora.inject` adds to the model."""

MERGE_ERROR = (
    "X-LoRA cannot be merged: its update sum_i g_i(x) (alpha/r) B_i A_i depends on each "
    "token through the classifier's weights g(x), so no fixed matrix can replace W0. Keep "
    "the adapter, or unload(model), which puts back the plain base layers without the experts"
)


class XLoRAClassifier(nn.Module):
    r"""A small MLP mapping hidden states to expert weights (Buehler & Buehler, 2024).

    ``depth`` linear layers: ``depth - 1`` hidden layers of width ``width``
    with a ReLU after each, then one linear layer to :math:`L K` outputs
    (``layerwise``) or :math:`K` (one set shared by every adapted layer).

    Args:
        hidden_size: :math:`H`, the model's hidden size.
        n_experts: :math:`K \ge 1`.
        n_layers: :math:`L`, the number of adapted layers.
        layerwise: one set of :math:`K` weights per adapted layer.
        temperature: :math:`\tau > 0` of the softmax.
        top_k: keep the ``top_k`` largest weights per token (``None``: all).
        renormalize: re-normalise the kept weights to sum to one.
        enable_softmax: apply the softmax (else the raw outputs are the weights).
        depth: the number of linear layers, at least 1.
        width: the hidden layers' width (``hidden_size`` if ``None``).

    Attributes:
        last_weights: the (detached) weights of the latest forward pass, for
            inspection; ``None`` before the first.
    """

    last_weights: Tensor | None
    hook_handles: list[RemovableHandle]

    def __init__(
        self,
        hidden_size: int,
        n_experts: int,
        n_layers: int,
        *,
        layerwise: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        renormalize: bool = False,
        enable_softmax: bool = True,
        depth: int = 1,
        width: int | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size, self.n_experts, self.n_layers = hidden_size, n_experts, n_layers
        self.layerwise, self.temperature = layerwise, float(temperature)
        self.top_k, self.renormalize, self.enable_softmax = top_k, renormalize, enable_softmax
        width = hidden_size if width is None else width
        layers: list[nn.Module] = []
        features = hidden_size
        for _ in range(depth - 1):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, n_experts * (n_layers if layerwise else 1)))
        self.net = nn.Sequential(*layers)
        self.last_weights = None
        self.hook_handles = []

    def logits(self, hidden: Tensor) -> Tensor:
        """Return the raw scores :math:`z`.

        Args:
            hidden: the last hidden states ``(..., H)``, any float dtype.

        Returns:
            ``(..., L, K)`` when layerwise, else ``(..., K)``, in the classifier's dtype.
        """
        weight = self.net[-1].weight
        assert isinstance(weight, Tensor)
        z: Tensor = self.net(hidden.to(weight.dtype))
        if self.layerwise:
            z = z.reshape(*z.shape[:-1], self.n_layers, self.n_experts)
        return z

    def weights_from_logits(self, logits: Tensor) -> Tensor:
        r"""Apply softmax with temperature, the top-k mask and the re-normalisation.

        Args:
            logits: :math:`z`, experts on the last dimension.

        Returns:
            :math:`g`, same shape; with ``top_k = k`` exactly ``k`` entries per
            token are kept (the others are exactly zero).
        """
        weights = (
            torch.softmax(logits / self.temperature, dim=-1) if self.enable_softmax else logits
        )
        if self.top_k is not None and self.top_k < self.n_experts:
            keep = weights.topk(self.top_k, dim=-1).indices
            mask = torch.zeros_like(weights, dtype=torch.bool).scatter(-1, keep, True)
            weights = torch.where(mask, weights, torch.zeros_like(weights))
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights

    def forward(self, hidden: Tensor) -> Tensor:
        """Return the expert weights :math:`g` of every token (see the module docstring).

        Args:
            hidden: the last hidden states ``(batch, seq, H)``.

        Returns:
            ``(batch, seq, L, K)`` when layerwise, else ``(batch, seq, K)``.
        """
        weights = self.weights_from_logits(self.logits(hidden))
        self.last_weights = weights.detach()
        return weights

    def extra_repr(self) -> str:
        """Summarise the gating."""
        return (
            f"n_experts={self.n_experts}, n_layers={self.n_layers}, layerwise={self.layerwise}, "
            f"temperature={self.temperature:g}, top_k={self.top_k}, "
            f"renormalize={self.renormalize}, enable_softmax={self.enable_softmax}"
        )


# --------------------------------------------------------------------------- the layer


class XLoRALayer(SpectralLayer):
    r"""A frozen ``nn.Linear`` / ``Conv1D`` with :math:`K` LoRA experts mixed per token.

    .. math::

        y = W_0 x + b + \sum_{i=1}^{K} g_i(x)\,\frac{\alpha_i}{r}\,\tilde B_i \tilde A_i x.

    The weights :math:`g` (``expert_weights``, ``(batch, seq, K)``) are set by
    the model's pre-hook before each forward and cleared after it. An input
    of shape ``(batch, seq, d_in)`` (or the tokens flattened) is weighted token
    by token; a pooled input ``(batch, d_in)`` (BERT's pooler) takes the
    weights averaged over the sequence. While scoring or disabled the layer
    returns :math:`W_0 x + b`. It cannot be merged.

    Args:
        base_layer: the layer to adapt (its parameters are frozen).
        adapter: the X-LoRA adapter description.
        experts: one ``lora`` adapter description per expert (its basis,
            budget, seed, scale and dropout).
        name: the module's name in its model, for error messages.
        freeze_experts: freeze the experts' coefficients.

    Raises:
        TypeError: if ``base_layer`` is not a supported layer type.
    """

    mergeable: ClassVar[bool] = False

    def __init__(
        self,
        base_layer: nn.Module,
        adapter: SpectralAdapter,
        experts: Sequence[SpectralAdapter],
        *,
        name: str = "",
        freeze_experts: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # SpectralLayer's init builds a single AdapterUnit
        weight0 = self._hold_base_layer(base_layer, name)
        self.xlora_adapter = adapter
        self.experts = nn.ModuleList(
            AdapterUnit(spec, self.in_features, self.out_features, weight0) for spec in experts
        )
        if freeze_experts:
            self.experts.requires_grad_(False)
        self.scoring = False
        self.layer_index = 0
        self.expert_weights: Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "adapter":
            raise AttributeError(
                f"{type(self).__name__} holds {len(self.experts)} experts in .experts "
                "(AdapterUnits), not a single .adapter"
            )
        return super().__getattr__(name)

    def units(self) -> list[AdapterUnit]:
        """Return the experts, in order."""
        return [unit for unit in self.experts if isinstance(unit, AdapterUnit)]

    def _gates(self, x: Tensor) -> Tensor:
        weights = self.expert_weights
        if weights is None:
            raise RuntimeError(
                f"{self.name or 'this X-LoRA layer'} has no expert weights: X-LoRA layers run "
                "inside a call of the model given to selora.inject, whose pre-hook computes them"
            )
        lead, have = x.shape[:-1], weights.shape[:-1]
        if have == lead:
            return weights.to(x.dtype)
        if have[: len(lead)] == lead:  # a pooled input (BERT's pooler): mean over the tokens
            dims = tuple(range(len(lead), len(have)))
            return weights.mean(dim=dims).to(x.dtype)
        if have.numel() == lead.numel():  # tokens flattened (batch * seq, d)
            return weights.reshape(*lead, weights.shape[-1]).to(x.dtype)
        raise RuntimeError(
            f"{self.name or 'this X-LoRA layer'}: expert weights of shape "
            f"{tuple(weights.shape)} do not fit an input of shape {tuple(x.shape)}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return the frozen output plus the per-token mixture of the experts."""
        base_out: Tensor = self.base_layer(x)
        if self.merged or self.disabled or self.scoring:
            return base_out
        gates = self._gates(x)
        update: Tensor | None = None
        for i, unit in enumerate(self.units()):
            a, b = unit.factors(x.dtype)
            term = low_rank_update(unit, x, a, b) * gates[..., i : i + 1]
            update = term if update is None else update + term
        assert update is not None
        return base_out + update.to(base_out.dtype)

    def merge(self) -> None:
        """Refuse: per-token weights cannot be folded into :math:`W_0`.

        Raises:
            RuntimeError: always, explaining why.
        """
        raise RuntimeError(f"{self.name or 'this layer'}: {MERGE_ERROR}")

    def unmerge(self) -> None:
        """Do nothing: an X-LoRA layer is never merged."""

    def extra_repr(self) -> str:
        """Show the layer's size and the number of experts."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"n_experts={len(self.experts)}, layer_index={self.layer_index}"
        )


# --------------------------------------------------------------------------- the two passes


def xlora_layers(model: nn.Module) -> list[XLoRALayer]:
    """Return the X-LoRA layers of ``model`` in module order.

    Args:
        model: any model.

    Returns:
        The layers.
    """
    return [m for m in model.modules() if isinstance(m, XLoRALayer)]


def get_xlora_classifier(model: nn.Module) -> XLoRAClassifier:
    """Return the classifier :func:`selora.inject` attached to an X-LoRA model.

    Args:
        model: a model adapted with ``base="xlora"``.

    Returns:
        The classifier (``model.selora_xlora_classifier``).

    Raises:
        ValueError: if the model holds no X-LoRA adapter.
    """
    classifier = getattr(model, CLASSIFIER_ATTR, None)
    if not isinstance(classifier, XLoRAClassifier):
        raise ValueError(f"{type(model).__name__} holds no X-LoRA adapter")
    return classifier


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
