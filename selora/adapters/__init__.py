"""Bases of adaptation on top of the spectral bases: config, layers, model surgery, checkpoints.

Importing it registers the built-in bases ``lora``, ``dora``, ``hira`` and ``xlora``.
"""

from selora.adapters import dora, hira, lora, xlora  # noqa: F401 - registers the built-in bases
from selora.adapters.config import DEFAULT_SPARSE_RATIO, SpectralAdapter
from selora.adapters.io import AdapterCheckpointError, load_adapter, read_adapter, save_adapter
from selora.adapters.layer import AdapterUnit, DenseFactor, SpectralLayer
from selora.adapters.model import (
    adapter_config,
    adapter_layers,
    check_finite,
    disable_adapters,
    inject,
    merge,
    parameter_summary,
    print_trainable_parameters,
    set_finite_checks,
    trainable_parameters,
    unload,
    unmerge,
)
from selora.adapters.registry import (
    AdaptationBase,
    UnknownAdapterBaseError,
    get_adapter_base,
    list_adapter_bases,
    register_base,
    unregister_base,
)
from selora.adapters.xlora import XLoRA, XLoRAClassifier, XLoRALayer, get_xlora_classifier

__all__ = [
    "DEFAULT_SPARSE_RATIO",
    "AdaptationBase",
    "AdapterCheckpointError",
    "AdapterUnit",
    "DenseFactor",
    "SpectralAdapter",
    "SpectralLayer",
    "UnknownAdapterBaseError",
    "XLoRA",
    "XLoRAClassifier",
    "XLoRALayer",
    "adapter_config",
    "adapter_layers",
    "check_finite",
    "disable_adapters",
    "get_adapter_base",
    "inject",
    "list_adapter_bases",
    "load_adapter",
    "merge",
    "parameter_summary",
    "print_trainable_parameters",
    "read_adapter",
    "register_base",
    "save_adapter",
    "set_finite_checks",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unregister_base",
    "get_xlora_classifier",
]
