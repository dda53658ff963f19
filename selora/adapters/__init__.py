"""Bases of adaptation on top of the spectral bases: config, layers, model surgery, checkpoints.

Importing it registers the built-in bases ``lora``, ``dora`` and ``hira``.
"""

from selora.adapters import dora, hira, lora  # noqa: F401 - registers the built-in bases
from selora.adapters.config import DEFAULT_SPARSE_RATIO, SpectralAdapter
from selora.adapters.layer import AdapterUnit, DenseFactor, SpectralLayer
from selora.adapters.model import (
    adapter_config,
    adapter_layers,
    disable_adapters,
    inject,
    merge,
    parameter_summary,
    print_trainable_parameters,
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

__all__ = [
    "DEFAULT_SPARSE_RATIO",
    "AdaptationBase",
    "AdapterUnit",
    "DenseFactor",
    "SpectralAdapter",
    "SpectralLayer",
    "UnknownAdapterBaseError",
    "adapter_config",
    "adapter_layers",
    "disable_adapters",
    "get_adapter_base",
    "inject",
    "list_adapter_bases",
    "merge",
    "parameter_summary",
    "print_trainable_parameters",
    "register_base",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unregister_base",
]
