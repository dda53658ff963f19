r"""The layer's two routed forwards: mixed batches and per-token mixtures.

Both take their routing from the call (:mod:`selora.adapters.routing`), never
from state on the shared layer, and compute every adapter's update against the
frozen :math:`W_0` as the plain forward does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from selora.adapters.layer_types import frozen_weight
from selora.adapters.quantized import forward_weight0, read_weight
from selora.adapters.routing import BASE_NAME, Mixture

if TYPE_CHECKING:
    from selora.adapters.layer import SpectralLayer

__all__ = ["mixed_batch_forward", "mixture_forward"]


def mixture_forward(
    layer: SpectralLayer, x: Tensor, mixture: Mixture, *args: Any, **kwargs: Any
) -> Tensor:
    r"""Return :math:`W_0 x + b + \sum_i g_i(x)\,(f_i(x) - (W_0 x + b))` (see :class:`Mixture`).

    Raises:
        ValueError: while an adapter is merged (the frozen output would hold it), or on a
            convolution layer.
    """
    if layer.merged_adapters:
        raise ValueError(
            f"{layer.name or 'this layer'}: cannot mix adapters while {layer.merged_adapters} "
            "are merged; unmerge first"
        )
    if layer.kind.label == "conv":  # the gates are per token, features on the last axis
        raise ValueError(
            f"{layer.name or 'this layer'}: per-token adapter mixtures are not supported on "
            "convolution layers"
        )
    base_layer = layer._modules["base_layer"]
    assert base_layer is not None
    base_out: Tensor = base_layer(x, *args, **kwargs)
    units = layer.selora_units._modules
    held = [(i, units[n]) for i, n in enumerate(mixture.names) if units.get(n) is not None]
    if not held:
        return base_out
    gates = mixture.gates(layer, x)
    if layer.quantized:
        weight0 = forward_weight0(base_layer, [u for _, u in held])
    else:
        weight0 = frozen_weight(base_layer)
    bias = getattr(base_layer, "bias", None)
    out = base_out
    for i, unit in held:
        assert unit is not None
        delta = unit.delta(x, base_out, weight0, bias)  # type: ignore[operator]
        out = out + gates[..., i : i + 1].to(delta.dtype) * delta
    return out


def mixed_batch_forward(
    layer: SpectralLayer, x: Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
) -> Tensor:
    """Route row ``i`` of ``x`` through adapter ``adapter_names[i]`` (PEFT's mixed batch).

    Raises:
        ValueError: in training mode, while merged, or for a length that differs
            from the batch.
    """
    where = layer.name or "this layer"
    if layer.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if layer.merged_adapters:
        raise ValueError(
            f"{where}: Cannot pass `adapter_names` when there are merged adapters, please "
            "call `unmerge` first."
        )
    if x.ndim == 0 or len(adapter_names) != x.shape[0]:
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {x.shape[0] if x.ndim else 0} respectively."
        )
    base_layer = layer.get_base_layer()
    base_out: Tensor = base_layer(x, *args, **kwargs)
    units = [layer.selora_units._modules.get(n) for n in dict.fromkeys(adapter_names)]
    weight0 = forward_weight0(base_layer, units) if layer.quantized else read_weight(base_layer)
    bias = getattr(base_layer, "bias", None)
    out = base_out.clone()
    for name in dict.fromkeys(adapter_names):
        if name == BASE_NAME or name not in layer.selora_units:
            continue
        rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
        unit = layer.unit(name)
        out[rows] = unit(x[rows], base_out[rows], weight0, bias).to(out.dtype)
    return out
