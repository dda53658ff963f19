"""The cosine basis: the orthonormal 2-D inverse DCT-II, in plain torch."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from selora._tensor_cache import LocationCache, tensor_cache
from selora.spectral_bases._gather import select_last
from selora.spectral_bases.registry import InverseTransform, register_basis

__all__ = ["CosineTransform"]

# Up to this length a dense matrix product beats the FFT route on CPU (an
# (8, 384) spectrum: 3x faster along 384); the matrix is at most 1 MiB.
_DENSE_MAX = 512


@tensor_cache()
def _dense_plan(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""The ``(n, n)`` matrix :math:`M_{uj} = c_u \cos(\pi (2j+1) u / 2n)`: ``x = X @ M``."""
    u = torch.arange(n, dtype=torch.float64)
    c = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    c[0] = math.sqrt(1.0 / n)
    matrix = c[:, None] * torch.cos(math.pi * (2.0 * u[None, :] + 1.0) * u[:, None] / (2.0 * n))
    return matrix.to(dtype=dtype, device=device)


@tensor_cache()
def _fft_plan(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""The twiddles of the length-``2n`` route (see :func:`_inverse_along`).

    :math:`t_0 = c_0` and :math:`t_u = \tfrac{c_u}{2} e^{i\pi u/2n}` for :math:`u > 0`.
    """
    u = torch.arange(n, dtype=torch.float64)
    scale = torch.full((n,), math.sqrt(2.0 / n) / 2.0, dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    twiddle = torch.polar(scale, math.pi * u / (2.0 * n))
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return twiddle.to(dtype=complex_dtype, device=device)


def _inverse_along(coeffs: Tensor, dim: int, other: int) -> Tensor:
    r"""Orthonormal inverse DCT-II (DCT-III) along ``dim``, the last (-1) or the one before (-2).

    A length ``n`` no longer than ``other`` (the length of the other
    transformed dimension) or 512 uses the dense ``(n, n)`` matrix, which is
    then no larger than the spectrum itself, so a factor's transform never
    holds a matrix of a layer's size. Longer ones use one real inverse FFT of
    length :math:`2n`: with :math:`X_u = 0` for :math:`u \ge n`, the Hermitian
    extension :math:`Z` of :math:`t X` (what ``irfft`` of length :math:`2n`
    with no normalisation sums) gives

    .. math::

        \sum_{u=0}^{2n-1} Z_u e^{2\pi i u j/2n}
        = t_0 X_0 + 2 \sum_{u=1}^{n-1} \operatorname{Re}\big(t_u X_u e^{i\pi u j/n}\big)
        = \sum_{u=0}^{n-1} c_u X_u \cos\frac{\pi (2j+1) u}{2n} = x_j

    for :math:`j < n`. A multiply, one ``irfft`` and a slice: the earlier
    length-:math:`n` route (Makhoul, 1980) needed two gathers, whose backward
    scatters cost more than the transforms (CPU, SmolLM2's factors: the
    formation of every factor took 30 % less time).
    """
    n = coeffs.shape[dim]
    # Under torch.compile the constants are traced into the graph instead:
    # Dynamo does not honour functools caches and warns about them.
    compiling = torch.compiler.is_compiling()
    if n <= min(other, _DENSE_MAX):
        plan = _dense_plan.__wrapped__ if compiling else _dense_plan
        matrix = plan(n, coeffs.dtype, coeffs.device)
        dense: Tensor = coeffs @ matrix if dim == -1 else matrix.T @ coeffs  # no transposed copy
        return dense
    if dim == -2:  # measured: irfft over the last dim of a transposed view is no slower than dim=-2
        return _inverse_along(coeffs.transpose(-1, -2), -1, other).transpose(-1, -2)
    fft_plan = _fft_plan.__wrapped__ if compiling else _fft_plan
    twiddle = fft_plan(n, coeffs.dtype, coeffs.device)
    signal: Tensor = torch.fft.irfft(coeffs * twiddle, n=2 * n, norm="forward")
    return signal[..., :n]


_Plan = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
_plans = LocationCache()


def _sparse_plan(indices: Tensor, m: int, n: int, long_last: bool, dtype: torch.dtype) -> _Plan:
    r"""The constants of :class:`_SparseLongAxis` for :math:`\Omega` (cached per location tensor).

    Returns ``(positions, weights, adjoint_weights, order, unorder)``: the two
    float slots (real, imaginary) of each coefficient in the half spectrum
    :math:`W` of length :math:`\lfloor N/2 \rfloor + 1`, the forward weights
    :math:`(\operatorname{Re} w_l, \operatorname{Im} w_l)` interleaved, the
    same times the Hermitian multiplicity of the slot (1 at :math:`0` and
    :math:`N/2`, else 2), the output order :math:`x = v[\text{order}]` and its
    inverse.
    """

    def build() -> _Plan:
        flat = indices.reshape(-1).to(torch.int64)
        u, v = flat // n, flat % n
        short, long, size = (u, v, n) if long_last else (v, u, m)
        upper = 2 * long > size
        slot = torch.where(upper, size - long, long)
        scale = torch.full(long.shape, math.sqrt(2.0 / size) / 2.0, dtype=torch.float64)
        scale = scale.to(flat.device)
        scale[long == 0] = math.sqrt(1.0 / size)
        scale[2 * long == size] = math.sqrt(2.0 / size) / math.sqrt(2.0)
        angle = math.pi * long.to(torch.float64) / (2.0 * size)
        angle = torch.where(upper, -angle, angle)
        angle[2 * long == size] = 0.0
        weights = torch.view_as_real(torch.polar(scale, angle))
        multiplicity = torch.where((slot == 0) | (2 * slot == size), 1.0, 2.0)
        first = (short * (size // 2 + 1) + slot) * 2
        positions = torch.stack([first, first + 1], dim=-1).reshape(-1)
        j = torch.arange(size, device=flat.device)
        order = torch.where(j % 2 == 0, j // 2, size - 1 - j // 2)
        unorder = torch.empty_like(order)
        unorder[order] = j
        adjoint = weights * multiplicity.to(torch.float64)[:, None]
        return (
            positions,
            weights.reshape(-1).to(dtype),
            adjoint.reshape(-1).to(dtype),
            order,
            unorder,
        )

    return _plans.get(indices, (indices.device, m, n, long_last, dtype), build)


def _long_axis_inverse(
    coefficients: Tensor, positions: Tensor, weights: Tensor, order: Tensor, short: int
) -> Tensor:
    size = order.numel()
    batch = coefficients.shape[:-1]
    values = (coefficients.unsqueeze(-1) * weights.view(-1, 2)).reshape(*batch, -1)
    half = coefficients.new_zeros(*batch, short * (size // 2 + 1) * 2)
    half = half.index_add(-1, positions, values).view(*batch, short, size // 2 + 1, 2)
    signal = torch.fft.irfft(torch.view_as_complex(half), n=size, norm="forward")
    ordered: Tensor = select_last(signal, order)
    return ordered


class _SparseLongAxis(torch.autograd.Function):
    r"""DCT-III along the long axis of :math:`\operatorname{scatter}(s, \Omega)`, put last.

    Makhoul's length-:math:`N` route (1980). With :math:`X_N = 0`,
    :math:`W_0 = 2 c_0 X_0` and
    :math:`W_u = (c_u X_u - i\,c_{N-u} X_{N-u})\,e^{i\pi u/2N}`, :math:`W` is
    Hermitian and :math:`v_j = \tfrac12 \sum_u W_u e^{2\pi i uj/N}` gives
    :math:`x_{2j} = v_j` and :math:`x_{2j+1} = v_{N-1-j}`. So one real inverse
    FFT of length :math:`N` reads the half :math:`W_{0..\lfloor N/2 \rfloor}/2`, to
    which :math:`X_l` adds :math:`w_l X_l` at one slot: :math:`c_0` at 0,
    :math:`\tfrac{c_l}{2} e^{i\pi l/2N}` at :math:`l < N/2`,
    :math:`\tfrac{c_l}{2} e^{-i\pi l/2N}` at :math:`N - l` for :math:`l > N/2`,
    and :math:`c_l/\sqrt 2` at :math:`N/2`. The forward writes the
    coefficients straight there (no dense spectrum), and the output order is a
    gather. The backward is the adjoint written as gathers only: undo the order,
    one ``rfft``, then
    :math:`\bar s_i = \mu_i (\operatorname{Re} w_i \operatorname{Re} R + \operatorname{Im} w_i
    \operatorname{Im} R)` at the coefficient's slot, :math:`\mu` the slot's
    multiplicity in the Hermitian sum (autograd's own backward would scatter
    through the two gathers, which cost more than the FFTs on the CPU).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        coefficients: Tensor,
        positions: Tensor,
        weights: Tensor,
        adjoint_weights: Tensor,
        order: Tensor,
        unorder: Tensor,
        short: int,
    ) -> Tensor:
        return _long_axis_inverse(coefficients, positions, weights, order, short)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, positions, weights, adjoint_weights, order, unorder, short = inputs
        ctx.save_for_backward(positions, adjoint_weights, unorder)
        ctx.save_for_forward(positions, weights, order)
        ctx.short = short

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        positions, adjoint_weights, unorder = ctx.saved_tensors
        batch = grad.shape[:-2]
        spectrum = torch.fft.rfft(select_last(grad, unorder))
        parts = select_last(torch.view_as_real(spectrum).reshape(*batch, -1), positions)
        parts = (parts * adjoint_weights).view(*batch, -1, 2)
        # two strided halves, not sum(-1): a reduction over a length-2 axis is slow on the CPU
        return parts[..., 0] + parts[..., 1], None, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, *_: Any) -> Tensor:
        positions, weights, order = ctx.saved_tensors
        return _long_axis_inverse(tangent, positions, weights, order, ctx.short)


