r"""The registry of bases of adaptation (LoRA, DoRA, HiRA, ...).

A base of adaptation says how the two factors :math:`\tilde A`, :math:`\tilde B`
of an :class:`AdapterUnit` change the output of a frozen layer. Each is a
subclass of :class:`AdaptationBase` registered once with :func:`register_base`;
the layers, the injection and the checkpoints reach it only through this
registry, so a user-registered base works like a built-in one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import Tensor

from selora._names import UnknownNameError, unknown_name

if TYPE_CHECKING:
    from selora.adapters.unit import AdapterUnit

__all__ = [
    "AdaptationBase",
    "Update",
    "UnknownAdapterBaseError",
    "get_adapter_base",
    "list_adapter_bases",
    "register_base",
    "unregister_base",
]


Update = tuple[Tensor | None, Tensor | None]
"""A merge update :math:`(S, C)`: a merge writes :math:`W_0 + W_0 \\odot S + C` (``None``: none)."""


class UnknownAdapterBaseError(UnknownNameError):
    """Raised for a base of adaptation nobody registered (a ``KeyError`` and a ``ValueError``)."""


class AdaptationBase(abc.ABC):
    r"""Contract of a base of adaptation: one layer's factors in, its output and merge update out.

    A base is stateless: its parameters beyond the two factors (a DoRA
    magnitude, say) are created by :meth:`setup` on the :class:`AdapterUnit`,
    where checkpoints and optimizers find them.

    Attributes:
        name: the registered name, set by :func:`register_base`.
        mergeable: whether the update can be folded into :math:`W_0`.
        reads_weight0: whether :meth:`forward` / :meth:`delta` read ``weight0``.
            On a quantized layer ``weight0`` is dequantized for each call only
            if some active base reads it; a base that leaves it ``False`` gets a
            ``meta`` tensor of the right shape there. ``True`` (safe) by default.
    """

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    reads_weight0: ClassVar[bool] = True

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Check (and may fill in defaults of) ``SpectralAdapter.base_options``.

        Args:
            options: a mutable copy of the options.

        Raises:
            ValueError: on an option this base does not take or a bad value.
        """
        if options:
            raise ValueError(f"base {cls.name!r} takes no options; got {sorted(options)}")

    def setup(self, unit: AdapterUnit, weight0: Tensor) -> None:  # noqa: B027 - optional hook
        """Create extra parameters or buffers on ``unit`` (none by default).

        Args:
            unit: the adapter unit being built; its factors exist already.
            weight0: the frozen weight :math:`W_0`, ``(d_out, d_in)``.
        """

    @abc.abstractmethod
    def forward(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        """Return the adapted output given the frozen layer's output.

        Args:
            unit: the adapter unit (factors, scaling, dropout, extras).
            x: the layer input ``(..., d_in)``.
            base_out: the frozen layer's output :math:`W_0 x + b`, ``(..., d_out)``.
            weight0: :math:`W_0`, ``(d_out, d_in)``.
            bias: :math:`b` or ``None``.

        Returns:
            The adapted output, ``(..., d_out)``.
        """

    def delta(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        r"""Return the update alone, :math:`f(x) - (W_0 x + b)` (what several adapters add up).

        The default subtracts the frozen output from :meth:`forward`; a base
        overrides it to skip that full-size subtraction (and :meth:`forward`'s
        addition), which a layer with several active adapters pays per adapter.

        Args:
            unit: the adapter unit.
            x: the layer input ``(..., d_in)``.
            base_out: the frozen layer's output, ``(..., d_out)``.
            weight0: :math:`W_0`, ``(d_out, d_in)``.
            bias: :math:`b` or ``None``.

        Returns:
            ``(..., d_out)`` in ``base_out``'s dtype.
        """
        return self.forward(unit, x, base_out, weight0, bias) - base_out

    @abc.abstractmethod
    def update(self, unit: AdapterUnit, weight0: Tensor | None) -> Update:
        r"""Return the merge update :math:`(S, C)`: merging writes :math:`W_0 + W_0 \odot S + C`.

        Every base's update is affine in :math:`W_0` in this form (LoRA:
        :math:`S = 0`, :math:`C = \tfrac{\alpha}{r}\tilde B\tilde A`; DoRA: a
        per-row :math:`S`; HiRA: :math:`S = \tilde B\tilde A`, :math:`C = 0`),
        which is what lets several adapters merge exactly as their forward
        sums them, :math:`W = W_0 + \sum_i (W_0 \odot S_i + C_i)`, and lets an
        unmerge recover :math:`W_0 = (W - \sum_i C_i) / (1 + \sum_i S_i)`.
        The forward must compute the same update, relative to the frozen
        output, so that merging equals the forward.

        Args:
            unit: the adapter unit.
            weight0: :math:`W_0` in the compute dtype (float32, or float64 for
                a float64 layer) when merging; ``None`` when unmerging, where
                :math:`W_0` is not known: return what was returned at the merge
                (record in :meth:`update` whatever :math:`W_0`-dependent state
                that needs, as DoRA records its row norms).

        Returns:
            ``(S, C)``: :math:`S` broadcastable to ``(d_out, d_in)`` (``(d_out, 1)``
            for a per-row scale) or ``None``; :math:`C` ``(d_out, d_in)`` or
            ``None``; float32 or float64.
        """

    def merged_weight(self, unit: AdapterUnit, weight0: Tensor) -> Tensor:
        r"""Return :math:`W_0 + W_0 \odot S + C` for this unit alone (see :meth:`update`).

        Args:
            unit: the adapter unit.
            weight0: :math:`W_0` in the compute dtype.

        Returns:
            The merged weight in ``weight0``'s dtype.
        """
        scale, shift = self.update(unit, weight0)
        merged = weight0 if scale is None else weight0 + weight0 * scale.to(weight0.dtype)
        return merged if shift is None else merged + shift.to(weight0.dtype)


_B = TypeVar("_B", bound=type[AdaptationBase])
_REGISTRY: dict[str, type[AdaptationBase]] = {}


def register_base(name: str, *, override: bool = False) -> Callable[[_B], _B]:
    """Class decorator that registers an :class:`AdaptationBase` under ``name``.

    Args:
        name: the registry key (``SpectralAdapter(base=name)``).
        override: replace an existing registration instead of raising.

    Returns:
        The decorator, which returns the class with its ``name`` set.

    Raises:
        ValueError: on an empty or duplicate name (without ``override``).
        TypeError: if the decorated object is not an ``AdaptationBase`` subclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a base name must be a non-empty string; got {name!r}")

    def decorator(cls: _B) -> _B:
        if not (isinstance(cls, type) and issubclass(cls, AdaptationBase)):
            raise TypeError(
                f"register_base({name!r}) decorates AdaptationBase subclasses; got {cls!r}"
            )
        if name in _REGISTRY and not override:
            raise ValueError(
                f"a base of adaptation named {name!r} is already registered "
                f"({_REGISTRY[name].__name__}); pass override=True to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def unregister_base(name: str) -> None:
    """Remove a base of adaptation from the registry.

    Args:
        name: a registered name.

    Raises:
        KeyError: if ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise KeyError(f"no base of adaptation named {name!r} is registered")
    del _REGISTRY[name]


def get_adapter_base(name: str) -> type[AdaptationBase]:
    """Return the class registered as ``name``.

    Args:
        name: a registered base of adaptation.

    Returns:
        The class (instantiate it with no arguments).

    Raises:
        UnknownAdapterBaseError: for an unknown name (a ``KeyError`` and a
            ``ValueError``), listing the known ones and the closest.
    """
    if name not in _REGISTRY:
        raise UnknownAdapterBaseError(unknown_name("base of adaptation", name, _REGISTRY))
    return _REGISTRY[name]


def list_adapter_bases() -> list[str]:
    """List the registered bases of adaptation, sorted.

    Returns:
        The names.
    """
    return sorted(_REGISTRY)
