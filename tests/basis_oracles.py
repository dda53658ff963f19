"""Independent float64 oracles of every built-in basis (numpy, scipy, PyWavelets, ptwt).

Shared by the basis tests and the adapter tests (``adapters_testkit``): each maps a
spectrum ``(..., m, n)`` in selora's layout to the matrix the basis must give.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ptwt
import pywt
import scipy.fft
import torch

# The design fixes which wavelet each registered wavelet basis is.
REGISTERED_WAVELETS = {"haar": "haar", "db4": "db4", "bior": "bior2.2", "coif": "coif1"}
# Any PyWavelets discrete name resolves through get_basis; these include filters
# far longer than small sizes (dmey has 62 taps, db10 20, sym8 and coif3 16/18).
EXTRA_WAVELETS = ["sym8", "coif3", "bior4.4", "dmey", "db10", "sym2", "rbio3.1", "bior1.3"]


def idwt2_oracle(wavelet: str) -> Callable[[np.ndarray], np.ndarray]:
    def oracle(spectrum: np.ndarray) -> np.ndarray:
        hm, hn = spectrum.shape[-2] // 2, spectrum.shape[-1] // 2
        a, h = spectrum[..., :hm, :hn], spectrum[..., :hm, hn:]
        v, d = spectrum[..., hm:, :hn], spectrum[..., hm:, hn:]
        return pywt.idwt2((a, (h, v, d)), wavelet, mode="periodization", axes=(-2, -1))

    return oracle


def wavedec2_list(spectrum: np.ndarray, levels: int) -> list:
    """The ``wavedec2`` list of a spectrum in selora's layout (each level [[a, h], [v, d]])."""
    m, n = spectrum.shape[-2:]
    details = []
    for level in range(1, levels + 1):
        rows, cols = m >> (level - 1), n >> (level - 1)
        hm, hn = rows // 2, cols // 2
        block = spectrum[..., :rows, :cols]
        details.append((block[..., :hm, hn:], block[..., hm:, :hn], block[..., hm:, hn:]))
    return [spectrum[..., : m >> levels, : n >> levels], *details[::-1]]


def waverec2_oracle(wavelet: str, levels: int) -> Callable[[np.ndarray], np.ndarray]:
    def oracle(spectrum: np.ndarray) -> np.ndarray:
        coefficients = wavedec2_list(spectrum, levels)
        return pywt.waverec2(coefficients, wavelet, mode="periodization", axes=(-2, -1))

    return oracle


def ptwt_boundary_oracle(wavelet: str, levels: int) -> Callable[[np.ndarray], np.ndarray]:
    """ptwt's own ``MatrixWaverec2`` (its matrix transforms swap PyWavelets' h and v)."""

    def oracle(spectrum: np.ndarray) -> np.ndarray:
        a, *details = wavedec2_list(spectrum, levels)
        batch = spectrum.shape[:-2]
        flat = [torch.from_numpy(np.ascontiguousarray(a)).reshape(-1, *a.shape[-2:])]
        for h, v, d in details:
            flat.append(
                tuple(
                    torch.from_numpy(np.ascontiguousarray(c)).reshape(-1, *c.shape[-2:])
                    for c in (v, h, d)
                )
            )
        out = ptwt.MatrixWaverec2(wavelet)(tuple(flat))
        return out.reshape(*batch, *spectrum.shape[-2:]).numpy()

    return oracle


# The registered variants: (wavelet, levels, boundary).
REGISTERED_VARIANTS = {
    "db4-l2": ("db4", 2, "periodization"),
    "db2-boundary": ("db2", 1, "orthogonal"),
}

ORACLES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "fft": lambda f: np.fft.ifft2(f, axes=(-2, -1)).real,
    "dct": lambda f: scipy.fft.idctn(f, norm="ortho", axes=(-2, -1)),
    **{name: idwt2_oracle(wavelet) for name, wavelet in REGISTERED_WAVELETS.items()},
    **{name: idwt2_oracle(name) for name in EXTRA_WAVELETS},
    "db4-l2": waverec2_oracle("db4", 2),
    "db2-boundary": ptwt_boundary_oracle("db2", 1),
}
