"""selora: sparse spectral re-parameterization of LoRA-style adapters.

The two factors of an adapter are each the inverse transform of a sparse set
of learnable spectral coefficients (FoRA, SeLoRA). Bases (Fourier, cosine,
wavelets) live in :mod:`selora.spectral_bases`; bases of adaptation (LoRA,
DoRA, HiRA, X-LoRA) in :mod:`selora.adapters`.
"""

from selora.adapters import (
    AdaptationBase,
    SpectralAdapter,
    SpectralLayer,
    UnknownAdapterBaseError,
    adapter_layers,
    disable_adapters,
    get_adapter_base,
    inject,
    list_adapter_bases,
    merge,
    parameter_summary,
    print_trainable_parameters,
    register_base,
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

__version__ = "0.1.0"

__all__ = [
    "AdaptationBase",
    "InverseTransform",
    "SparseSpectrum",
    "SpectralAdapter",
    "SpectralLayer",
    "UnknownAdapterBaseError",
    "UnknownBasisError",
    "__version__",
    "adapter_layers",
    "disable_adapters",
    "get_adapter_base",
    "get_basis",
    "inject",
    "list_adapter_bases",
    "list_bases",
    "merge",
    "parameter_summary",
    "print_trainable_parameters",
    "register_base",
    "register_basis",
    "trainable_parameters",
    "unload",
    "unmerge",
    "unregister_base",
    "unregister_basis",
]
