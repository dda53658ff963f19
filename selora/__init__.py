"""selora: sparse spectral re-parameterization of LoRA-style adapters.

The two factors of an adapter are each the inverse transform of a sparse set
of learnable spectral coefficients (FoRA, SeLoRA). Bases (Fourier, cosine,
wavelets) live in :mod:`selora.spectral_bases`; bases of adaptation (LoRA,
DoRA, HiRA, X-LoRA) in :mod:`selora.adapters`.
"""

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
    "InverseTransform",
    "SparseSpectrum",
    "UnknownBasisError",
    "__version__",
    "get_basis",
    "list_bases",
    "register_basis",
    "unregister_basis",
]
