"""Build bitsandbytes 4-bit / 8-bit layers on the CPU from float ``nn.Linear`` layers.

bitsandbytes quantizes a weight when it is moved to a device: ``Params4bit`` /
``Int8Params`` hold the float weight until ``.to(device)`` (``.cpu()`` here),
which quantizes it in place. The helpers copy the float layer's weight and
bias, so a test knows the float weight the quantized one came from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def quantize_4bit(
    linear: nn.Linear, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32
) -> Any:
    """A ``bnb.nn.Linear4bit`` quantized on the CPU from ``linear``'s weight."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type=quant_type, module=layer
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.cpu()  # quantizes


def quantize_8bit(linear: nn.Linear) -> Any:
    """A ``bnb.nn.Linear8bitLt`` (int8 weight, ``has_fp16_weights=False``) quantized on the CPU."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
    )
    layer.weight = bnb.nn.Int8Params(
        linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.cpu()  # quantizes


QUANTIZERS = {"4bit": quantize_4bit, "8bit": quantize_8bit}


def quantize_linears(
    model: nn.Module, kind: str, skip: tuple[str, ...] = ("lm_head",)
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but ``skip``) by a quantized copy, in place."""
    make = QUANTIZERS[kind]
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rpartition(".")[2] not in skip:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = make(module)
            # bitsandbytes' AVX512-BF16 CPU layout needs in_features >= 64 and out_features
            # divisible by 32 (it fails on the tiny 16-wide k_proj); the tiny models use the
            # standard layout (tests/adapters/test_quantized.py covers the CPU one).
            layer.support_avx512bf16_for_cpu = False
            setattr(parent, child, layer)
    return model
