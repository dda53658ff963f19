r"""The PEFT tuner layer of the bridge: several named selora adapters on one frozen layer.

:class:`SeloraLinear` is what :class:`~selora.integrations.peft.SeloraModel` puts
in place of each targeted ``nn.Linear`` / ``Conv1D``. It holds one
:class:`~selora.adapters.AdapterUnit` per adapter name in the ``nn.ModuleDict``
``selora_units`` and implements PEFT's tuner-layer contract (active adapters,
enable / disable, merge / unmerge, delete) around them. The maths of every
base of adaptation stays in the unit's base (:meth:`AdaptationBase.forward`,
:meth:`~AdaptationBase.merged_weight`, :meth:`~AdaptationBase.unmerged_weight`),
so an adapter gives the same numbers through PEFT as through :func:`selora.inject`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from selora.adapters.layer import AdapterUnit
from selora.adapters.layer_types import (
    frozen_weight,
    is_quantized_layer,
    is_supported_layer,
    quantized_layer_error,
)

if TYPE_CHECKING:
    from selora.integrations.peft import SeloraConfig

__all__ = ["SeloraLayer", "SeloraLinear"]

UNITS_ATTR = "selora_units"
"""The per-adapter ``nn.ModuleDict``; model keys read ``<layer>.selora_units.<adapter>.``."""


def _refuse_load_while_merged(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """``load_state_dict`` pre-hook: refuse the tensors of a merged adapter."""
    merged = getattr(module, "merged_adapters", None) or []
    prefixes = tuple(f"{prefix}{UNITS_ATTR}.{name}." for name in merged)
    keys = [k for k in state_dict if prefixes and k.startswith(prefixes)]
    if keys:
        raise RuntimeError(
            f"{prefix.rstrip('.') or 'this layer'}: cannot load {keys[0]!r} while its adapter "
            "is merged into the frozen weight (the merged weight would keep the old update); "
            "unmerge_adapter() first, load, then merge again"
        )


class SeloraLayer(BaseTunerLayer):
    """PEFT tuner-layer mixin for selora adapters (the ``tuner_layer_cls`` of the bridge).

    Attributes:
        adapter_layer_names: the containers PEFT treats as trainable adapter
            weights, keyed by adapter name.
        other_param_names: adapter-keyed containers of non-trainable state (none).
    """

    adapter_layer_names: tuple[str, ...] = (UNITS_ATTR,)
    other_param_names: tuple[str, ...] = ()


class SeloraLinear(nn.Module, SeloraLayer):
    r"""A frozen ``nn.Linear`` / ``Conv1D`` carrying any number of named selora adapters.

    The output is the frozen layer's output changed by each active adapter's
    base of adaptation. With one active adapter it is exactly what a
    :class:`~selora.SpectralLayer` computes; with several, their contributions
    (each adapter's output minus the frozen output) are summed, as PEFT does
    for LoRA. Merged or disabled, it is the wrapped layer's output.

    Args:
        base_layer: the layer to adapt (an ``nn.Linear`` or ``Conv1D``).
        adapter_name: the name of the first adapter.
        config: its :class:`~selora.integrations.peft.SeloraConfig`.

    While an adapter is merged, ``load_state_dict`` refuses its tensors
    (unmerge first), and :meth:`unmerge` subtracts the update that was merged
    even if the adapter changed since.

    Raises:
        TypeError: if ``base_layer`` is not a supported layer type, or quantized.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SeloraConfig) -> None:
        super().__init__()
        if is_quantized_layer(base_layer):
            raise quantized_layer_error(base_layer, "")
        if not is_supported_layer(base_layer):
            raise TypeError(
                "the selora PEFT bridge adapts nn.Linear and transformers' Conv1D; "
                f"got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.selora_units = nn.ModuleDict()
        # Instance attributes: BaseTunerLayer declares these at class level (shared).
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter: str | list[str] = adapter_name
        weight0 = frozen_weight(base_layer)
        self.out_features, self.in_features = int(weight0.shape[0]), int(weight0.shape[1])
        self._register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            _refuse_load_while_merged, with_module=True
        )
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SeloraConfig) -> None:
        """Add (or replace) the adapter ``adapter_name`` described by ``config``.

        The unit is built by :class:`~selora.adapters.AdapterUnit` exactly as
        :func:`selora.inject` builds it, on the device of the frozen weight.

        Args:
            adapter_name: the adapter's name.
            config: its configuration.

        Raises:
            ValueError: if the adapter's budget does not fit this layer's shape.
        """
        adapter = config.to_spectral_adapter()
        weight0 = frozen_weight(self.get_base_layer())
        self.selora_units[adapter_name] = AdapterUnit(
            adapter, self.in_features, self.out_features, weight0, name=adapter_name
        )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def unit(self, adapter_name: str) -> AdapterUnit:
        """Return the :class:`~selora.adapters.AdapterUnit` of ``adapter_name``.

        Args:
            adapter_name: an adapter of this layer.

        Returns:
            The unit.
        """
        unit = self.selora_units[adapter_name]
        assert isinstance(unit, AdapterUnit)
        return unit

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Move one adapter to the frozen weight's device, keeping its dtype.

        PEFT's version also casts to the base layer's dtype; selora keeps its
        coefficients as built (float32), as :func:`selora.inject` does, and
        casts the formed factors to the input's dtype in the forward pass.

        Args:
            adapter_name: the adapter to move.
            device: the target device (the frozen weight's if ``None``).
        """
        if adapter_name not in self.selora_units:
            return
        unit = self.unit(adapter_name)
        if any(p.is_meta for p in unit.parameters()):
            return
        unit.to(device if device is not None else frozen_weight(self.get_base_layer()).device)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Return the adapted output (the frozen output when merged or disabled).

        Args:
            x: the layer input ``(..., d_in)``.
            *args: passed to the wrapped layer.
            **kwargs: passed to the wrapped layer.

        Returns:
            ``(..., d_out)``.
        """
        if self.disable_adapters and self.merged:
            self.unmerge()
        base_out: Tensor = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return base_out
        active = [name for name in self.active_adapters if name in self.selora_units]
        if not active:
            return base_out
        base_layer = self.get_base_layer()
        weight0 = frozen_weight(base_layer)
        bias = getattr(base_layer, "bias", None)
        if len(active) == 1:
            out: Tensor = self.unit(active[0])(x, base_out, weight0, bias)
            return out
        out = base_out
        for name in active:
            out = out + (self.unit(name)(x, base_out, weight0, bias) - base_out)
        return out

    def _merged(self, names: list[str], safe: bool) -> tuple[Tensor, list[str]]:
        """Merge ``names`` in turn into a copy of the frozen weight; return it and the names."""
        weight = frozen_weight(self.get_base_layer())
        merged, done = weight, []
        for name in names:
            if name not in self.selora_units:
                continue
            merged = self.unit(name).merged(merged, safe=safe, where=f"adapter {name!r}")
            done.append(name)
        return merged, done

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the frozen weight with their base's ``merged_weight``.

        All the adapters are merged into a copy, which is written once.

        Args:
            safe_merge: check before writing anything, as :func:`selora.merge`
                with ``safe=True`` does (finite adapter tensors, a finite merged
                weight, and a merge that unmerge can undo:
                :meth:`~selora.adapters.AdapterUnit.merged`).
            adapter_names: the adapters to merge; the active ones if ``None``.

        Raises:
            RuntimeError: if an adapter's base of adaptation cannot be merged.
            ValueError: with ``safe_merge``, if a check fails; the weight is unchanged.
        """
        names = check_adapters_to_merge(self, adapter_names)
        merged, done = self._merged(names, safe_merge)
        if not done:
            return
        frozen_weight(self.get_base_layer()).copy_(merged)
        for name in done:
            self.unit(name).record_merge()
            self.merged_adapters.append(name)

    @torch.no_grad()
    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Run the checks of ``merge(safe_merge=True)`` without writing anything.

        Args:
            adapter_names: the adapters to check; the active ones if ``None``.

        Raises:
            RuntimeError: if an adapter's base of adaptation cannot be merged.
            ValueError: if a check fails.
        """
        names = [
            n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters
        ]
        self._merged(names, True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight, undoing merges in reverse order.

        Each adapter's update is the one that was merged, even if the adapter
        changed since (:meth:`~selora.adapters.AdapterUnit.unmerged`).
        """
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.selora_units:
                continue
            weight = frozen_weight(self.get_base_layer())
            weight.copy_(self.unit(name).unmerged(weight))

    def __repr__(self) -> str:
        """Prefix the module's repr with ``selora.`` as PEFT's layers do."""
        return "selora." + super().__repr__()
