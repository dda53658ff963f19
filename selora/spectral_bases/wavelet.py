"""Wavelet bases: the 2-D inverse DWT of any PyWavelets wavelet, one level or several.

:class:`WaveletTransform` and the registered wavelet bases. The periodized
synthesis runs on selora's own fast path
(:mod:`~selora.spectral_bases.wavelet_periodized`), the boundary wavelets on
ptwt's boundary-filter matrices (:mod:`~selora.spectral_bases.wavelet_boundary`),
and several levels chain either (:mod:`~selora.spectral_bases.wavelet_levels`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import pywt
import torch
from torch import Tensor

from selora._tensor_cache import tensor_cache
from selora.spectral_bases.registry import InverseTransform, add_fallback, register_basis
from selora.spectral_bases.wavelet_boundary import (
    boundary_plan,
    finish_boundary,
    synthesize_boundary,
)
from selora.spectral_bases.wavelet_levels import (
    LevelStep,
    level_classes,
    level_corners,
    shape_problem,
    synthesize_levels,
    synthesize_levels_sparse,
)
from selora.spectral_bases.wavelet_periodized import (
    _plan,
    _Polyphase,
    _synthesize,
    _synthesize_windows,
    polyphase_taps,
)

__all__ = [
    "WaveletTransform",
    "HaarTransform",
    "Daubechies4Transform",
    "BiorthogonalTransform",
    "CoifletTransform",
    "Daubechies4TwoLevelTransform",
    "Daubechies2BoundaryTransform",
    "WaveletBoundary",
    "WaveletName",
]

WaveletName = Literal["haar", "db4", "bior2.2", "coif1"]
"""The wavelets behind the four named bases; any PyWavelets discrete name works too."""


@functools.cache
def _polyphase(wavelet: str) -> _Polyphase:
    """Return the polyphase taps of a PyWavelets discrete wavelet, once per name."""
    return polyphase_taps(wavelet)


WaveletBoundary = Literal["periodization", "orthogonal"]
"""How a wavelet basis treats the ends of each axis (see :class:`WaveletTransform`)."""

WAVELET_BOUNDARIES: tuple[WaveletBoundary, ...] = ("periodization", "orthogonal")


@tensor_cache()
def _class_energies(poly: _Polyphase, levels: int, m: int, n: int) -> Tensor:
    r""":math:`\|T(e_p)\|_F^2` of one position per class of :func:`level_classes`, float64."""
    corners = level_corners((m, n), levels)
    units = torch.zeros(len(corners), m, n, dtype=torch.float64)
    for q, (row, col) in enumerate(corners):
        units[q, row, col] = 1.0
    cpu = torch.device("cpu")

    def one_level(block: Tensor) -> Tensor:
        rows, cols = block.shape[-2:]
        return _synthesize(block, _plan(poly, rows, cols, torch.float64, cpu))

    out = synthesize_levels(units, levels, one_level)
    return out.square().sum(dim=(-2, -1))


class WaveletTransform(InverseTransform):
    r"""The 2-D inverse DWT of a PyWavelets wavelet: periodized or boundary, one level or more.

    **One level, periodized** (the default). The spectrum is read as four
    quadrants, each :math:`(m/2, n/2)`:

    .. math::

        F = \begin{bmatrix} a & h \\ v & d \end{bmatrix}, \qquad
        T(F) = \mathrm{idwt2}\big(a, (h, v, d)\big),

    where ``h``, ``v``, ``d`` are PyWavelets' horizontal, vertical and
    diagonal details: ``h`` is high-pass along rows (axis 0) and low-pass along
    columns, ``v`` the converse. The result equals
    ``pywt.idwt2((a, (h, v, d)), wavelet, mode="periodization")``. Writing
    :math:`S_N = [G_N \; \tilde G_N]` for the periodized 1-D synthesis matrix,
    :math:`T(F) = S_m \begin{bmatrix} a & v \\ h & d\end{bmatrix} S_n^\top`.
    For an orthogonal wavelet :math:`S_N` is orthogonal, so :math:`T` keeps
    the Frobenius norm; :attr:`orthonormal` is read off the filters themselves
    (orthonormal to their even shifts, to 1e-10), not from PyWavelets' flag,
    which also marks the only approximately orthogonal ``dmey``. Only even
    ``m`` and ``n`` are accepted.

    **levels** :math:`= J`. The spectrum is read in PyWavelets' ``wavedec2``
    order: :math:`a_J` in the top-left :math:`(m / 2^J, n / 2^J)` block, and
    the details :math:`h_j, v_j, d_j` of level :math:`j` in the three other
    quadrants of the top-left :math:`(m / 2^{j-1}, n / 2^{j-1})` block, placed
    as above. Level by level from the coarsest, each block's one-level
    synthesis becomes the approximation of the next (see
    :mod:`~selora.spectral_bases.wavelet_levels`):
    :math:`T(F) = \mathrm{waverec2}([a_J, (h_J, v_J, d_J), \dots, (h_1, v_1, d_1)])`
    with ``mode="periodization"``. :math:`2^J` must divide ``m`` and ``n``;
    :math:`J = 1` is the one-level basis, bit for bit.

    **boundary** ``"orthogonal"``. Instead of the periodic wrap, each level
    applies ptwt's boundary-filter synthesis matrix :math:`S_N` (orthogonal:
    QR-orthonormalized boundary filters at both ends; see
    :mod:`~selora.spectral_bases.wavelet_boundary`),
    :math:`T_1(F) = S_m \begin{bmatrix} a & v \\ h & d\end{bmatrix} S_n^\top`,
    the exact inverse of ``ptwt.MatrixWavedec2``. Only orthogonal wavelets
    (haar, db, sym, coif) have such filters, and every level's block must be
    at least as long as the filter: :math:`m / 2^{J-1}, n / 2^{J-1} \ge L`.

    Args:
        wavelet: any PyWavelets discrete wavelet name (``"haar"``, ``"db4"``,
            ``"bior2.2"``, ``"coif1"``, ``"sym8"``, ...); the class' own by default.
        levels: :math:`J \ge 1`, the number of synthesis levels; the class' own
            (``1``) by default.
        boundary: ``"periodization"`` or ``"orthogonal"``; the class' own
            (``"periodization"``) by default.

    Raises:
        ValueError: if ``wavelet`` is not a PyWavelets discrete wavelet,
            ``levels`` is not an integer >= 1, ``boundary`` is unknown, or
            ``boundary="orthogonal"`` is asked of a wavelet that is not orthogonal.
    """

    wavelet: str = "haar"
    levels: int = 1
    boundary: WaveletBoundary = "periodization"

    def __init__(
        self,
        wavelet: str | None = None,
        *,
        levels: int | None = None,
        boundary: WaveletBoundary | None = None,
    ) -> None:
        cls = type(self)
        name = wavelet if wavelet is not None else cls.wavelet
        depth = levels if levels is not None else cls.levels
        edge = boundary if boundary is not None else cls.boundary
        if name not in pywt.wavelist(kind="discrete"):
            raise ValueError(
                f"{name!r} is not a PyWavelets discrete wavelet; see pywt.wavelist(kind='discrete')"
            )
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"levels must be an integer >= 1; got {depth!r}")
        if edge not in WAVELET_BOUNDARIES:
            raise ValueError(f"boundary must be one of {list(WAVELET_BOUNDARIES)}; got {edge!r}")
        self.wavelet = name
        self.levels = depth
        self.boundary = edge
        self._poly = _polyphase(name)
        self._taps = int(pywt.Wavelet(name).dec_len)
        self.orthonormal = self._poly.orthogonal
        if edge == "orthogonal" and not self.orthonormal:
            raise ValueError(
                f"boundary='orthogonal' needs an orthogonal wavelet (haar, db*, sym*, coif*): "
                f"ptwt's boundary filters reconstruct no other; {name!r} is not orthonormal "
                "(biorthogonal, or only approximately orthogonal as dmey)"
            )

    def label(self) -> str:
        """Return the registered name, or the wavelet's name when built by fallback."""
        return self.name or self.wavelet

    def options(self) -> dict[str, Any]:
        """Return the constructor arguments that rebuild this basis from its label.

        See :meth:`InverseTransform.options`. Each of ``wavelet``, ``levels``
        and ``boundary`` is declared when it differs from the class' own
        (``HaarTransform(wavelet="sym4")``, ``get_basis("db4", levels=3)``).
        A basis of no registered name is labelled by its wavelet, which
        ``get_basis(wavelet)`` resolves through the PyWavelets fallback, so the
        label already says which wavelet.

        Returns:
            A subset of ``{"wavelet": name, "levels": J, "boundary": mode}``.
        """
        cls = type(self)
        options: dict[str, Any] = {}
        if self.name and self.wavelet != cls.wavelet:
            options["wavelet"] = self.wavelet
        if self.levels != cls.levels:
            options["levels"] = self.levels
        if self.boundary != cls.boundary:
            options["boundary"] = self.boundary
        return options

    def check_shape(self, m: int, n: int) -> None:
        """Refuse sizes the levels cannot halve (and, for boundary filters, shorter than one).

        Args:
            m: number of rows.
            n: number of columns.

        Raises:
            ValueError: naming the basis, ``levels`` and the shape, if
                :math:`2^J` does not divide ``m`` or ``n`` or, with
                ``boundary="orthogonal"``, if a level's block is shorter than
                the filter.
        """
        taps = self._taps if self.boundary == "orthogonal" else 1
        problem = shape_problem(m, n, self.levels, taps)
        if problem is not None:
            raise ValueError(
                f"wavelet basis {self.label()!r} needs {problem}; got shape ({m}, {n})"
            )

    def inverse(self, spectrum: Tensor) -> Tensor:
        """Return the 2-D inverse DWT of ``F`` (see the class docstring).

        Args:
            spectrum: real tensor ``(..., m, n)`` of a shape :meth:`check_shape` accepts.

        Returns:
            Real tensor of the same shape and dtype.
        """
        if self.boundary == "orthogonal":
            wavelet = self.wavelet
            return synthesize_levels(
                spectrum, self.levels, lambda block: synthesize_boundary(block, wavelet)
            )
        # Under torch.compile the constants are traced into the graph instead:
        # Dynamo does not honour functools caches and warns about them.
        build = _plan.__wrapped__ if torch.compiler.is_compiling() else _plan
        poly = self._poly

        def one_level(block: Tensor) -> Tensor:
            m, n = block.shape[-2:]
            return _synthesize(block, build(poly, m, n, block.dtype, block.device))

        return synthesize_levels(spectrum, self.levels, one_level)

    def synthesize(self, coefficients: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
        r"""Return the inverse DWT of :math:`\operatorname{scatter}(s, \Omega)`.

        See :meth:`InverseTransform.synthesize`. Every level's one gather,
        which forms its first axis' band windows, reads the coefficients (and
        the coarser level's result) straight away: the scatter and the block
        layout are composed into it
        (:func:`~selora.spectral_bases.wavelet_levels.synthesize_levels_sparse`),
        so neither the dense spectrum nor any level's block is built. Periodized
        and boundary wavelets alike; other dtypes than float32 and float64 use
        the default.

        Args:
            coefficients: real tensor ``(..., k)``.
            indices: the ``k`` flat positions of :math:`\Omega`, int64, on the
                coefficients' device.
            shape: ``(m, n)``, a shape this basis accepts.

        Returns:
            Real tensor ``(..., m, n)`` in the coefficients' dtype.
        """
        dtype = coefficients.dtype
        if dtype not in (torch.float32, torch.float64):
            return super().synthesize(coefficients, indices, shape)
        m, n = int(shape[0]), int(shape[1])
        self.check_shape(m, n)
        device = coefficients.device
        step: LevelStep
        if self.boundary == "orthogonal":
            wavelet = self.wavelet
            key: tuple[str, object] = ("boundary", wavelet)

            def step(rows: int, cols: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
                plan = boundary_plan(wavelet, rows, cols, dtype, device)
                return plan.gather, lambda windows: finish_boundary(windows, plan, rows, cols)

        else:
            build = _plan.__wrapped__ if torch.compiler.is_compiling() else _plan
            poly = self._poly
            # the gathers follow from (wavelet, size) alone: _plan's layout is the same in any dtype
            key = ("periodized", poly)

            def step(rows: int, cols: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
                plan = build(poly, rows, cols, dtype, device)
                return plan.gather, lambda windows: _synthesize_windows(windows, plan, rows, cols)

        return synthesize_levels_sparse(coefficients, indices, (m, n), self.levels, step, key)

    def __repr__(self) -> str:
        levels = f", levels={self.levels}" if self.levels != 1 else ""
        edge = f", boundary={self.boundary!r}" if self.boundary != "periodization" else ""
        return f"{type(self).__name__}(wavelet={self.wavelet!r}{levels}{edge})"

    def active_energy(self, shape: tuple[int, int], indices: Tensor) -> float:
        r"""Return the energy of :math:`\Omega` (see :meth:`InverseTransform.active_energy`).

        An orthonormal transform (an orthogonal wavelet, periodized or with
        boundary filters, any number of levels) gives
        :math:`\|T(e_p)\|_F = 1` for every ``p``, so :math:`E = k`. Otherwise
        (``bior``) the periodized synthesis is shift-invariant within each
        band: moving a level-:math:`j` coefficient by one place moves its
        synthesis function circularly by :math:`2^j` samples, which keeps the
        norm. So :math:`\|T(e_p)\|_F^2` depends only on the class of ``p``
        (the band :math:`a_J` or a detail quadrant of one level, :math:`3J + 1`
        classes), one unit transform per class gives all of them (cached per
        shape, in float64), and :math:`E = \sum_q k_q \|T(e_{p_q})\|_F^2` with
        :math:`k_q` the active locations of class :math:`q`. Exact, for any
        ``indices``.

        Args:
            shape: ``(m, n)``, a shape :meth:`check_shape` accepts.
            indices: the ``k`` distinct flat positions of :math:`\Omega`.

        Returns:
            :math:`E`.
        """
        m, n = int(shape[0]), int(shape[1])
        self.check_shape(m, n)
        flat = indices.detach().to("cpu", torch.int64).reshape(-1)
        if self.orthonormal:
            return float(flat.numel())
        classes = level_classes((m, n), self.levels, flat)
        counts = torch.bincount(classes, minlength=3 * self.levels + 1).to(torch.float64)
        return float(counts @ _class_energies(self._poly, self.levels, m, n))


@register_basis("haar")
class HaarTransform(WaveletTransform):
    """Haar wavelet basis (orthonormal, 2 taps)."""

    wavelet = "haar"


@register_basis("db4")
class Daubechies4Transform(WaveletTransform):
    """Daubechies-4 wavelet basis (orthonormal, 8 taps, PyWavelets' ``db4``)."""

    wavelet = "db4"


@register_basis("bior")
class BiorthogonalTransform(WaveletTransform):
    """Biorthogonal 2.2 wavelet basis (``bior2.2``; not orthonormal, 6 taps)."""

    wavelet = "bior2.2"


@register_basis("coif")
class CoifletTransform(WaveletTransform):
    """Coiflet-1 wavelet basis (``coif1``; orthonormal, 6 taps)."""

    wavelet = "coif1"


@register_basis("db4-l2")
class Daubechies4TwoLevelTransform(WaveletTransform):
    """Two levels of the periodized db4 synthesis (``levels=2``; 4 must divide m and n)."""

    wavelet = "db4"
    levels = 2


@register_basis("db2-boundary")
class Daubechies2BoundaryTransform(WaveletTransform):
    """db2 with ptwt's orthogonal boundary filters (``boundary="orthogonal"``; m, n even, >= 4)."""

    wavelet = "db2"
    boundary = "orthogonal"


def _resolve_pywavelet(name: str) -> functools.partial[WaveletTransform] | None:
    if name not in pywt.wavelist(kind="discrete"):
        return None
    return functools.partial(WaveletTransform, name)


add_fallback(_resolve_pywavelet)
