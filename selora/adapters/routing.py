r"""Mixed batches: which adapter each row of a call uses, carried with the call.

``model(x, adapter_names=[...])`` routes row ``i`` of the batch through the
adapter ``adapter_names[i]`` (``"__base__"``: through none), as PEFT does. The
names travel in a context variable set for the duration of one call of the
model (by :func:`routed`), not as state on the shared layers, so concurrent
calls from several threads do not see each other's routing.

A second context variable carries a :class:`Mixture`: per-token weights
:math:`g_i` over named adapters, with which every layer computes
:math:`y = W_0 x + b + \sum_i g_i\,(f_i(x) - (W_0 x + b))` for the call (set
by :func:`mixed`). Model-level wrappers that mix named adapters per token use
it; the weights never live on the shared layers.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

__all__ = [
    "BASE_NAME",
    "Mixture",
    "check_adapter_names",
    "current_mixture",
    "current_routing",
    "mixed",
    "routed",
]

BASE_NAME = "__base__"
"""The name that routes a row through no adapter (the frozen base layer)."""

_ROUTING: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "selora_adapter_names", default=None
)


def current_routing() -> tuple[str, ...] | None:
    """Return the adapter names of the call in progress (``None``: no mixed batch).

    Returns:
        One name per row of the batch, or ``None``.
    """
    return _ROUTING.get()


def check_adapter_names(
    adapter_names: Sequence[str], known: Sequence[str], *, training: bool, merged: bool
) -> tuple[str, ...]:
    """Check ``adapter_names`` with PEFT's rules and return them as a tuple.

    Args:
        adapter_names: one adapter name per row of the batch.
        known: the adapters the model holds.
        training: whether the model is in training mode (refused, as PEFT does).
        merged: whether an adapter is merged (refused: rows could not differ).

    Returns:
        The names.

    Raises:
        ValueError: in training mode, while merged, for a name that is not an
            adapter of the model, or for something that is not a list of names.
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError(
            f"adapter_names must be a list with one adapter name per row; got {adapter_names!r}"
        )
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call "
            "`unmerge` first."
        )
    unknown = sorted(set(adapter_names) - set(known) - {BASE_NAME})
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} "
            f"(the model holds {list(known)}; {BASE_NAME!r} selects the base model)"
        )
    return tuple(adapter_names)


@contextlib.contextmanager
def routed(adapter_names: Sequence[str] | None) -> Iterator[None]:
    """Route the rows of the calls made inside the block (see the module docstring).

    Args:
        adapter_names: one adapter name per row, already checked
            (:func:`check_adapter_names`); ``None`` routes nothing.

    Yields:
        Nothing.
    """
    token = _ROUTING.set(None if adapter_names is None else tuple(adapter_names))
    try:
        yield
    finally:
        _ROUTING.reset(token)


@dataclasses.dataclass(frozen=True)
class Mixture:
    r"""Per-token weights over named adapters, for the layers of one call.

    A layer holding some of ``names`` computes
    :math:`y = W_0 x + b + \sum_i g_i(x)\,(f_i(x) - (W_0 x + b))`, with
    :math:`f_i` the output of adapter ``names[i]`` alone (a name the layer
    does not hold adds nothing). With no names every layer gives its frozen
    output :math:`W_0 x + b`.

    Attributes:
        names: the adapters mixed, in the order of the last dimension of ``weights``.
        weights: ``(..., K)`` per-token weights shared by every layer, or
            ``(..., L, K)`` with ``layers`` (one set per layer); ``None`` with no names.
        layers: layer -> its index on the ``L`` dimension (per-layer weights).
    """

    names: tuple[str, ...] = ()
    weights: Tensor | None = None
    layers: Mapping[nn.Module, int] | None = None

    def gates(self, layer: nn.Module, x: Tensor) -> Tensor:
        """Return the weights ``(..., K)`` for ``layer``'s input ``x``, in ``x``'s dtype.

        An input ``(batch, seq, d)`` (or its tokens flattened) is weighted token
        by token; a pooled input ``(batch, d)`` (BERT's pooler) takes the weights
        averaged over the sequence.

        Args:
            layer: the layer being called.
            x: its input ``(..., d_in)``.

        Returns:
            The gates.

        Raises:
            RuntimeError: if the weights do not fit the input or the layer.
        """
        weights = self.weights
        if weights is None:
            raise RuntimeError("a Mixture with names needs weights")
        if self.layers is not None:
            index = self.layers.get(layer)
            if index is None:
                raise RuntimeError(f"{type(layer).__name__} has no weights in this Mixture")
            weights = weights[..., index, :]
        lead, have = x.shape[:-1], weights.shape[:-1]
        if have == lead:
            return weights.to(x.dtype)
        if have[: len(lead)] == lead:  # a pooled input: the mean over the tokens
            return weights.mean(dim=tuple(range(len(lead), len(have)))).to(x.dtype)
        if have.numel() == lead.numel():  # the tokens flattened, (batch * seq, d)
            return weights.reshape(*lead, weights.shape[-1]).to(x.dtype)
        raise RuntimeError(
            f"mixing weights of shape {tuple(weights.shape)} do not fit an input of shape "
            f"{tuple(x.shape)}"
        )


_MIXTURE: contextvars.ContextVar[Mixture | None] = contextvars.ContextVar(
    "selora_mixture", default=None
)


def current_mixture() -> Mixture | None:
    """Return the :class:`Mixture` of the call in progress (``None``: none).

    Returns:
        The mixture, or ``None``.
    """
    return _MIXTURE.get()


@contextlib.contextmanager
def mixed(mixture: Mixture | None) -> Iterator[None]:
    """Mix the adapters of every layer called inside the block (see :class:`Mixture`).

    Args:
        mixture: the mixture; ``None`` ends an outer one for the block.

    Yields:
        Nothing.
    """
    token = _MIXTURE.set(mixture)
    try:
        yield
    finally:
        _MIXTURE.reset(token)
