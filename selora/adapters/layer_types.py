"""The layers selora wraps: which ones, how their weight reads, and the adapters' dtype.

``nn.Linear`` and Hugging Face's ``Conv1D`` (whose weight is stored
transposed) are wrapped; quantized linear layers (bitsandbytes and the like,
which subclass ``nn.Linear``) are recognised so that they can be refused with
a clear message instead of computing something else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "compute_dtype",
    "frozen_weight",
    "is_quantized_layer",
    "is_supported_layer",
    "quantized_layer_error",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype adapter arithmetic runs in for a layer of ``dtype``.

    float64 layers compute (and keep their adapter parameters) in float64;
    every other dtype (float32, bfloat16, float16) in float32.

    Args:
        dtype: the frozen layer's dtype.

    Returns:
        ``torch.float64`` or ``torch.float32``.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    conv: type[nn.Module] = Conv1D
    return conv


def is_supported_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is an ``nn.Linear`` or a Hugging Face ``Conv1D``.

    Args:
        module: any module.

    Returns:
        ``True`` for the layer types selora can wrap.
    """
    conv = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


_QUANTIZED_PACKAGES = (
    "bitsandbytes",
    "hqq",
    "optimum.quanto",
    "torchao",
    "awq",
    "auto_gptq",
    "gptqmodel",
)


def _from_package(cls: type, packages: tuple[str, ...]) -> bool:
    where = cls.__module__ or ""
    return any(where == p or where.startswith(p + ".") for p in packages)


def is_quantized_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is a quantized layer, which selora cannot adapt yet.

    Detected without importing any quantization library: the layer's class or
    its weight's class comes from a quantization package (bitsandbytes'
    ``Linear4bit`` / ``Linear8bitLt`` and their ``Params4bit`` / ``Int8Params``,
    HQQ, quanto, torchao, AWQ, GPTQ), or its weight is not a floating-point
    tensor. Such layers subclass ``nn.Linear``, so :func:`is_supported_layer`
    alone would accept them: 4-bit weights then fail at forward with a shape
    error and 8-bit ones merge silently wrong.

    Args:
        module: any module.

    Returns:
        ``True`` for a quantized layer.
    """
    if _from_package(type(module), _QUANTIZED_PACKAGES):
        return True
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        return not weight.is_floating_point() or _from_package(type(weight), _QUANTIZED_PACKAGES)
    return False


def quantized_layer_error(module: nn.Module, name: str) -> TypeError:
    """The error raised for a quantized target, naming the module and its type.

    Args:
        module: a layer for which :func:`is_quantized_layer` holds.
        name: its name in the model.

    Returns:
        The ``TypeError`` to raise.
    """
    cls = type(module)
    weight = getattr(module, "weight", None)
    stored = f", weight {weight.dtype}" if isinstance(weight, Tensor) else ""
    return TypeError(
        f"cannot adapt {name or 'the module'!r}: it is a quantized layer "
        f"({cls.__module__}.{cls.__qualname__}{stored}), which selora does not support yet; "
        "load the base model unquantized or leave this module out of target_modules"
    )


def frozen_weight(module: nn.Module) -> Tensor:
    r"""Return :math:`W_0` of a supported layer as ``(d_out, d_in)`` (a view, no copy).

    Args:
        module: an ``nn.Linear`` (weight ``(d_out, d_in)``) or a ``Conv1D``
            (weight ``(d_in, d_out)``).

    Returns:
        The weight, transposed for ``Conv1D``.
    """
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight if isinstance(module, nn.Linear) else weight.t()
