"""Mixed batches: which adapter each row of a call uses, carried with the call.

``model(x, adapter_names=[...])`` routes row ``i`` of the batch through the
adapter ``adapter_names[i]`` (``"__base__"``: through none), as PEFT does. The
names travel in a context variable set for the duration of one call of the
model (by :func:`routed`), not as state on the shared layers, so concurrent
calls from several threads do not see each other's routing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

__all__ = ["BASE_NAME", "check_adapter_names", "current_routing", "routed"]

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
