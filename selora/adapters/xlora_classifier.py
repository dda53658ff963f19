r"""X-LoRA's gating: the classifier and the gated layers.

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

The two passes that connect them (the scoring pass and the hooks that run it)
are :mod:`selora.adapters.xlora_passes`; the base of adaptation itself
(options, experts) is :mod:`selora.adapters.xlora`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from selora.adapters.config import SpectralAdapter
from selora.adapters.layer import SpectralLayer
from selora.adapters.lora import low_rank_update
from selora.adapters.unit import AdapterUnit

__all__ = [
    "CLASSIFIER_ATTR",
    "MERGE_ERROR",
    "XLoRAClassifier",
    "XLoRALayer",
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

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Refuse: per-token weights cannot be folded into :math:`W_0`.

        Args:
            safe_merge: ignored.
            adapter_names: ignored.

        Raises:
            RuntimeError: always, explaining why.
        """
        raise RuntimeError(f"{self.name or 'this layer'}: {MERGE_ERROR}")

    def check_merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Refuse, as :meth:`merge`.

        Args:
            adapter_names: ignored.
        """
        self.merge()

    def unmerge(self) -> None:
        """Do nothing: an X-LoRA layer is never merged."""

    def extra_repr(self) -> str:
        """Show the layer's size and the number of experts."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"n_experts={len(self.experts)}, layer_index={self.layer_index}"
        )


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
