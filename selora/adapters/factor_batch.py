r"""Form every spectral factor of a model in one batched transform per group.

In a transformer every layer of a kind has factors of the same shape, basis and
locations (:math:`\Omega` is shared per shape), so their matrices
:math:`M_j = c\,T(\operatorname{scatter}(s_j, \Omega))` can be formed together:
stack the coefficient vectors :math:`s_j` into a ``(G, k)`` tensor, scatter it
into one ``(G, m, n)`` batch of spectra and call the basis once,

.. math::

    [M_1, \dots, M_G] = c\,T\big(\operatorname{scatter}([s_1, \dots, s_G], \Omega)\big),

because :math:`T` acts on the last two dimensions. One scatter and one
transform per group replace :math:`G` of each, forward and backward, which is
what a step spends on the CPU (per-call overhead) and on a GPU (kernel
launches). Autograd flows back to each :math:`s_j` through the stack. On the
CPU a group is cut into batches that fit the cache (:data:`CPU_CHUNK_BYTES`).

:func:`formed_factors` is entered once per call of the model, in training with
gradients (an eval forward uses the per-unit cache instead); the factors it
forms travel with the call in a context variable, never as state on shared
modules, and :meth:`~selora.adapters.unit.AdapterUnit.factors` takes its own
from there. A layer run outside the call (an activation-checkpointing
recompute during the backward) forms its factors itself, to the same values.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from selora.spectral_bases import SparseSpectrum

__all__ = [
    "BATCHED_DEVICE_TYPES",
    "CPU_CHUNK_BYTES",
    "active_spectra",
    "formed_factors",
    "prebuilt",
    "spectra_to_batch",
]

BATCHED_DEVICE_TYPES: set[str] = {"cpu", "cuda", "xpu", "mps"}
"""Device types whose factors a training call forms batched.

On an accelerator each call is a kernel launch, which the batching saves. On
the CPU it saves per-call overhead, provided each batch fits the cache
(:data:`CPU_CHUNK_BYTES`): forming SmolLM2-135M's 300 factors, forward and
backward, one thread, batched against one by one took fft 56 against 71 ms,
haar 58/72, dct 69/91, db4 63/80 and coif 61/77, and a whole training step at
seq 32 went from 1.048 to 1.012 of PEFT LoRA's CPU time with fft
(``docs/benchmarks.md``). Remove a type to form its factors one at a time.
"""

_FORMED: contextvars.ContextVar[dict[int, Tensor] | None] = contextvars.ContextVar(
    "selora_formed_factors", default=None
)


def prebuilt(spectrum: nn.Module) -> Tensor | None:
    """Return the matrix formed for ``spectrum`` in the call in progress, if any.

    Args:
        spectrum: a factor module.

    Returns:
        Its ``(m, n)`` matrix in the coefficients' dtype, or ``None``.
    """
    formed = _FORMED.get()
    return None if formed is None else formed.get(id(spectrum))


def _group_key(spectrum: SparseSpectrum) -> tuple[Any, ...]:
    basis = spectrum.basis
    coefficients = spectrum.coefficients
    return (
        type(basis),
        basis.label(),
        repr(sorted(basis.options().items())),
        spectrum.shape,
        id(spectrum.indices),
        spectrum.scale_factor,
        coefficients.dtype,
        coefficients.device,
    )


def _form(spectra: list[SparseSpectrum]) -> list[Tensor]:
    """Form the matrices of spectra sharing basis, shape, locations and scale."""
    first = spectra[0]
    m, n = first.shape
    coeffs = torch.stack([s.coefficients for s in spectra])
    if first.scale_factor != 1.0:
        coeffs = coeffs * first.scale_factor
    if coeffs.dtype not in (torch.float32, torch.float64):
        coeffs = coeffs.float()
    out = first.basis.synthesize(coeffs, first.indices.to(coeffs.device), (m, n))
    out = out.to(first.coefficients.dtype)
    return list(out.unbind(0))


CPU_CHUNK_BYTES = 1 << 20
"""The most bytes of factors one batched transform forms on the CPU.

