r"""X-LoRA's classifier: hidden states in, per-token expert weights out.

It reads the last hidden states :math:`h \in \mathbb{R}^{H}` of each token
(from the first, no-grad pass with the adapters off) and returns the weights
:math:`g` with which the second pass mixes the experts:

.. math::

    z = \mathrm{MLP}(h) \in \mathbb{R}^{L \times K}\ (\text{layerwise})
    \text{ or } \mathbb{R}^{K}, \qquad
    g = \operatorname{softmax}(z / \tau) \text{ over the experts},

followed, with ``top_k = k``, by the mask :math:`g_i \leftarrow g_i\,[i \in
\operatorname{top}_k(g)]` and, with ``renormalize``, by
:math:`g \leftarrow g / \sum_i g_i`. Without softmax the raw outputs :math:`z`
are the weights (the temperature is then unused). The classifier keeps no
per-call state: concurrent calls share it safely.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CLASSIFIER_ATTR", "XLoRAClassifier"]

CLASSIFIER_ATTR = "selora_xlora_classifier"
"""The classifier's attribute on :class:`~selora.xlora.XLoRAModel` (and its checkpoint key)."""


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

    """

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
        return self.weights_from_logits(self.logits(hidden))

    def extra_repr(self) -> str:
        """Summarise the gating."""
        return (
            f"n_experts={self.n_experts}, n_layers={self.n_layers}, layerwise={self.layerwise}, "
            f"temperature={self.temperature:g}, top_k={self.top_k}, "
            f"renormalize={self.renormalize}, enable_softmax={self.enable_softmax}"
        )
