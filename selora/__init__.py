"""selora: sparse spectral re-parameterization of LoRA-style adapters.

The two factors of an adapter are each the inverse transform of a sparse set
of learnable spectral coefficients (FoRA, SeLoRA). Bases (Fourier, cosine,
wavelets) live in :mod:`selora.spectral_bases`; bases of adaptation (LoRA,
DoRA, HiRA) in :mod:`selora.adapters`; X-LoRA, a model-level mixture of named
adapters, in :mod:`selora.xlora`.
"""

from selora import xlora
from selora.adapters import (
    AdaptationBase,
    AdapterCheckpointError,
    SpectralAdapter,
    SpectralLayer,
    UnknownAdapterBaseError,
    active_adapters,
    adapter_config,
    adapter_layers,
    add_weighted_adapter,
    check_finite,
    delete_adapter,
    disable_adapters,
    get_adapter_base,
    inject,
    list_adapter_bases,
    load_adapter,
    merge,
    parameter_summary,
    print_trainable_parameters,
    read_adapter,
    register_base,
    save_adapter,
    set_adapter,
    set_finite_checks,
    trainable_parameters,
    unload,
    unmerge,
    unregister_base,
)
from selora.spectral_bases import (
    InverseTransform,
    SparseSpectrum,
    UnknownBasisError,
    get_basis,
    list_bases,
    register_basis,
    unregister_basis,
)
from selora.xlora import XLoRAConfig, XLoRAModel

__version__ = "0.1.0"

__all__ = [
    "AdaptationBase",
    "AdapterCheckpointError",
    "InverseTransform",
    "SparseSpectrum",
    "SpectralAdapter",
    "SpectralLayer",
    "UnknownAdapterBaseError",
    "UnknownBasisError",
    "XLoRAConfig",
    "XLoRAModel",
    "__version__",
    "active_adapters",
    "adapter_config",
    "adapter_layers",
    "add_weighted_adapter",
    "check_finite",
    "delete_adapter",
    "disable_adapters",
    "get_adapter_base",
    "get_basis",
    "inject",
    "list_adapter_bases",
    "list_bases",
    "load_adapter",
    "merge",
    "parameter_summary",
    "print_trainable_parameters",
    "read_adapter",
    "register_base",
    "register_basis",
    "save_adapter",
    "set_adapter",
    "set_finite_checks",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unregister_base",
    "unregister_basis",
    "xlora",
]
