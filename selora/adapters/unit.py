r"""One adapter on one layer: :class:`AdapterUnit`, the factors and the extras of a base.

A unit holds :math:`\tilde A` ``(r, d_in)`` and :math:`\tilde B` ``(d_out, r)`` (each a
:class:`~selora.SparseSpectrum` or a dense factor) and whatever its base of
adaptation adds (DoRA's magnitude). :class:`~selora.SpectralLayer` holds any
number of named units around one frozen layer.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call

from selora.adapters.config import SpectralAdapter
from selora.adapters.factor_batch import prebuilt
from selora.adapters.factor_cache import CacheEntry, cache_key, unchanged
from selora.adapters.factors import DenseFactor, Factor, make_factor
from selora.adapters.layer_kinds import LINEAR, LayerKind
from selora.adapters.layer_types import compute_dtype
from selora.adapters.registry import AdaptationBase, Update, get_adapter_base

__all__ = ["AdapterUnit", "adapter_dtype"]


def adapter_dtype(adapter: SpectralAdapter, weight_dtype: torch.dtype) -> torch.dtype:
    """Return the dtype of an adapter's parameters on a layer of ``weight_dtype``.

    With ``autocast_adapter_dtype`` (the default, PEFT's too) it is the compute
    dtype (:func:`~selora.adapters.layer_types.compute_dtype`: float32, or
    float64 for a float64 layer); without it, the layer's own floating dtype.

    Args:
        adapter: the adapter description.
        weight_dtype: the frozen weight's dtype.

    Returns:
        The dtype.
    """
    if adapter.autocast_adapter_dtype or not weight_dtype.is_floating_point:
        return compute_dtype(weight_dtype)
    return weight_dtype


class _RecordedUpdate(nn.Module):
    """Calls the base's ``update`` so that ``functional_call`` can swap the recorded tensors in."""

    def __init__(self, unit: AdapterUnit) -> None:
        super().__init__()
        self.unit = unit

    def forward(self) -> Update:
        return self.unit.base.update(self.unit, None)


class AdapterUnit(nn.Module):
    r"""One adapter on one layer: :math:`\tilde A` ``(r, d_in)``, :math:`\tilde B` ``(d_out, r)``.

    With ``init_weights`` (the default) :math:`\tilde A` is calibrated and
    :math:`\tilde B` starts at zero, so an adapted model equals its base model
    at init; without it :math:`\tilde B` is calibrated too (a random non-zero
    update, for tests). The parameters take :func:`adapter_dtype`.

    Under ``eval()`` and ``torch.no_grad()`` (unmerged inference, generation)
    the factors are formed once and cached. The cache keeps a copy of every
    parameter the factors are formed from and is used only while each
    parameter still equals its copy (same device, dtype, shape and bytes:
    :math:`O(k)` per call, far cheaper than a transform), with the same factor
    modules, bases and scales, and the same location buffers (same tensor,
    same version counter). So the output follows the parameters whatever
    changed them: an optimizer step, ``load_state_dict``, ``p.data = ...``,
    an EMA swap. Dense factors (``basis=None``) are never cached. The cache is
    safe to share between threads: an entry is published by one assignment
    and read once.

    Args:
        adapter: the adapter description.
        in_features: :math:`d_{in}`.
        out_features: :math:`d_{out}`.
        weight0: the frozen weight ``(d_out, d_in)`` (its device places the
            factors; bases such as DoRA read it at set-up).
        name: the unit's name in its model, for messages.
        kind: how the factors meet the layer (:mod:`selora.adapters.layer_kinds`;
            linear by default).

    Attributes:
        finite_checks: if ``True``, every forward checks the unit's parameters
            and factors for NaN / inf and raises ``ValueError`` (see
            :func:`selora.set_finite_checks`). Off by default.

    Raises:
        ValueError: if the budget does not fit a factor's shape.

    Warns:
        UserWarning: if :math:`r > \min(d_{in}, d_{out})`, naming the sizes and
            the trainable parameter count against the layer's weight count.
    """

    def __init__(
        self,
        adapter: SpectralAdapter,
        in_features: int,
        out_features: int,
        weight0: Tensor,
        *,
        name: str = "",
        kind: LayerKind = LINEAR,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.name = name
        self.kind = kind
        self.finite_checks = False
        self.base: AdaptationBase = get_adapter_base(adapter.base)()
        self.scaling = adapter.scaling
        device, dtype = weight0.device, adapter_dtype(adapter, weight0.dtype)
        self.lora_A: Factor = make_factor(
            (adapter.r, in_features), adapter, device=device, dtype=dtype
        )
        self.lora_B: Factor = make_factor(
            (out_features, adapter.r),
            adapter,
            device=device,
            dtype=dtype,
            init="zero" if adapter.init_weights else "kaiming",
        )
        self.dropout: nn.Module = nn.Dropout(adapter.dropout) if adapter.dropout else nn.Identity()
        self._cache: CacheEntry | None = None
        self._merged_state: dict[str, Tensor] | None = None
        self.base.setup(self, weight0)
        if adapter.r > min(in_features, out_features):
            trainable = sum(p.numel() for p in self.parameters())
            warnings.warn(
                f"r={adapter.r} exceeds min(d_in={in_features}, d_out={out_features}) = "
                f"{min(in_features, out_features)}, the largest rank an update of this layer "
                f"can have: the adapter has {trainable:,} trainable parameters for the "
                f"layer's {in_features * out_features:,} weights",
                UserWarning,
                stacklevel=3,
            )

    def train(self, mode: bool = True) -> AdapterUnit:
        """Switch mode and drop the factor cache."""
        self._cache = None
        return super().train(mode)

    def factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        r"""Return :math:`(\tilde A, \tilde B)` in ``dtype`` (transforms run in float32).

        Args:
            dtype: the layer's compute dtype.

        Returns:
            ``(A, B)`` with shapes ``(r, d_in)`` and ``(d_out, r)``.
        """
        # Straight from the dict: nn.Module.__getattr__ costs a microsecond a call, per token.
        modules = self._modules
        factor_a: Factor = modules["lora_A"]  # type: ignore[assignment]
        factor_b: Factor = modules["lora_B"]  # type: ignore[assignment]
        if (
            self.training
            or torch.is_grad_enabled()
            or self.finite_checks
            or (isinstance(factor_a, DenseFactor) and isinstance(factor_b, DenseFactor))
        ):
            if self.finite_checks:
                a, b = factor_a(dtype), factor_b(dtype)
                self._check_finite(a, b)
                return a, b
            # formed in one batched transform for the whole model call, if it was
            pre_a, pre_b = prebuilt(factor_a), prebuilt(factor_b)
            a = factor_a(dtype) if pre_a is None else pre_a.to(dtype)
            b = factor_b(dtype) if pre_b is None else pre_b.to(dtype)
            return a, b
        params, buffers, key = cache_key(dtype, factor_a, factor_b)
        entry = self._cache  # read once: another thread may publish a new entry meanwhile
        if entry is not None and entry[0] == key and unchanged(params, entry[2]):
            return entry[3], entry[4]
        # Copy before forming: if a parameter changes meanwhile, the next call sees it.
        copies = tuple(p.detach().clone(memory_format=torch.contiguous_format) for p in params)
        a, b = factor_a(dtype), factor_b(dtype)
        if not any(t.is_meta for t in (*params, *buffers)):
            # Published whole, in one assignment; the buffers are held so that their ids
            # in the key cannot be reused by new tensors.
            self._cache = (key, tuple(buffers), copies, a, b)
        return a, b

    def nonfinite(self) -> list[str]:
        """Name the unit's floating-point parameters and buffers holding NaN or inf.

        Returns:
            Their names relative to the unit (``"lora_B.coefficients"``), in order.
        """
        tensors = [*self.named_parameters(), *self.named_buffers()]
        return [
            name
            for name, t in tensors
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())
        ]

    def _check_finite(self, a: Tensor, b: Tensor) -> None:
        where = self.name or "adapter"
        bad = self.nonfinite()
        if bad:
            raise ValueError(
                f"{where}: {where}.{bad[0]} holds NaN or inf ({len(bad)} non-finite "
                "tensor(s); selora.set_finite_checks is on)"
            )
        for label, factor in (("A", a), ("B", b)):
            if not bool(torch.isfinite(factor).all()):
                raise ValueError(
                    f"{where}: the factor {label} formed from finite coefficients holds NaN "
                    "or inf (an overflow; selora.set_finite_checks is on)"
                )

    def update(self, weight0: Tensor) -> Update:
        r"""Return the merge update :math:`(S, C)`: :math:`W = W_0 + W_0 \odot S + C`.

        See :meth:`~selora.AdaptationBase.update`. ``weight0`` must be in the
        compute dtype; a base that needs :math:`W_0` to undo the merge (DoRA's
        row norms) records it now.

        Args:
            weight0: :math:`W_0` as ``(d_out, d_in)``.

        Returns:
            ``(S, C)``; either may be ``None`` (no term).

        Raises:
            RuntimeError: if the base of adaptation cannot be merged.
        """
        if not self.base.mergeable:
            raise RuntimeError(
                f"{self.name or 'adapter'}: base {self.adapter.base!r} cannot be merged"
            )
        return self.base.update(self, weight0)

    def record_merge(self) -> None:
        """Remember the tensors just merged, so that :meth:`merged_update` gives exactly that.

        A copy of every parameter and buffer (:math:`O(k)`); :meth:`forget_merge` drops it.
        """
        self._merged_state = {
            name: t.detach().clone()
            for name, t in [*self.named_parameters(), *self.named_buffers()]
        }

    def forget_merge(self) -> None:
        """Drop what :meth:`record_merge` kept (after an unmerge)."""
        self._merged_state = None

    def merged_update(self) -> Update:
        r"""Return the :math:`(S, C)` that was merged, even if the adapter changed since.

        If the parameters changed while merged (an optimizer step, ``p.data``),
        the recorded copies are used, so that unmerging does not shift
        :math:`W_0` by the difference.

        Returns:
            ``(S, C)`` as :meth:`update` gave them at the merge.
        """
        state = self._merged_state
        current = dict([*self.named_parameters(), *self.named_buffers()])
        if (
            state is None
            or state.keys() != current.keys()
            or unchanged(list(current.values()), tuple(state[name] for name in current))
        ):
            return self.base.update(self, None)
        update: Update = functional_call(
            _RecordedUpdate(self), {f"unit.{name}": t for name, t in state.items()}, ()
        )
        return update

    def forward(self, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None) -> Tensor:
        """Apply the base of adaptation to the frozen layer's output.

        Args:
            x: layer input ``(..., d_in)``.
            base_out: frozen output ``(..., d_out)``.
            weight0: ``(d_out, d_in)``.
            bias: the frozen bias or ``None``.

        Returns:
            The adapted output.
        """
        out: Tensor = self.base.forward(self, x, base_out, weight0, bias)
        return out

    def delta(self, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None) -> Tensor:
        """Return the update alone, ``forward(...) - base_out`` (see :meth:`AdaptationBase.delta`).

        Args:
            x: layer input ``(..., d_in)``.
            base_out: frozen output ``(..., d_out)``.
            weight0: ``(d_out, d_in)``.
            bias: the frozen bias or ``None``.

        Returns:
            ``(..., d_out)``.
        """
        out: Tensor = self.base.delta(self, x, base_out, weight0, bias)
        return out

    def extra_repr(self) -> str:
        """Name the base of adaptation and the scale."""
        return f"base={self.adapter.base!r}, scaling={self.scaling:g}"
