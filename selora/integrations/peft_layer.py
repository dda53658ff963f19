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

from selora.adapters.layer import AdapterUnit, frozen_weight, is_supported_layer

if TYPE_CHECKING:
    from selora.integrations.peft import SeloraConfig

__all__ = ["SeloraLayer", "SeloraLinear"]

UNITS_ATTR = "selora_units"
"""The per-adapter ``nn.ModuleDict``; model keys read ``<layer>.selora_units.<adapter>.``."""


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

    Raises:
        TypeError: if ``base_layer`` is not a supported layer type.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SeloraConfig) -> None:
        super().__init__()
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
            adapter, self.in_features, self.out_features, weight0
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

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the frozen weight with their base's ``merged_weight``.

        Args:
            safe_merge: check the merged weight for NaN / inf before writing it.
            adapter_names: the adapters to merge; the active ones if ``None``.

        Raises:
            RuntimeError: if an adapter's base of adaptation cannot be merged.
            ValueError: with ``safe_merge``, if the merged weight is not finite.
        """
        names = check_adapters_to_merge(self, adapter_names)
        for name in names:
            if name not in self.selora_units:
                continue
            unit = self.unit(name)
            if not unit.base.mergeable:
                raise RuntimeError(f"adapter {name!r}: base {unit.adapter.base!r} cannot be merged")
            weight = frozen_weight(self.get_base_layer())
            merged = unit.base.merged_weight(unit, weight.float())
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} is broken")
            weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight, undoing merges in reverse order (``unmerged_weight``)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.selora_units:
                continue
            unit = self.unit(name)
            weight = frozen_weight(self.get_base_layer())
            restored = unit.base.unmerged_weight(unit, weight.float())
            weight.copy_(restored.to(weight.dtype))

    def __repr__(self) -> str:
        """Prefix the module's repr with ``selora.`` as PEFT's layers do."""
        return "selora." + super().__repr__()
