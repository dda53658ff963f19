r"""The PEFT tuner layer of the bridge: selora's one layer, marked as a PEFT tuner layer.

:class:`SeloraLinear` is :class:`~selora.SpectralLayer` (the layer
:func:`selora.inject` uses too: several named adapter units around one frozen
layer, with forward, merge, unmerge, safe merge, disable, delete and mixed
batches written once) plus PEFT's ``BaseTunerLayer`` mixin, so that PEFT's
model-level code (``set_adapter``, ``merge_and_unload``, ``delete_adapter``,
``disable_adapter``, saving) finds and drives it. An adapter therefore
computes the same numbers through PEFT as through :func:`selora.inject`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from selora.adapters.layer import UNITS_ATTR, SpectralLayer
from selora.adapters.layer_types import frozen_weight

if TYPE_CHECKING:
    from selora.integrations.peft import SeloraConfig

__all__ = ["UNITS_ATTR", "SeloraLayer", "SeloraLinear"]


class SeloraLayer(BaseTunerLayer):
    """PEFT tuner-layer mixin for selora adapters (the ``tuner_layer_cls`` of the bridge).

    Attributes:
        adapter_layer_names: the containers PEFT treats as trainable adapter
            weights, keyed by adapter name.
        other_param_names: adapter-keyed containers of non-trainable state (none).
    """

    adapter_layer_names: tuple[str, ...] = (UNITS_ATTR,)
    other_param_names: tuple[str, ...] = ()


class SeloraLinear(SpectralLayer, SeloraLayer):  # type: ignore[misc]  # bias: Tensor | None
    """A :class:`~selora.SpectralLayer` that PEFT recognises as one of its tuner layers.

    Args:
        base_layer: the layer to adapt (see :class:`~selora.SpectralLayer`).
        adapter_name: the name of the first adapter.
        config: its :class:`~selora.integrations.peft.SeloraConfig`.
        name: the module's name in its model, for messages.

    Raises:
        TypeError: if ``base_layer`` is not a supported layer type (a quantized
            one other than bitsandbytes' quantized ``Linear4bit`` / ``Linear8bitLt``).
        ValueError: if the adapter's budget does not fit this layer.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SeloraConfig, *, name: str = ""
    ) -> None:
        SpectralLayer.__init__(self, base_layer, name=name)
        self.update_layer(adapter_name, config)
        self.set_adapter(adapter_name, inference_mode=bool(config.inference_mode))

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Merge as :meth:`~selora.SpectralLayer.merge`, with PEFT's warnings.

        PEFT's layers warn when asked to merge adapters that are merged already
        (``"All adapters are already merged, nothing to do."``, or which ones
        were merged before); so does this one, through PEFT's own
        ``check_adapters_to_merge``.

        Args:
            safe_merge: check before writing.
            adapter_names: the adapters to merge; the active ones if ``None``.

        Raises:
            TypeError: if ``adapter_names`` is a string (PEFT's rule).
            RuntimeError: if a base of adaptation cannot be merged.
            ValueError: with ``safe_merge``, if a check fails.
        """
        names = check_adapters_to_merge(
            self, None if adapter_names is None else list(adapter_names)
        )
        if not names:
            return
        SpectralLayer.merge(self, safe_merge=safe_merge, adapter_names=names)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """Move one adapter to the frozen weight's device, keeping its dtype.

        PEFT's version also casts to the base layer's dtype; selora keeps the
        dtype its units were built with (``autocast_adapter_dtype``) and casts
        the formed factors to the input's dtype in the forward pass.

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

    def __repr__(self) -> str:
        """Prefix the module's repr with ``selora.`` as PEFT's layers do."""
        return "selora." + super().__repr__()
