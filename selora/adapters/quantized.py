r"""Quantized base layers: bitsandbytes ``Linear4bit`` (QLoRA) and ``Linear8bitLt``.

:class:`~selora.SpectralLayer` wraps these like an ``nn.Linear``; only three
things differ, and they live here:

* **Forward.** The layer computes its own quantized matmul
  (:math:`\hat W_0 x + b`, with :math:`\hat W_0` the dequantized weight) and
  the adapters add their update to that output, as for a float layer. LoRA
  never reads :math:`W_0`, so it costs no dequantization; DoRA (row norms) and
  HiRA (Hadamard product) read :math:`\hat W_0`, dequantized once per call
  (:func:`forward_weight0`) and dropped when the call returns (HiRA's
  autograd graph holds it until the backward pass, as any product with it).
* **Merge.** :func:`read_weight` dequantizes, the layer adds the update in its
  compute dtype, and :func:`write_weight` requantizes into a new weight of the
  same kind and options (4-bit: ``quant_type``, ``blocksize``, nested
  statistics, storage; 8-bit: row-wise absmax), on the same device, as
  Hugging Face PEFT does for LoRA. Unmerging recovers :math:`W_0` from the
  dequantized merged weight and requantizes it. Both steps round: a merge
  changes outputs by the quantization error of :math:`W_0 + \Delta W`, and a
  merge / unmerge round trip leaves :math:`W_0` off by up to one quantization
  step per entry (``docs/concepts.md``, Numerics, gives measured errors;
  they match PEFT's LoRA on the same layer).
* **Shape.** The packed weight's shape is not :math:`(d_{out}, d_{in})`; the
  layer's ``out_features`` / ``in_features`` are.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight into a CPU
layout (bfloat16 block scales) at its first eval forward; :func:`read_weight`
undoes that on a copy of the quantization state, so the layer is left as it
was, and :func:`write_weight` requantizes in the weight's original dtype.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.layer_types import frozen_weight, quantized_kind

__all__ = ["forward_weight0", "read_weight", "write_weight"]


def _dequantize_4bit(module: nn.Module) -> Tensor:
    import bitsandbytes.functional as bnf

    weight: Any = module.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU layout (AVX512-BF16): back to the standard one, on a copy.
        data, state = bnf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    out: Tensor = bnf.dequantize_4bit(data, state)
    return out


def _int8_statistics(module: nn.Module) -> Tensor:
    """The row scales of an 8-bit weight: the weight's until its first forward, then the state's."""
    layer: Any = module
    weight = layer.weight
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    if scb is None:
        raise RuntimeError("the Linear8bitLt layer holds no row statistics (SCB)")
    assert isinstance(scb, Tensor)
    return scb


def _dequantize_8bit(module: nn.Module) -> Tensor:
    import bitsandbytes.functional as bnf

    weight: Any = module.weight
    scb = _int8_statistics(module)
    out: Tensor = bnf.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return out


def read_weight(module: nn.Module) -> Tensor:
    r"""Return :math:`W_0` of a supported layer as ``(d_out, d_in)``, dequantized if quantized.

    A float layer's weight is returned as a view (no copy, as
    :func:`~selora.adapters.layer_types.frozen_weight`); a quantized layer's is
    a new float tensor (4-bit: the dtype the weight was quantized from; 8-bit:
    float32) that nothing else keeps.

    Args:
        module: an ``nn.Linear``, ``Conv1D``, or a quantized layer of a
            supported kind (:func:`~selora.adapters.layer_types.quantized_kind`).

    Returns:
        ``(d_out, d_in)``.
    """
    kind = quantized_kind(module)
    if kind is None:
        return frozen_weight(module)
    with torch.no_grad():
        return _dequantize_4bit(module) if kind == "bnb_4bit" else _dequantize_8bit(module)


def write_weight(module: nn.Module, weight: Tensor) -> None:
    """Store ``weight`` ``(d_out, d_in)`` as the layer's weight, requantizing a quantized layer.

    A float layer's weight is overwritten in place (cast to its dtype). A
    quantized layer gets a new weight of the same kind and options, quantized
    from ``weight`` on the layer's device (as PEFT does when it merges LoRA).

    Args:
        module: a supported layer.
        weight: the new weight.
    """
    kind = quantized_kind(module)
    if kind is None:
        frozen_weight(module).copy_(weight)
        return
    bnn: Any = importlib.import_module("bitsandbytes.nn")  # untyped
    layer: Any = module
    old = layer.weight
    device = old.device
    if kind == "bnb_4bit":
        state = old.quant_state
        packed = getattr(state, "packing_format_for_cpu", False)  # bfloat16 while packed
        dtype = state.original_dtype if packed else state.dtype
        source = weight.detach().to(device="cpu", dtype=dtype).contiguous()
        new = bnn.Params4bit(
            source,
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        ).to(device)
        layer.weight = new
        return
    source = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    layer.weight = bnn.Int8Params(source, requires_grad=False, has_fp16_weights=False).to(device)
    layer.state.reset_grads()  # the next forward takes the new statistics from the weight


def _meta_placeholder(module: nn.Module) -> Tensor:
    layer: Any = module
    return torch.empty((int(layer.out_features), int(layer.in_features)), device="meta")


def forward_weight0(base_layer: nn.Module, units: Iterable[nn.Module | None]) -> Tensor:
    r"""Return the :math:`W_0` a quantized layer's forward passes to its units.

    The dequantized weight if a unit's base of adaptation reads it
    (``reads_weight0``: DoRA, HiRA, a user's base); otherwise (LoRA alone) a
    ``meta`` tensor of the right shape, so the call dequantizes nothing.

    Args:
        base_layer: a quantized layer of a supported kind.
        units: the units the call uses (``None`` entries are skipped).

    Returns:
        ``(d_out, d_in)``.
    """
    for unit in units:
        base = getattr(unit, "base", None) if unit is not None else None
        if base is not None and getattr(base, "reads_weight0", True):
            return read_weight(base_layer)
    return _meta_placeholder(base_layer)
