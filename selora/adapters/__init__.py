"""Bases of adaptation on top of the spectral bases: config, layers, model surgery, checkpoints.

Importing it registers the built-in bases ``lora``, ``dora`` and ``hira``.
"""

from selora.adapters import dora, hira, lora  # noqa: F401 - registers the built-in bases
from selora.adapters.config import DEFAULT_SPARSE_RATIO, SpectralAdapter
from selora.adapters.diagnostics import (
    check_finite,
    parameter_summary,
    print_trainable_parameters,
    set_finite_checks,
    trainable_parameters,
)
from selora.adapters.factors import DenseFactor
from selora.adapters.io import AdapterCheckpointError, load_adapter, read_adapter, save_adapter
from selora.adapters.layer import SpectralLayer
from selora.adapters.model import (
    active_adapters,
    adapter_config,
    adapter_layers,
    delete_adapter,
    disable_adapters,
    inject,
    merge,
    set_adapter,
    unload,
    unmerge,
)
from selora.adapters.registry import (
    AdaptationBase,
    UnknownAdapterBaseError,
    Update,
    get_adapter_base,
    list_adapter_bases,
    register_base,
    unregister_base,
)
from selora.adapters.routing import BASE_NAME
from selora.adapters.unit import AdapterUnit
from selora.adapters.weighted import add_weighted_adapter

__all__ = [
    "BASE_NAME",
    "DEFAULT_SPARSE_RATIO",
    "AdaptationBase",
    "AdapterCheckpointError",
    "AdapterUnit",
    "DenseFactor",
    "SpectralAdapter",
    "SpectralLayer",
    "UnknownAdapterBaseError",
    "Update",
    "active_adapters",
    "adapter_config",
    "adapter_layers",
    "add_weighted_adapter",
    "check_finite",
    "delete_adapter",
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
    "set_adapter",
    "set_finite_checks",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unregister_base",
]
