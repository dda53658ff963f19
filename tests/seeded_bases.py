"""A user basis with a constructor option, for the checkpoint tests of both front doors.

Import it as ``from seeded_bases import rotation_basis`` (pytest puts ``tests/`` on
``sys.path``). Each call gives a fresh class, so two tests can register it under
their own names without sharing the ``name`` that ``register_basis`` sets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selora import InverseTransform


def rotation_basis() -> type[InverseTransform]:
    """A new class of ``T(F) = F Q``, Q orthogonal, drawn per width from ``seed`` (declared)."""

    class Rotation(InverseTransform):
        orthonormal = True

        def __init__(self, seed: int = 0) -> None:
            self.seed = seed

        def options(self) -> dict[str, Any]:
            return {"seed": self.seed}

        def inverse(self, spectrum: Tensor) -> Tensor:
            n = spectrum.shape[-1]
            gen = torch.Generator().manual_seed(self.seed * 1000 + n)
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            return spectrum @ q.to(spectrum.dtype)

    return Rotation
