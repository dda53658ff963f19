"""The Fourier basis (FoRA / FourierFT): the real part of the 2-D inverse DFT."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from selora._tensor_cache import LocationCache
from selora.spectral_bases._gather import select_last
from selora.spectral_bases.registry import InverseTransform, register_basis

__all__ = ["FourierTransform"]

_Plan = tuple[Tensor, Tensor, Tensor]
_plans = LocationCache()


def _halved_rows(m: int, n: int) -> bool:
    """Whether the half spectrum halves the rows (the longer axis) rather than the columns.

    A real FFT halves the axis it runs last, and pocketfft's short transforms
    cost more per element: on one CPU thread, ``irfft2`` of a 576 x 32 matrix
    takes 54 us through its 32 columns and 34 us through its 576 rows, and a
    1536 x 32 one 153 against 80 us (the adjoint ``rfft2`` gains less).
    """
    return m > n


def _half_plan(indices: Tensor, m: int, n: int, dtype: torch.dtype) -> _Plan:
    r"""Where each coefficient lands in the half spectrum, with what weight, and where its re is.

    The half spectrum keeps the first :math:`\lfloor L/2 \rfloor + 1` entries of
    the halved axis of length :math:`L` (the columns, :math:`L = n`, or the rows
    when they are longer, :math:`L = m`; see :func:`_halved_rows`). For
    :math:`p = (u, v)`, the target is :math:`p` itself when it lies there, else
    its mirror :math:`-p`, which does. The weight is 1/2, or 1 on the halved
    axis's lines 0 and :math:`L/2` (see :meth:`FourierTransform.synthesize`).
    The third tensor, ``(2, k)``, holds each target's position in the float
    view of the complex half spectrum (its real part), which the backward
    gathers: in row-major order, then in column-major order, the layout the
    real FFT returns when it halves the rows. Cached per location tensor.
    """

    def build() -> _Plan:
        flat = indices.reshape(-1).to(torch.int64)
        u, v = flat // n, flat % n
        rows = _halved_rows(m, n)
        own, length = (u, m) if rows else (v, n)
        h = length // 2 + 1
        kept = own < h
        tu = torch.where(kept, u, (-u) % m)
        tv = torch.where(kept, v, (-v) % n)
        edge = (own == 0) | ((own == length // 2) & (length % 2 == 0))
        weights = torch.where(edge, 1.0, 0.5).to(dtype)
        hm, hn = (h, n) if rows else (m, h)
        targets = tu * hn + tv
        return targets, weights, torch.stack([targets, tv * hm + tu]) * 2

    return _plans.get(indices, (indices.device, m, n, dtype), build)


def _half_shape(m: int, n: int) -> tuple[int, int]:
    return (m // 2 + 1, n) if _halved_rows(m, n) else (m, n // 2 + 1)


def _half_spectrum_inverse(
    coefficients: Tensor, targets: Tensor, weights: Tensor, m: int, n: int
) -> Tensor:
    hm, hn = _half_shape(m, n)
    batch = coefficients.shape[:-1]
    half = coefficients.new_zeros(*batch, hm * hn).index_add_(-1, targets, coefficients * weights)
    if _halved_rows(m, n):
        # the c2r transform runs along the last dim listed: here the rows
        rows: Tensor = torch.fft.irfftn(half.view(*batch, hm, hn), s=(n, m), dim=(-1, -2))
        return rows
    out: Tensor = torch.fft.irfft2(half.view(*batch, hm, hn), s=(m, n))
    return out


def _half_spectrum_adjoint(grad: Tensor, m: int, n: int) -> Tensor:
    """``DFT_2(grad) / (mn)`` on the half spectrum's entries, as a complex tensor."""
    if _halved_rows(m, n):
        rows: Tensor = torch.fft.rfftn(grad, s=(n, m), dim=(-1, -2), norm="forward")
        return rows
    out: Tensor = torch.fft.rfft2(grad, s=(m, n), norm="forward")
    return out