A batch larger than the cache runs slower per matrix than one at a time: on
one thread, the inverse FFT of 120 stacked 32 x 576 spectra (8.4 MiB) took 62 us
per matrix, 40 one by one, and 34-35 in batches of 4 to 16 (0.3-1.1 MiB).
Accelerators take each group whole, which saves kernel launches.
"""


def _chunks(members: list[SparseSpectrum]) -> list[list[SparseSpectrum]]:
    first = members[0]
    if first.coefficients.device.type != "cpu":
        return [members]
    m, n = first.shape
    itemsize = max(first.coefficients.element_size(), 4)  # formed in float32 at least
    size = max(1, CPU_CHUNK_BYTES // (m * n * itemsize))
    return [members[i : i + size] for i in range(0, len(members), size)]


def _eligible(spectrum: SparseSpectrum) -> bool:
    coefficients = spectrum.coefficients
    indices = spectrum.indices
    if type(coefficients) is not nn.Parameter and type(coefficients) is not Tensor:
        return False  # a DTensor (FSDP2 shards) or another subclass: formed by the layer
    if coefficients.device.type not in BATCHED_DEVICE_TYPES:
        return False
    return (
        not coefficients.is_meta and not indices.is_meta and indices.device == coefficients.device
    )


@contextlib.contextmanager
def formed_factors(spectra: Iterable[SparseSpectrum]) -> Iterator[None]:
    """Form ``spectra`` in batched groups and hand them to the layers during the block.

    Groups of one are left to the layer (nothing to gain). Nothing is formed
    without gradients or in eval mode; the caller decides.

    Args:
        spectra: the factors the call will use (those of the active units).

    Yields:
        Nothing.
    """
    groups: dict[tuple[Any, ...], list[SparseSpectrum]] = {}
    for spectrum in spectra:
        if _eligible(spectrum):
            groups.setdefault(_group_key(spectrum), []).append(spectrum)
    formed: dict[int, Tensor] = {}
    for members in groups.values():
        for chunk in _chunks(members):
            if len(chunk) > 1:
                formed.update(zip((id(s) for s in chunk), _form(chunk), strict=True))
    token = _FORMED.set(formed or None)
    try:
        yield
    finally:
        _FORMED.reset(token)


def spectra_to_batch(model: nn.Module) -> list[SparseSpectrum]:
    """The factors a training call of ``model`` forms batched (:func:`active_spectra`).

    None, without walking the model, when its parameters sit on a device type
    left out of :data:`BATCHED_DEVICE_TYPES`: that walk would run at every
    training step only to have every factor refused.

    Args:
        model: an adapted model.

    Returns:
        The factors, or an empty list.
    """
    first = next(model.parameters(), None)
    if first is None or first.device.type not in BATCHED_DEVICE_TYPES:
        return []
    return active_spectra(model)


def active_spectra(model: nn.Module) -> list[SparseSpectrum]:
    """The spectral factors of every active, unmerged adapter unit of ``model``.

    Args:
        model: an adapted model.

    Returns:
        The factors, in module order; none when a module has transformers'
        ``gradient_checkpointing`` on (each layer then forms its own).
    """
    from selora.adapters.layer import SpectralLayer

    found: list[SparseSpectrum] = []
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            # transformers' activation checkpointing recomputes each layer in the backward,
            # outside this call: it must form the same tensors there as in the forward
            return []
        if not isinstance(module, SpectralLayer) or module.merged or module.disable_adapters:
            continue
        units = module.selora_units._modules
        for name in module.active_adapters:
            unit = units.get(name)
            if unit is None or getattr(unit, "finite_checks", False):
                continue
            for factor in (unit._modules["lora_A"], unit._modules["lora_B"]):
                if isinstance(factor, SparseSpectrum):
                    found.append(factor)
    return found
