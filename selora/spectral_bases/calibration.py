r"""Putting a spectrum's matrix on a dense weight's scale: Kaiming variance and the constant c.

A :class:`~selora.SparseSpectrum` computes :math:`M = c\,T(F)`. This module
gives the variance a new factor is calibrated to (:func:`kaiming_variance`)
and the constant :math:`c` (:func:`scale_factor`) that puts the coefficients
on LoRA's scale; ``docs/concepts.md`` derives both.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, get_args

import torch
from torch import Tensor

from selora.spectral_bases.registry import InverseTransform

__all__ = ["SpectrumScale", "check_scale", "kaiming_variance", "on_cpu", "scale_factor"]

SpectrumScale = Literal["lora", "paper"]
r"""How a :class:`SparseSpectrum` scales its matrix.

* ``"lora"`` (the default): :math:`M = c\,T(F)` with
  :math:`c = \sqrt{mn / E}`, :math:`E` the basis' energy on :math:`\Omega`
  (:meth:`~selora.InverseTransform.active_energy`). The coefficients live on
  a dense LoRA factor's scale: one Adam step of size ``lr`` moves the
  matrix's entries by about ``lr``, so LoRA's learning rate and weight decay
  carry over to every basis and budget.
* ``"paper"``: :math:`M = T(F)` (:math:`c = 1`), FoRA's eq. 3 as written; the
  Kaiming gain is applied to the coefficients at init only. Checkpoints saved
  before the option existed load with it.

Both give the same matrix at init for the same random draws.
"""

_SCALES: tuple[str, ...] = get_args(SpectrumScale)


def kaiming_variance(fan_in: int) -> float:
    r"""Variance of torch's default ``nn.Linear`` weight init for a given fan-in.

    ``nn.Linear`` draws :math:`W_{ij} \sim U(-b, b)` with :math:`b = 1/\sqrt{n}`
    (Kaiming-uniform with :math:`a = \sqrt 5`), so
    :math:`\operatorname{Var} W_{ij} = b^2 / 3 = 1 / (3 n)`.

    Args:
        fan_in: the number of input features ``n``.

    Returns:
        :math:`1 / (3 n)`.
    """
    return 1.0 / (3.0 * fan_in)


def on_cpu() -> contextlib.AbstractContextManager[object]:
    """Make the CPU the default device for a computation on constants.

    Under ``with torch.device("meta")`` (a model built without memory), a basis
    building its constants with factory functions would otherwise make them on
    the meta device, where they hold no values.

    Returns:
        A context manager: ``torch.device("cpu")``, or a no-op where the CPU is
        the default already.
    """
    if torch.get_default_device().type == "cpu":
        return contextlib.nullcontext()
    return torch.device("cpu")


def check_scale(scale: object) -> SpectrumScale:
    """Return ``scale`` if it is a :data:`SpectrumScale`.

    Args:
        scale: the value given.

    Returns:
        ``scale``.

    Raises:
        ValueError: naming the allowed values.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {list(_SCALES)}; got {scale!r}")
    return scale  # type: ignore[return-value]


def scale_factor(
    basis: InverseTransform, shape: tuple[int, int], indices: Tensor, scale: SpectrumScale = "lora"
) -> float:
    r"""Return the constant :math:`c` of a spectrum, :math:`M = c\,T(F)`.

    For ``scale="lora"``, :math:`c = \sqrt{mn / E}` with
    :math:`E = \sum_{p \in \Omega} \|T(e_p)\|_F^2` the basis' energy on
    :math:`\Omega` (:meth:`InverseTransform.active_energy`). For i.i.d.
    coefficients :math:`s_p` of root-mean-square :math:`\sigma`,
    :math:`\mathbb{E}\|c\,T(F)\|_F^2 = c^2 \sigma^2 E = mn\,\sigma^2`: the
    entries of :math:`M` have root-mean-square :math:`\sigma` too. For
    ``scale="paper"``, :math:`c = 1`.

    Args:
        basis: the basis.
        shape: ``(m, n)``.
        indices: the flat positions of :math:`\Omega`.
        scale: ``"lora"`` or ``"paper"`` (:data:`SpectrumScale`).

    Returns:
        :math:`c`, a positive float.

    Raises:
        ValueError: on an unknown ``scale``, or if the basis gives the active
            set no finite positive energy (naming the basis).
    """
    if check_scale(scale) == "paper":
        return 1.0
    m, n = int(shape[0]), int(shape[1])
    with on_cpu():
        energy = float(basis.active_energy((m, n), indices))
    if not (energy > 0.0 and math.isfinite(energy)):
        raise ValueError(
            f"basis {basis.label()!r} gives the {indices.numel()} active locations of a "
            f"{m}x{n} spectrum the energy {energy}; cannot scale (scale='lora'), use "
            "scale='paper' or fix the basis' active_energy"
        )
    return math.sqrt(m * n / energy)
