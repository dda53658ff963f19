"""Sparse spectra: k learnable coefficients at shared locations, mapped to a dense matrix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from selora._tensor_cache import tensor_cache
from selora.spectral_bases.calibration import (
    SpectrumScale,
    check_scale,
    kaiming_variance,
    on_cpu,
    scale_factor,
)
from selora.spectral_bases.registry import InverseTransform, get_basis

__all__ = [
    "SparseSpectrum",
    "SpectrumInit",
    "SpectrumScale",
    "coefficient_budget",
    "kaiming_variance",
    "scale_factor",
    "spectral_locations",
]

SpectrumInit = Literal["kaiming", "zero"]
"""How a :class:`SparseSpectrum` is initialised (and re-initialised by ``reset_parameters``).

* ``"kaiming"``: calibrated, the matrix has the Kaiming variance ``1 / (3 n)``.
* ``"zero"``: every coefficient zero (LoRA's B factor); nothing is calibrated.
"""

_INITS: tuple[str, ...] = get_args(SpectrumInit)


def coefficient_budget(
    shape: tuple[int, int], *, sparse_ratio: float | None = None, n_coeffs: int | None = None
) -> int:
    r"""Return the number of active coefficients ``k`` of an ``(m, n)`` spectrum.

    Exactly one of the two budgets is given: SeLoRA's sparse ratio
    :math:`\eta \in [0, 1)` gives :math:`k = \lfloor (1 - \eta) m n \rfloor`;
    FoRA's fixed count gives :math:`k \in [1, mn]` directly.

    Args:
        shape: ``(m, n)``, two positive integers.
        sparse_ratio: fraction of the ``m * n`` positions left out.
        n_coeffs: number of positions kept.

    Returns:
        ``k``, at least 1.

    Raises:
        ValueError: if both or neither budget is given, a value is outside its
            range, or the ratio leaves no coefficient for this shape.
    """
    m, n = _check_shape(shape)
    total = m * n
    if (sparse_ratio is None) == (n_coeffs is None):
        raise ValueError(
            "give exactly one of sparse_ratio (SeLoRA, in [0, 1)) or n_coeffs (FoRA, in [1, m*n]); "
            f"got sparse_ratio={sparse_ratio!r}, n_coeffs={n_coeffs!r}"
        )
    if sparse_ratio is not None:
        if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, numbers.Real):
            raise ValueError(f"sparse_ratio must be a real number in [0, 1); got {sparse_ratio!r}")
        ratio = float(sparse_ratio)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"sparse_ratio must lie in [0, 1); got {sparse_ratio!r}")
        k = math.floor((1.0 - ratio) * total)
        if k < 1:
            raise ValueError(
                f"sparse_ratio={sparse_ratio!r} leaves no coefficient of a {m}x{n} matrix "
                f"(k = floor((1 - ratio) * {total}) = 0); use a ratio below {1 - 1 / total:.6g}"
            )
        return k
    if isinstance(n_coeffs, bool) or not isinstance(n_coeffs, numbers.Integral):
        raise ValueError(f"n_coeffs must be an integer in [1, {total}]; got {n_coeffs!r}")
    if not 1 <= int(n_coeffs) <= total:
        raise ValueError(
            f"n_coeffs must lie in [1, {total}] for a {m}x{n} matrix; got {n_coeffs!r}"
        )
    return int(n_coeffs)


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or len(shape) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape)
        or not all(int(s) >= 1 for s in shape)
    ):
        raise ValueError(f"shape must be two positive integers (m, n); got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


@tensor_cache(maxsize=256)
def _cached_locations(seed: int, m: int, n: int, k: int) -> Tensor:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, m, n])))
    flat = rng.choice(m * n, size=k, replace=False, shuffle=False)
    return torch.from_numpy(np.sort(flat).astype(np.int64))


def spectral_locations(shape: tuple[int, int], k: int, seed: int = 0) -> Tensor:
    r"""Return the active set :math:`\Omega`: ``k`` distinct flat positions of an ``(m, n)`` grid.

    Positions are drawn without replacement by a NumPy PCG64 generator seeded
    from ``(seed, m, n)``, so they depend on nothing else: not on torch's global
    RNG (which they neither read nor advance), not on the process, not on the
    torch version. Equal ``(seed, shape, k)`` give the same set, which is how
    every matrix of one shape in a model shares its locations. The flat index
    ``p`` stands for row ``p // n`` and column ``p % n``.

    Args:
        shape: ``(m, n)``.
        k: number of positions, ``1 <= k <= m * n``.
        seed: a non-negative integer.

    Returns:
        A sorted int64 tensor of ``k`` distinct indices in ``[0, m * n)``. It is
        shared between callers: treat it as read-only.

    Raises:
        ValueError: on a bad shape, ``k`` or seed.
    """
    m, n = _check_shape(shape)
    k = coefficient_budget((m, n), n_coeffs=k)
    return _cached_locations(_check_seed(seed), m, n, k)


def _check_contract(basis: InverseTransform, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Transform one spectrum on the CPU and check the output's type, shape and dtype."""
    probe = torch.zeros(shape, dtype=dtype, device="cpu")
    probe.view(-1)[0] = 1.0
    try:
        with on_cpu():
            out = basis(probe)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(
            f"basis {basis.label()!r} ({type(basis).__name__}) fails on a {dtype} "
            f"spectrum of shape {tuple(shape)}: {exc}"
        ) from exc
    basis.check_output(probe, out)


class SparseSpectrum(nn.Module):
    r"""A dense ``(m, n)`` matrix spanned by ``k`` spectral coefficients.

    .. math::

        M = c\,T(F), \qquad F = \operatorname{scatter}(s, \Omega) \in \mathbb{R}^{m \times n},

    where :math:`s \in \mathbb{R}^k` is the only parameter, :math:`\Omega` the
    shared active set (:func:`spectral_locations`), :math:`T` the basis and
    :math:`c` a fixed constant (:attr:`scale_factor`, see :data:`SpectrumScale`):
    :math:`c = \sqrt{mn / E}` with :math:`E = \sum_{p \in \Omega} \|T(e_p)\|_F^2`
    for ``scale="lora"``, :math:`c = 1` for ``scale="paper"``.
    Because :math:`F` is zero off :math:`\Omega`, the gradient of a loss
    :math:`\ell` is :math:`\partial\ell/\partial s = c\,T^*(\partial\ell/\partial M)|_\Omega`,
    the adjoint transform read at the active locations, and optimizer state
    holds ``k`` numbers per state tensor.

    A new spectrum is calibrated like a new ``nn.Linear``: i.i.d. standard
    normal draws :math:`z` (from torch's global RNG, or ``generator``) are
    scaled by one gain :math:`g` such that the entries of :math:`T(g z)` have
    the Kaiming-uniform variance :math:`1 / (3n)`. Since :math:`T` is linear,
    :math:`\operatorname{Var}(g M) = g^2 \operatorname{Var}(M)`, so
    :math:`g = \sqrt{(1/3n) / \widehat{\operatorname{Var}}(T(z))}` from the
    realised sample, and :math:`s = g z / c`: both scales give the same
    matrix at init, and for ``"lora"`` the coefficients' own root-mean-square
    is about :math:`\sqrt{1/(3n)}`. With ``init="zero"`` the coefficients
    start at zero instead (LoRA's B factor) and nothing is calibrated.

    The locations are a non-persistent buffer that follows from
    ``(seed, shape, k)``. Moving the module (``to``, ``to_empty`` after a
    build on the meta device) keeps their values exactly, and a spectrum whose
    locations are still on the meta device while its coefficients are not
    (``load_state_dict(..., assign=True)``) regenerates them on first use.

    Args:
        shape: ``(m, n)`` of the dense matrix.
        basis: a registered basis name or an :class:`InverseTransform`.
        sparse_ratio: SeLoRA's budget :math:`\eta \in [0, 1)`,
            :math:`k = \lfloor (1-\eta) m n \rfloor`.
        n_coeffs: FoRA's budget :math:`k \in [1, mn]`.
        seed: seeds the locations (with the shape); a non-negative integer.
        device: where the coefficients live.
        dtype: the coefficients' dtype (float32 by default).
        scale: ``"lora"`` or ``"paper"`` (:data:`SpectrumScale`).
        init: ``"kaiming"`` or ``"zero"`` (:data:`SpectrumInit`).

    Attributes:
        scale: the ``scale`` given.
        init: the ``init`` given; :meth:`reset_parameters` follows it.
        scale_factor: the constant :math:`c` (a float, 1.0 for ``"paper"``),
            recomputed when the locations are replaced.

    Raises:
        ValueError: on a bad shape, budget, seed, scale or init, a shape the
            basis refuses, or a basis that breaks its contract (its output is
            not a tensor of the input's shape and dtype), naming the basis.
        TypeError: if ``basis`` is neither a name nor an :class:`InverseTransform`,
            or the basis returns something other than a tensor.
        UnknownBasisError: on an unknown basis name.
    """

    indices: Tensor
    # Class-level defaults: a whole module pickled before these attributes
    # existed (``torch.save(model)``) unpickles as what it computed then.
    scale: SpectrumScale = "paper"
    scale_factor: float = 1.0
    init: SpectrumInit = "kaiming"

    def __init__(
        self,
        shape: tuple[int, int],
        basis: str | InverseTransform,
        *,
        sparse_ratio: float | None = None,
        n_coeffs: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scale: SpectrumScale = "lora",
        init: SpectrumInit = "kaiming",
    ) -> None:
        super().__init__()
        m, n = _check_shape(shape)
        self.scale = check_scale(scale)
        if init not in _INITS:
            raise ValueError(f"init must be one of {list(_INITS)}; got {init!r}")
        self.init = init
        if isinstance(basis, str):
            basis = get_basis(basis)
        elif not isinstance(basis, InverseTransform):
            raise TypeError(
                "basis must be a registered name or an InverseTransform; "
                f"got {type(basis).__name__}"
            )
        basis.check_shape(m, n)
        self.shape = (m, n)
        self.basis = basis
        self.seed = _check_seed(seed)
        k = coefficient_budget((m, n), sparse_ratio=sparse_ratio, n_coeffs=n_coeffs)
        coeff_dtype = dtype or torch.float32
        _check_contract(
            basis, (m, n), torch.float64 if coeff_dtype == torch.float64 else torch.float32
        )
        indices = spectral_locations((m, n), k, self.seed)
        self.scale_factor = scale_factor(basis, (m, n), indices, self.scale)
        if device is not None and torch.device(device).type != "cpu":
            indices = indices.to(device)
        # Not persistent: the locations follow from (seed, shape, k); checkpoints
        # store each distinct set once (selora.adapters.io), not once per module.
        self.register_buffer("indices", indices, persistent=False)
        self.coefficients = nn.Parameter(torch.empty(k, device=device, dtype=coeff_dtype))
        self.reset_parameters()

    @property
    def n_coeffs(self) -> int:
        """The number ``k`` of active coefficients."""
        return int(self.coefficients.numel())

    @property
    def sparse_ratio(self) -> float:
        """The realised fraction :math:`1 - k / (mn)` of inactive positions."""
        return 1.0 - self.n_coeffs / (self.shape[0] * self.shape[1])

    def dense_spectrum(self) -> Tensor:
        r"""Return :math:`F = \operatorname{scatter}(s, \Omega)` as an ``(m, n)`` tensor.

        Returns:
            The dense spectrum in the coefficients' dtype, zero off :math:`\Omega`.
        """
        return self._scatter(self.coefficients)

    def _scatter(self, coeffs: Tensor) -> Tensor:
        """Place ``coeffs`` at the locations of an otherwise zero ``(m, n)`` tensor."""
        m, n = self.shape
        flat = coeffs.new_zeros(m * n).scatter(0, self._locations(), coeffs)
        return flat.view(m, n)

    def forward(self, dtype: torch.dtype | None = None) -> Tensor:
        r"""Return the dense matrix :math:`M = c\,T(F)`.

        Args:
            dtype: the output dtype; the coefficients' dtype if ``None``.
                The transform itself runs in float32 (float64 for float64
                coefficients) whatever the output dtype.

        Returns:
            An ``(m, n)`` tensor.
        """
        coeffs: Tensor = self.coefficients
        if self.scale_factor != 1.0:
            coeffs = coeffs * self.scale_factor  # c T(F) = T(c F): k products, not mn
        if coeffs.dtype not in (torch.float32, torch.float64):
            coeffs = coeffs.float()
        out = self.basis.synthesize(coeffs, self._locations(), self.shape)
        return out.to(dtype or self.coefficients.dtype)

    def _locations(self) -> Tensor:
        """The locations, regenerated if on the meta device while the coefficients are not."""
        indices = self.indices
        if indices.is_meta and not self.coefficients.is_meta:
            self.indices = self._fresh_locations().to(self.coefficients.device)
            indices = self.indices
        return indices

    def set_locations(self, indices: Tensor) -> None:
        """Replace the locations (a checkpoint's stored set) and recompute :attr:`scale_factor`.

        Args:
            indices: ``k`` distinct flat positions in ``[0, m * n)``, any integer dtype.

        Raises:
            ValueError: if ``indices`` is not ``k`` distinct integers in range.
        """
        m, n = self.shape
        flat = indices.detach().to("cpu", torch.int64).reshape(-1)
        ordered = flat.sort().values
        k = self.n_coeffs
        if (
            indices.is_floating_point()
            or flat.numel() != k
            or (k and (int(ordered[0]) < 0 or int(ordered[-1]) >= m * n))
            or bool((ordered[1:] == ordered[:-1]).any())
        ):
            raise ValueError(
                f"locations of a {m}x{n} spectrum with {k} coefficients must be {k} distinct "
                f"integers in [0, {m * n}); got {flat.numel()} values"
            )
        device = self.coefficients.device
        if indices.dtype == torch.int64 and indices.ndim == 1 and indices.device == device:
            self.indices = indices  # a tensor shared between spectra stays shared
        else:
            self.indices = flat.to(device)

    def __setattr__(self, name: str, value: Any) -> None:
        """Set an attribute; a new ``indices`` tensor recomputes :attr:`scale_factor`."""
        super().__setattr__(name, value)
        constructed = "scale" in self.__dict__
        if name == "indices" and constructed and isinstance(value, Tensor) and not value.is_meta:
            self.scale_factor = scale_factor(self.basis, self.shape, value, self.scale)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SparseSpectrum:
        """Apply ``fn`` as ``nn.Module`` does, keeping the locations' values exactly.

        ``to_empty`` applies ``torch.empty_like`` to every buffer, which would
        leave the locations as uninitialised memory; they are copied from the
        old tensor instead (or regenerated from ``(seed, shape, k)`` if that was
        on the meta device) onto the new device.
        """
        before = self.indices
        super()._apply(fn, recurse=recurse)  # type: ignore[no-untyped-call]
        after = self.indices
        if after is not before:
            if before.is_meta:
                self.indices = self._fresh_locations().to(after.device)
            else:  # the same values: the scale factor stands
                self._buffers["indices"] = before.to(device=after.device, dtype=torch.int64)
        return self

    def _fresh_locations(self) -> Tensor:
        return spectral_locations(self.shape, self.n_coeffs, self.seed)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise the coefficients as :attr:`init` says.

        ``"kaiming"`` draws calibrated coefficients (Kaiming variance of the
        dense matrix); ``"zero"`` zeroes them. Locations still on the meta
        device are regenerated first.

        Args:
            generator: draws the coefficients; torch's global RNG if ``None``.

        Raises:
            ValueError: if the basis maps the drawn spectrum to a constant
                matrix, so that no gain can reach the target variance.
        """
        coeffs = self.coefficients
        if coeffs.is_meta:
            return
        if self.init == "zero":
            coeffs.zero_()
            self._locations()
            return
        sample = torch.randn(
            coeffs.shape, generator=generator, dtype=torch.float64, device="cpu"
        ).to(coeffs.device)
        # Calibrate in float64: the gain should not depend on the training dtype.
        flat = sample.new_zeros(self.shape[0] * self.shape[1])
        matrix = self.basis(
            flat.scatter(0, self._locations().to(sample.device), sample).view(self.shape)
        )
        # The mean square, not the sample variance: the coefficients are drawn with zero
        # mean, so E[M] = 0 and E[M^2] is the variance of M's entries. The sample variance
        # would call a matrix from the constant (DC) coefficient alone "variance 0".
        variance = float(matrix.square().mean())
        if not variance > 0.0 or not math.isfinite(variance):
            raise ValueError(
                f"basis {self.basis.label()!r} maps a random spectrum of shape {self.shape} "
                f"with {self.n_coeffs} coefficients to a matrix of mean square {variance}; "
                "cannot calibrate"
            )
        gain = math.sqrt(kaiming_variance(self.shape[1]) / variance)
        if self.scale_factor == 1.0:
            coeffs.copy_(sample * gain)  # the "paper" scale, bit for bit as before
        else:
            coeffs.copy_(sample * (gain / self.scale_factor))

    @torch.no_grad()
    def reset_zero(self) -> None:
        """Set every coefficient to zero, so that :math:`M = 0` (LoRA's B at init)."""
        self.coefficients.zero_()

    def extra_repr(self) -> str:
        """Summarise shape, basis, budget and seed for ``repr``."""
        m, n = self.shape
        return (
            f"shape=({m}, {n}), basis={self.basis.label()!r}, "
            f"n_coeffs={self.n_coeffs}, seed={self.seed}, scale={self.scale!r}"
        )
