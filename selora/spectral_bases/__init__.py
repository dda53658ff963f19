"""Spectral bases: the registry of inverse transforms and sparse spectra.

This subpackage knows nothing about adapters or models. Importing it
registers the built-in bases ``fft``, ``dct``, ``haar``, ``db4``, ``bior``
(bior2.2) and ``coif`` (coif1), and two wavelet variants: ``db4-l2`` (two
periodized levels) and ``db2-boundary`` (ptwt's orthogonal boundary
filters); every other PyWavelets discrete wavelet name resolves through
:func:`get_basis` as well, with the options ``levels`` and ``boundary``.
"""

from selora.spectral_bases.basis_spec import (
    BasisNotSavableError,
    BasisSpec,
    basis_spec,
    build_basis,
)
from selora.spectral_bases.cosine import CosineTransform
from selora.spectral_bases.fourier import FourierTransform
from selora.spectral_bases.registry import (
    InverseTransform,
    UnknownBasisError,
    basis_name,
    get_basis,
    list_bases,
    register_basis,
    unregister_basis,
)
from selora.spectral_bases.spectrum import (
    SparseSpectrum,
    SpectrumInit,
    SpectrumScale,
    coefficient_budget,
    kaiming_variance,
    scale_factor,
    spectral_locations,
)
from selora.spectral_bases.wavelet import (
    BiorthogonalTransform,
    CoifletTransform,
    Daubechies2BoundaryTransform,
    Daubechies4Transform,
    Daubechies4TwoLevelTransform,
    HaarTransform,
    WaveletBoundary,
    WaveletName,
    WaveletTransform,
)

__all__ = [
    "BasisNotSavableError",
    "BasisSpec",
    "BiorthogonalTransform",
    "CoifletTransform",
    "CosineTransform",
    "Daubechies2BoundaryTransform",
    "Daubechies4Transform",
    "Daubechies4TwoLevelTransform",
    "FourierTransform",
    "HaarTransform",
    "InverseTransform",
    "SparseSpectrum",
    "SpectrumInit",
    "SpectrumScale",
    "UnknownBasisError",
    "WaveletBoundary",
    "WaveletName",
    "WaveletTransform",
    "basis_name",
    "basis_spec",
    "build_basis",
    "coefficient_budget",
    "get_basis",
    "kaiming_variance",
    "list_bases",
    "register_basis",
    "scale_factor",
    "spectral_locations",
    "unregister_basis",
]
