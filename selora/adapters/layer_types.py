"""The layers selora wraps: which ones, how their weight reads, and the adapters' dtype.

``nn.Linear`` and Hugging Face's ``Conv1D`` (whose weight is stored
transposed) are wrapped, and so are bitsandbytes' quantized ``Linear4bit`` and
``Linear8bitLt`` (see :mod:`selora.adapters.quantized`). Other quantized
linear layers (HQQ, quanto, torchao, AWQ, GPTQ, which subclass ``nn.Linear``
too) are recognised so that they can be refused with a clear message instead
of computing something else.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.layer_kinds import flat_weight, is_kind_layer, kind_refusal

__all__ = [
    "adaptable_layer_error",
    "compute_dtype",
    "frozen_weight",
    "is_adaptable_layer",
    "is_quantized_layer",
    "is_supported_layer",
    "is_unsupported_quantized_layer",
    "quantized_kind",
    "quantized_layer_error",
    "weight_shape",
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


def is_adaptable_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is a layer selora can wrap when targeted by name.

    The linear layers of :func:`is_supported_layer` (the only ones
    ``"all-linear"`` picks, as in PEFT) and ``nn.Embedding``, ``nn.Conv1d``,
    ``nn.Conv2d`` (:mod:`selora.adapters.layer_kinds`).

    Args:
        module: any module.

    Returns:
        ``True`` for the layer types selora can wrap.
    """
    return is_supported_layer(module) or is_kind_layer(module)


def adaptable_layer_error(module: nn.Module, name: str) -> TypeError | None:
    """The error for a (non-quantized) layer selora cannot wrap, naming it; ``None`` if it can.

    Args:
        module: the targeted module.
        name: its name in the model.

    Returns:
        The ``TypeError`` to raise, or ``None``.
    """
    where = name or "the module"
    if not is_adaptable_layer(module):
        return TypeError(
            f"selora adapts nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d and "
            f"nn.Conv2d; {where} is a {type(module).__name__}"
        )
    refusal = kind_refusal(module)
    return None if refusal is None else TypeError(f"cannot adapt {where!r}: {refusal}")


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
    """Tell whether ``module`` is quantized (adapted or refused: see :func:`quantized_kind`).

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


def quantized_kind(module: nn.Module) -> str | None:
    """Name the kind of a quantized layer selora adapts, or ``None``.

    ``"bnb_4bit"``: a bitsandbytes ``Linear4bit`` whose weight is a quantized
    ``Params4bit``; ``"bnb_8bit"``: a ``Linear8bitLt`` whose weight is an
    ``int8`` ``Int8Params`` (``has_fp16_weights=False``, the QLoRA / inference
    form). Anything else (a bitsandbytes layer not quantized yet, another
    library's layer, a float layer) gives ``None``. bitsandbytes is imported
    only when the layer's class comes from it.

    Args:
        module: any module.

    Returns:
        The kind, or ``None``.
    """
    if not _from_package(type(module), ("bitsandbytes",)):
        return None
    bnn: Any = importlib.import_module("bitsandbytes.nn")  # untyped; only if the class is bnb's
    weight = getattr(module, "weight", None)
    if isinstance(module, bnn.Linear4bit) and isinstance(weight, bnn.Params4bit):
        quantized = bool(getattr(weight, "bnb_quantized", False))
        return "bnb_4bit" if quantized and weight.quant_state is not None else None
    if isinstance(module, bnn.Linear8bitLt) and isinstance(weight, bnn.Int8Params):
        return "bnb_8bit" if weight.dtype == torch.int8 else None
    return None


def is_unsupported_quantized_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is quantized in a form selora does not adapt (it is refused).

    Args:
        module: any module.

    Returns:
        ``True`` if :func:`is_quantized_layer` holds and :func:`quantized_kind` is ``None``.
    """
    return is_quantized_layer(module) and quantized_kind(module) is None


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(d_out, d_in)`` of a supported (maybe quantized) layer.

    A quantized weight is stored packed, so its shape is read from the layer's
    ``out_features`` / ``in_features``.

    Args:
        module: a supported layer.

    Returns:
        ``(d_out, d_in)``.
    """
    if quantized_kind(module) is not None:
        layer: Any = module
        return int(layer.out_features), int(layer.in_features)
    d_out, d_in = frozen_weight(module).shape
    return int(d_out), int(d_in)


def quantized_layer_error(module: nn.Module, name: str) -> TypeError:
    """The error raised for an unsupported quantized target, naming the module and its type.

    Args:
        module: a layer for which :func:`is_unsupported_quantized_layer` holds.
        name: its name in the model.

    Returns:
        The ``TypeError`` to raise.
    """
    cls = type(module)
    weight = getattr(module, "weight", None)
    stored = f", weight {weight.dtype}" if isinstance(weight, Tensor) else ""
    return TypeError(
        f"cannot adapt {name or 'the module'!r}: it is a quantized layer "
        f"({cls.__module__}.{cls.__qualname__}{stored}), which selora does not support "
        "(it adapts bitsandbytes' Linear4bit and Linear8bitLt once quantized, i.e. moved "
        "to a device); load the base model unquantized or leave this module out of "
        "target_modules"
    )


def frozen_weight(module: nn.Module) -> Tensor:
    r"""Return :math:`W_0` of a supported layer as ``(d_out, d_in)`` (a view, no copy).

    Args:
        module: an ``nn.Linear`` (weight ``(d_out, d_in)``), a ``Conv1D``
            (weight ``(d_in, d_out)``), an ``nn.Embedding`` or an ``nn.Conv1d`` /
            ``nn.Conv2d`` (see :func:`~selora.adapters.layer_kinds.flat_weight`).

    Returns:
        The weight, transposed for ``Conv1D`` and ``nn.Embedding``, flattened
        to ``(out, in * prod(kernel))`` for a convolution.
    """
    flat = flat_weight(module)  # nn.Embedding, nn.Conv1d / nn.Conv2d
    if flat is not None:
        return flat
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight if isinstance(module, nn.Linear) else weight.t()
