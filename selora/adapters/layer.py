r"""THE adapted layer: one frozen base layer and any number of named adapter units.

:class:`SpectralLayer` replaces a frozen ``nn.Linear`` (or ``Conv1D``, ``nn.Embedding``,
``nn.Conv1d`` / ``nn.Conv2d``: :mod:`selora.adapters.layer_kinds`). It holds one
:class:`~selora.adapters.unit.AdapterUnit` per adapter name in the
``nn.ModuleDict`` ``selora_units`` and carries PEFT's tuner-layer semantics
(active adapters, enable / disable, merge / unmerge / safe merge, delete, mixed
batches), written once: :func:`selora.inject`, the PEFT bridge (whose
``SeloraLinear`` is this class plus PEFT's marker mixin) and model-level
wrappers that mix named adapters per token (:class:`~selora.adapters.routing.Mixture`)
use it.

The output with active adapters :math:`i` is the frozen output plus each
adapter's update, all computed against :math:`W_0`:

.. math::

    y = W_0 x + b + \sum_i \big(f_i(x) - (W_0 x + b)\big),

with :math:`f_i` the output of adapter :math:`i`'s base of adaptation alone.
Merging writes :math:`W = W_0 + \sum_i (W_0 \odot S_i + C_i)` with each base's
update :math:`(S_i, C_i)` (:meth:`~selora.AdaptationBase.update`), the same sum,
so merged and unmerged outputs agree for any mix of LoRA, DoRA and HiRA.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.config import SpectralAdapter
from selora.adapters.factors import DenseFactor
from selora.adapters.layer_forward import mixed_batch_forward, mixture_forward
from selora.adapters.layer_kinds import layer_kind
from selora.adapters.layer_types import (
    adaptable_layer_error,
    compute_dtype,
    frozen_weight,
    is_quantized_layer,
    is_supported_layer,
    is_unsupported_quantized_layer,
    quantized_kind,
    quantized_layer_error,
)
from selora.adapters.merging import (
    UNITS_ATTR,
    current_weight0,
    layer_merged_weight,
    refuse_load_while_merged,
)
from selora.adapters.patterns import resolve_for_module
from selora.adapters.quantized import forward_weight0, read_weight, write_weight
from selora.adapters.routing import current_mixture, current_routing
from selora.adapters.unit import AdapterUnit

__all__ = [
    "UNITS_ATTR",
    "AdapterUnit",
    "DenseFactor",
    "SpectralLayer",
    "compute_dtype",
    "frozen_weight",
    "is_quantized_layer",
    "is_supported_layer",
]


class SpectralLayer(nn.Module):
    r"""A frozen layer (linear, ``Conv1D``, embedding, convolution) with named spectral adapters.

    ``forward(x)`` is the frozen output plus the update of each active adapter
    (see the module docstring), or just ``base_layer(x)`` while merged or
    disabled. With ``adapter_names`` (a mixed batch, see
    :mod:`selora.adapters.routing`) row ``i`` gets adapter ``adapter_names[i]``.

    Args:
        base_layer: the layer to adapt (its parameters are frozen).
        adapter: the first adapter, or ``None`` for none yet.
        name: the module's name in its model, for error messages.
        adapter_name: the first adapter's name.

    Attributes:
        selora_units: adapter name -> :class:`AdapterUnit`.
        merged_adapters: the adapters folded into the frozen weight, in order.

    Raises:
        TypeError: if ``base_layer`` is not a supported layer type (a quantized
            one other than bitsandbytes' quantized ``Linear4bit`` / ``Linear8bitLt``,
            a grouped convolution, an embedding with ``max_norm`` or sparse gradients).
        ValueError: if the adapter's budget does not fit this layer.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter: SpectralAdapter | None = None,
        *,
        name: str = "",
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        self._hold_base_layer(base_layer, name)
        if adapter is not None:
            self.add_adapter(adapter_name, adapter)
            self.set_adapter(adapter_name)

    def _hold_base_layer(self, base_layer: nn.Module, name: str) -> Tensor:
        """Check, freeze and keep ``base_layer``; set sizes and flags; return :math:`W_0`."""
        if is_unsupported_quantized_layer(base_layer):
            raise quantized_layer_error(base_layer, name)
        if (error := adaptable_layer_error(base_layer, name)) is not None:
            raise error
        self.kind = layer_kind(base_layer)  # how the factors meet this layer type
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        # bitsandbytes 4-bit / 8-bit (selora.adapters.quantized): W0 is dequantized on demand
        self.quantized = quantized_kind(base_layer) is not None
        weight0 = read_weight(base_layer)
        self.out_features, self.in_features = int(weight0.shape[0]), int(weight0.shape[1])
        self.name = name
        self.selora_units = nn.ModuleDict()
        # Instance attributes: PEFT's BaseTunerLayer declares these at class level (shared).
        self._active_adapter: str | list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # The private form takes the module too on torch 2.4 (the public one is 2.5+).
        self._register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            refuse_load_while_merged, with_module=True
        )
        return weight0

    # ------------------------------------------------------------------ adapters

    def get_base_layer(self) -> nn.Module:
        """Return the wrapped frozen layer (PEFT's name)."""
        base = self.base_layer
        assert isinstance(base, nn.Module)
        return base

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight (as stored), so code reading ``.weight`` still works."""
        weight = self.base_layer.weight
        assert isinstance(weight, Tensor)
        return weight

    @property
    def bias(self) -> Tensor | None:
        """The wrapped layer's bias."""
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in order."""
        active = self._active_adapter
        return [active] if isinstance(active, str) else list(active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter (a list when several are active), as PEFT's layers give it."""
        return self._active_adapter

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the frozen weight."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        """Whether the adapters are disabled (the layer computes its base output)."""
        return self._disable_adapters

    @property
    def disabled(self) -> bool:
        """Alias of :attr:`disable_adapters`."""
        return self._disable_adapters

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disable_adapters = bool(value)

    @property
    def adapter(self) -> AdapterUnit:
        """The unit of the only adapter of this layer (a shortcut for one-adapter models).

        Raises:
            AttributeError: if the layer holds no adapter or several.
        """
        units = list(self.selora_units.values())
        if len(units) != 1:
            raise AttributeError(
                f"{self.name or 'this layer'} holds {len(units)} adapters "
                f"({list(self.selora_units)}); use .unit(name)"
            )
        unit = units[0]
        assert isinstance(unit, AdapterUnit)
        return unit

    def unit(self, adapter_name: str) -> AdapterUnit:
        """Return the :class:`AdapterUnit` of ``adapter_name``.

        Args:
            adapter_name: an adapter of this layer.

        Returns:
            The unit.

        Raises:
            KeyError: naming the adapters the layer holds.
        """
        if adapter_name not in self.selora_units:
            raise KeyError(
                f"{self.name or 'this layer'} holds no adapter {adapter_name!r} "
                f"(it holds {list(self.selora_units)})"
            )
        unit = self.selora_units[adapter_name]
        assert isinstance(unit, AdapterUnit)
        return unit

    def make_unit(self, adapter_name: str, adapter: SpectralAdapter) -> AdapterUnit:
        """Build (without adding) the unit ``adapter_name`` would get on this layer.

        The adapter's per-module patterns (``rank_pattern``, ``alpha_pattern``,
        budget patterns) are applied for this layer's :attr:`name`
        (:func:`~selora.adapters.patterns.resolve_for_module`); the unit holds
        the resolved adapter.

        Args:
            adapter_name: the adapter's name.
            adapter: the adapter description.

        Returns:
            The unit, on the frozen weight's device.

        Raises:
            ValueError: if the budget does not fit this layer's shape.
        """
        weight0 = read_weight(self.get_base_layer())
        where = f"{self.name}.{UNITS_ATTR}.{adapter_name}" if self.name else adapter_name
        adapter = resolve_for_module(adapter, self.name)  # rank / alpha / budget patterns
        unit = AdapterUnit(
            adapter, self.in_features, self.out_features, weight0, name=where, kind=self.kind
        )
        return unit.train(self.training)

    def add_adapter(
        self, adapter_name: str, adapter: SpectralAdapter, unit: AdapterUnit | None = None
    ) -> None:
        """Add (or replace) the adapter ``adapter_name``; the active set is unchanged.

        Args:
            adapter_name: the adapter's name.
            adapter: its description.
            unit: a unit built by :meth:`make_unit` (built here if ``None``).

        Raises:
            ValueError: if the budget does not fit this layer, or the name is taken
                by a merged adapter.
        """
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{self.name}: adapter {adapter_name!r} is merged; unmerge it first")
        self.selora_units[adapter_name] = unit or self.make_unit(adapter_name, adapter)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Add the adapter ``adapter_name`` described by a PEFT ``SeloraConfig``.

        Args:
            adapter_name: the adapter's name.
            config: its :class:`~selora.integrations.peft.SeloraConfig`.
        """
        self.add_adapter(adapter_name, config.to_spectral_adapter())
        self.set_adapter(self.active_adapters, inference_mode=bool(config.inference_mode))

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` the active adapters; only they are trainable.

        PEFT's rule: the active adapters' parameters require gradients (unless
        ``inference_mode``), every other adapter's are frozen.

        Args:
            adapter_names: a name or a list of names.
            inference_mode: freeze the active adapters too.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, unit in self.selora_units.items():
            unit.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names[0] if len(names) == 1 else names

    def enable_adapters(self, enabled: bool) -> None:
        """Enable (``True``) or disable the adapters, as PEFT's ``enable_adapters``.

        Disabled adapters contribute nothing and their parameters are frozen.

        Args:
            enabled: the new state.
        """
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            self.selora_units.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter ``adapter_name`` (PEFT's rules for the active set).

        If it was active, the other active adapters stay active; if none is
        left, the first remaining adapter becomes active (with a warning).

        Args:
            adapter_name: an adapter of this layer.

        Raises:
            RuntimeError: if the adapter is merged (unmerge first).
        """
        if adapter_name in self.merged_adapters:
            raise RuntimeError(
                f"{self.name or 'this layer'}: adapter {adapter_name!r} is merged into the "
                "frozen weight; unmerge it before deleting it"
            )
        if adapter_name in self.selora_units:
            del self.selora_units[adapter_name]
        if adapter_name not in self.active_adapters:
            return
        active = [n for n in self.active_adapters if n != adapter_name]
        remaining = list(self.selora_units)
        if active or not remaining:
            self.set_adapter(active)
            return
        warnings.warn(
            f"adapter {adapter_name!r} was active and is deleted; {remaining[0]!r} is "
            "now the active adapter",
            UserWarning,
            stacklevel=2,
        )
        self.set_adapter(remaining[0])

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Return the adapted output (the frozen output when merged or disabled).

        Args:
            x: the layer input ``(..., d_in)``.
            *args: passed to the wrapped layer.
            **kwargs: passed to the wrapped layer; ``adapter_names`` (one name
                per row) makes it a mixed batch, as in PEFT.

        Returns:
            ``(..., d_out)``.

        Raises:
            ValueError: for a mixed batch while merged or in training mode, or
                whose names do not match the batch size.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = current_routing()
        base_layer = self._modules["base_layer"]  # the dict: __getattr__ costs, per token
        assert base_layer is not None
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            out: Tensor = base_layer(x, *args, **kwargs)
            return out
        mixture = current_mixture()
        if mixture is not None:
            return mixture_forward(self, x, mixture, *args, **kwargs)
        if adapter_names is not None:
            return mixed_batch_forward(self, x, list(adapter_names), *args, **kwargs)
        base_out: Tensor = base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return base_out
        units = self.selora_units._modules
        active = self._active_adapter
        names = [active] if isinstance(active, str) else active
        if self.quantized:
            weight0 = forward_weight0(base_layer, [units.get(n) for n in names])
        else:
            weight0 = frozen_weight(base_layer)
        bias = getattr(base_layer, "bias", None)
        out = base_out
        for name in names:
            unit = units.get(name)
            if unit is None:
                continue
            if out is base_out:
                out = unit(x, base_out, weight0, bias)
            else:  # one full-size addition per further adapter, as PEFT's LoRA
                out = out + unit.delta(x, base_out, weight0, bias)  # type: ignore[operator]
        return out

    # ------------------------------------------------------------------ merging

    def _names_to_merge(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.selora_units]
        if adapter_names is not None and unknown and len(unknown) == len(names):
            return []  # PEFT: an adapter that does not target this layer is skipped
        return [n for n in names if n in self.selora_units and n not in self.merged_adapters]

    def _current_weight0(self, weight: Tensor) -> Tensor:
        """Return :math:`W_0` in the compute dtype from the stored (maybe merged) weight."""
        return current_weight0(self, weight)

    def merged_weight(
        self, adapter_names: Sequence[str] | None = None, *, safe: bool = False
    ) -> Tensor:
        r"""Return the stored weight with ``adapter_names`` merged too; nothing is written.

        The new update is computed against :math:`W_0` (recovered first if
        adapters are merged already) in the compute dtype, and the result cast
        to the weight's dtype. With ``safe``, three checks raise ``ValueError``
        naming the layer: every parameter and buffer of the units is finite;
        the merged weight is finite in the weight's dtype; and unmerging it
        would restore :math:`W_0`:
        :math:`\max|W_0' - W_0| \le \sqrt{\epsilon}\,\max|W_0|`, with
        :math:`W_0'` the round trip and :math:`\epsilon` the machine epsilon of
        the weight's dtype (float32: :math:`3.5 \cdot 10^{-4}` of the largest
        entry). An update so large that merging rounds :math:`W_0` away
        (:math:`W_0 + 10^{30} = 10^{30}` in float32) fails the last check though
        every number is finite.

        Args:
            adapter_names: the adapters to merge; the active ones if ``None``.
            safe: run the checks.

        Returns:
            The merged weight, the stored weight's dtype and shape (a quantized
            layer's: dequantized, ``(d_out, d_in)``; :meth:`merge` requantizes it).

        Raises:
            RuntimeError: if a base of adaptation cannot be merged.
            ValueError: with ``safe``, if a check fails.
        """
        return layer_merged_weight(self, self._names_to_merge(adapter_names), safe=safe)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters into the frozen weight (the active ones if ``adapter_names`` is None).

        Unchecked by default, as PEFT; ``safe_merge`` runs the checks of
        :meth:`merged_weight` first and writes nothing if one fails. Adapters
        merged already are skipped.

        Args:
            safe_merge: check before writing.
            adapter_names: the adapters to merge.

        Raises:
            RuntimeError: if a base of adaptation cannot be merged.
            ValueError: with ``safe_merge``, if a check fails.
        """
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        merged = self.merged_weight(names, safe=safe_merge)
        write_weight(self.get_base_layer(), merged)  # requantized if quantized
        for name in names:
            self.unit(name).record_merge()
            self.merged_adapters.append(name)

    @torch.no_grad()
    def check_merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Run the checks of ``merge(safe_merge=True)`` without writing anything.

        Args:
            adapter_names: the adapters to check; the active ones if ``None``.

        Raises:
            RuntimeError: if a base of adaptation cannot be merged.
            ValueError: if a check fails.
        """
        self.merged_weight(adapter_names, safe=True)

    @torch.no_grad()
    def unmerge(self) -> None:
        r"""Restore :math:`W_0` from the merged weight (no-op if nothing is merged).

        The updates undone are the ones merged, even if an adapter changed
        since (:meth:`AdapterUnit.merged_update`). The restored weight is
        :math:`W_0` up to float rounding (about the dtype's epsilon times the
        merged weight's entries); a merge of a non-finite or huge update cannot
        be undone, which ``merge(safe_merge=True)`` refuses up front.

        Raises:
            RuntimeError: if the merge lost :math:`W_0` (HiRA with
                :math:`1 + \tilde B \tilde A = 0` somewhere); nothing changes.
        """
        if not self.merged_adapters:
            return
        weight = read_weight(self.get_base_layer())
        write_weight(self.get_base_layer(), self._current_weight0(weight).to(weight.dtype))
        for name in self.merged_adapters:
            if name in self.selora_units:
                self.unit(name).forget_merge()
        self.merged_adapters = []

    def extra_repr(self) -> str:
        """Show the layer's size, its adapters and whether it is merged."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={list(self.selora_units)}, active={self.active_adapters}, "
            f"merged={self.merged_adapters}"
        )