class _HalfSpectrumSynthesis(torch.autograd.Function):
    r"""``s -> Re(IDFT_2(scatter(s, Omega)))`` through the half spectrum, with its exact adjoint.

    The adjoint of :math:`s \mapsto M` is
    :math:`\bar s_i = \operatorname{Re}\big(\mathrm{DFT}_2(\bar M)\big)_{t_i} / (mn)`: the
    derivative of :math:`M_{jk}` in :math:`s_i` is
    :math:`\cos(2\pi(u_i j/m + v_i k/n)) / (mn)`, the same at :math:`p_i` and at its
    target :math:`t_i = \pm p_i`, and the real part of the forward DFT sums exactly
    those cosines. autograd's own backward of ``irfft2`` would also multiply the
    complex half spectrum by the Hermitian weights, a strided complex product that
    cost more than the FFT itself on the CPU.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        coefficients: Tensor, targets: Tensor, weights: Tensor, real_parts: Tensor, m: int, n: int
    ) -> Tensor:
        return _half_spectrum_inverse(coefficients, targets, weights, m, n)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, targets, weights, real_parts, m, n = inputs
        ctx.save_for_backward(real_parts)
        ctx.save_for_forward(targets, weights)
        ctx.shape = (m, n)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (real_parts,) = ctx.saved_tensors
        m, n = ctx.shape
        batch = grad.shape[:-2]
        spectrum = _half_spectrum_adjoint(grad, m, n)
        order = 0
        if not spectrum.is_contiguous():
            if spectrum.mT.is_contiguous():
                order, spectrum = 1, spectrum.mT  # no copy: read it in its own layout
            else:
                spectrum = spectrum.contiguous()
        parts = torch.view_as_real(spectrum).reshape(*batch, -1)  # re, im interleaved
        return select_last(parts, real_parts[order]), None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, *_: Any) -> Tensor:
        targets, weights = ctx.saved_tensors
        m, n = ctx.shape
        return _half_spectrum_inverse(tangent, targets, weights, m, n)


# Function.apply binds its arguments to forward's signature at every call; a precomputed
# signature (inspect's __signature__ protocol) saves most of the 16 us inspect.signature costs.
_HalfSpectrumSynthesis.forward.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    _HalfSpectrumSynthesis.forward
)


@register_basis("fft")
class FourierTransform(InverseTransform):
    r"""Real part of the 2-D inverse discrete Fourier transform.

    For a spectrum :math:`F \in \mathbb{R}^{m \times n}`,

    .. math::

        M_{jk} = \operatorname{Re} \frac{1}{mn} \sum_{u=0}^{m-1} \sum_{v=0}^{n-1}
        F_{uv} \exp\Big(2\pi i \big(\tfrac{uj}{m} + \tfrac{vk}{n}\big)\Big),

    which is ``numpy.fft.ifft2(F).real``. The map is linear in ``F`` but not
    orthonormal (its scale is :math:`1/(mn)`), which calibration absorbs.
    Every shape is accepted.
    """

    orthonormal = False

    def inverse(self, spectrum: Tensor) -> Tensor:
        r"""Return :math:`\operatorname{Re}\,\mathrm{IDFT}_2(F)` over the last two dims.

        Args:
            spectrum: real tensor ``(..., m, n)`` in float32 or float64.

        Returns:
            Real tensor of the same shape and dtype.
        """
        out: Tensor = torch.fft.ifft2(spectrum, dim=(-2, -1)).real
        return out.contiguous()

    def synthesize(self, coefficients: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
        r"""Return :math:`\operatorname{Re}\,\mathrm{IDFT}_2(\operatorname{scatter}(s, \Omega))`.

        See :meth:`InverseTransform.synthesize`. The real part of the inverse
        DFT of a real spectrum :math:`F` is the inverse DFT of its even part
        :math:`F^e_p = (F_p + F_{-p})/2`, which is real and Hermitian, so a real
        inverse FFT (``irfft2``) computes it from the half spectrum
        :math:`H = F^e_{:, 0..\lfloor n/2 \rfloor}` at about half the cost of a
        complex one. A coefficient at :math:`p = (u, v)` adds :math:`s/2` to
        :math:`H` at whichever of :math:`p` and :math:`-p` lies in the half; in
        the columns :math:`v = 0` and :math:`v = n/2`, where both do, it adds
        :math:`s` at :math:`p` alone, because ``irfft2`` keeps only the real
        part of those columns after the inverse DFT along the rows, and
        :math:`\cos` is even, so the split would not change it. One
        ``index_add`` builds :math:`H`; the backward is one ``rfft2`` and one
        gather (:class:`_HalfSpectrumSynthesis`). When the rows are longer
        (:math:`m > n`) the roles of the axes swap: :math:`H` keeps the rows
        :math:`u \le \lfloor m/2 \rfloor`, and the real transform runs along
        the rows, last, which is the cheaper order (:func:`_halved_rows`).

        Args:
            coefficients: real tensor ``(..., k)`` in float32 or float64.
            indices: the ``k`` flat positions of :math:`\Omega`, int64, on the
                coefficients' device.
            shape: ``(m, n)``.

        Returns:
            Real tensor ``(..., m, n)`` in the coefficients' dtype.
        """
        m, n = int(shape[0]), int(shape[1])
        if coefficients.dtype not in (torch.float32, torch.float64):
            return super().synthesize(coefficients, indices, shape)
        targets, weights, real_parts = _half_plan(indices, m, n, coefficients.dtype)
        if torch.compiler.is_compiling():
            # Dynamo does not trace a Function with a custom jvp; autograd's backward is exact too
            return _half_spectrum_inverse(coefficients, targets, weights, m, n)
        out: Tensor = _HalfSpectrumSynthesis.apply(  # type: ignore[no-untyped-call]
            coefficients, targets, weights, real_parts, m, n
        )
        return out

    def active_energy(self, shape: tuple[int, int], indices: Tensor) -> float:
        r"""Return the energy of :math:`\Omega` in closed form.

        See :meth:`InverseTransform.active_energy`.

        The unit spectrum at :math:`p = (u, v)` gives
        :math:`T(e_p)_{jk} = \cos(2\pi (uj/m + vk/n)) / (mn)`, the same matrix
        as its mirror :math:`-p = (-u \bmod m, -v \bmod n)`. Summing
        :math:`\cos^2` over the grid gives :math:`\|T(e_p)\|_F^2 = 1/(mn)` when
        :math:`p = -p` (the cosine is :math:`\pm 1` everywhere) and
        :math:`1/(2mn)` otherwise. A pair :math:`\{p, -p\} \subseteq \Omega`
        always moves together and counts as one matrix of twice the amplitude,
        of energy :math:`4/(2mn)`. Per location of :math:`\Omega`:

        .. math::

            E = \frac{1}{2mn}\,\big(k + |\{p \in \Omega : -p \in \Omega\}|\big),

        (a self-mirrored :math:`p` is its own mirror and counts twice), in
        :math:`O(k \log k)`.

        Args:
            shape: ``(m, n)``.
            indices: the ``k`` distinct flat positions of :math:`\Omega`.

        Returns:
            :math:`E`.
        """
        m, n = int(shape[0]), int(shape[1])
        flat = indices.detach().to("cpu", torch.int64).reshape(-1)
        mirror = ((-(flat // n)) % m) * n + (-(flat % n)) % n
        paired = int(torch.isin(mirror, flat).sum())
        return (flat.numel() + paired) / (2.0 * m * n)