# Function.apply binds its arguments to forward's signature at every call; a precomputed
# signature (inspect's __signature__ protocol) saves most of the 16 us inspect.signature costs.
_SparseLongAxis.forward.__signature__ = inspect.signature(_SparseLongAxis.forward)  # type: ignore[attr-defined]


@register_basis("dct")
class CosineTransform(InverseTransform):
    r"""Orthonormal 2-D inverse DCT-II (that is, the orthonormal DCT-III).

    With :math:`c_0 = \sqrt{1/N}` and :math:`c_u = \sqrt{2/N}` for :math:`u > 0`,
    the 1-D inverse is

    .. math::

        x_j = \sum_{u=0}^{N-1} c_u X_u \cos\frac{\pi (2j + 1) u}{2N},

    applied along both of the last two dimensions; it equals
    ``scipy.fft.idctn(F, norm="ortho")``. The matrix of the 1-D map is
    orthogonal, so :math:`\|T(F)\|_F = \|F\|_F`. Every shape is accepted.
    A dimension no longer than the other one (and than 512) is transformed by
    a dense matrix product, the other by a real inverse FFT of twice its length.
    """

    orthonormal = True

    def inverse(self, spectrum: Tensor) -> Tensor:
        """Return the orthonormal 2-D inverse DCT-II over the last two dims.

        Args:
            spectrum: real tensor ``(..., m, n)`` in float32 or float64.

        Returns:
            Real tensor of the same shape and dtype.
        """
        m, n = spectrum.shape[-2:]
        rows_done = _inverse_along(spectrum, -1, other=m)
        return _inverse_along(rows_done, -2, other=n).contiguous()

    def synthesize(self, coefficients: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
        r"""Return the 2-D inverse DCT of :math:`\operatorname{scatter}(s, \Omega)`.

        See :meth:`InverseTransform.synthesize`. A factor's shape has one long
        axis, taken by an FFT, and one short one, a dense matrix product. The
        long axis goes first, straight from the coefficients, by a real inverse
        FFT of its own length (:class:`_SparseLongAxis`); the short axis is then
        the product. Shapes whose two axes take the same route in
        :meth:`inverse` use the default.

        Args:
            coefficients: real tensor ``(..., k)``.
            indices: the ``k`` flat positions of :math:`\Omega`, int64, on the
                coefficients' device.
            shape: ``(m, n)``.

        Returns:
            Real tensor ``(..., m, n)`` in the coefficients' dtype.
        """
        m, n = int(shape[0]), int(shape[1])
        dtype = coefficients.dtype
        rows_long = n > min(m, _DENSE_MAX)  # the transform along dim -1 takes the FFT route
        if rows_long == (m > min(n, _DENSE_MAX)) or dtype not in (torch.float32, torch.float64):
            return super().synthesize(coefficients, indices, shape)
        short = m if rows_long else n
        plan = _sparse_plan(indices, m, n, rows_long, dtype)
        if torch.compiler.is_compiling():
            # Dynamo does not trace a Function with a custom jvp; autograd's backward is exact too
            along = _long_axis_inverse(coefficients, plan[0], plan[1], plan[3], short)
            matrix = _dense_plan.__wrapped__(short, dtype, coefficients.device)
        else:
            apply = _SparseLongAxis.apply
            along = apply(coefficients, *plan, short)  # type: ignore[no-untyped-call]
            matrix = _dense_plan(short, dtype, coefficients.device)
        out: Tensor = matrix.T @ along if rows_long else along.mT @ matrix
        return out

    def active_energy(self, shape: tuple[int, int], indices: Tensor) -> float:
        r"""Return the energy of :math:`\Omega`: ``k``, one per location (the basis is orthonormal).

        Each :math:`T(e_p)` is the outer product of two rows of orthogonal
        matrices, of unit norm, and no two are parallel.

        Args:
            shape: ``(m, n)``.
            indices: the ``k`` flat positions of :math:`\Omega`.

        Returns:
            ``float(k)``.
        """
        return float(indices.numel())
