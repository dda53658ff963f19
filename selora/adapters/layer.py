r"""The adapted layers: one adapter's factors (:class:`AdapterUnit`) and the wrapper.

A :class:`SpectralLayer` replaces a frozen ``nn.Linear`` (or Hugging Face's
``Conv1D``, whose weight is stored transposed) and routes its output through
the base of adaptation of one :class:`AdapterUnit`. The unit is a separate
module so that integrations holding several named adapters per layer (the
PEFT bridge, X-LoRA's experts) reuse it unchanged.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from selora.adapters.config import SpectralAdapter
from selora.adapters.factor_cache import CacheEntry, cache_key, unchanged
from selora.adapters.factors import DenseFactor, Factor, make_factor
from selora.adapters.layer_types import (
    compute_dtype,
    frozen_weight,
    is_quantized_layer,
    is_supported_layer,
    quantized_layer_error,
)
from selora.adapters.registry import AdaptationBase, get_adapter_base

__all__ = [
    "AdapterUnit",
    "DenseFactor",
    "SpectralLayer",
    "compute_dtype",
    "frozen_weight",
    "is_quantized_layer",
    "is_supported_layer",
]


class _Unmerge(nn.Module):
    """Calls the base's ``unmerged_weight`` so that ``functional_call`` can swap tensors in."""

    def __init__(self, unit: AdapterUnit) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, weight: Tensor) -> Tensor:
        restored: Tensor = self.unit.base.unmerged_weight(self.unit, weight)
        return restored


class AdapterUnit(nn.Module):
    r"""One adapter on one layer: :math:`\tilde A` ``(r, d_in)``, :math:`\tilde B` ``(d_out, r)``.

    :math:`\tilde A` is calibrated and :math:`\tilde B` starts at zero, so an
    adapted model equals its base model at init. The parameters are float32
    (float64 when :math:`W_0` is float64, see :func:`compute_dtype`), whatever
    the layer's compute dtype.

    Under ``eval()`` and ``torch.no_grad()`` (unmerged inference, generation)
    the factors are formed once and cached. The cache keeps a copy of every
    parameter the factors are formed from (the coefficients, or a custom
    factor's parameters) and is used only while each parameter still equals
    its copy (same device, dtype, shape and bytes: :math:`O(k)` per call, far
    cheaper than a transform), with the same factor modules, bases and scales,
    and the same buffers (the locations: same tensor, same version counter).
    So the output follows the parameters whatever changed them: an optimizer
    step, ``load_state_dict``, ``p.data = ...`` or ``p.data.mul_``,
    ``vector_to_parameters``, an EMA swap. Locations are followed when
    replaced (``set_locations``, a checkpoint, ``to``) or changed in place
    (``copy_``); a write into a location buffer through ``.data``, which
    nothing in torch or selora does (they are neither trainable nor in the
    state dict), is not seen: comparing the int64 locations by value at every
    token would triple the bytes each check reads. Dense factors
    (``basis=None``) are never cached (they are the parameters). The cache is
    safe to share between threads: an entry is published by one assignment
    and read once.

    Args:
        adapter: the adapter description.
        in_features: :math:`d_{in}`.
        out_features: :math:`d_{out}`.
        weight0: the frozen weight ``(d_out, d_in)`` (its device places the
            factors; bases such as DoRA read it at set-up).
        name: the unit's name in its model, for messages.

    Attributes:
        finite_checks: if ``True``, every forward checks the unit's parameters
            and factors for NaN / inf and raises ``ValueError`` (see
            :func:`selora.set_finite_checks`). Off by default.

    Raises:
        ValueError: if the budget does not fit a factor's shape.

    Warns:
        UserWarning: if :math:`r > \min(d_{in}, d_{out})`, naming the sizes and
            the trainable parameter count against the layer's weight count: the
            update's rank cannot exceed :math:`\min(d_{in}, d_{out})`.
    """

    def __init__(
        self,
        adapter: SpectralAdapter,
        in_features: int,
        out_features: int,
        weight0: Tensor,
        *,
        name: str = "",
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.name = name
        self.finite_checks = False
        self.base: AdaptationBase = get_adapter_base(adapter.base)()
        self.scaling = adapter.scaling
        device = weight0.device
        dtype = compute_dtype(weight0.dtype)
        self.lora_A: Factor = make_factor(
            (adapter.r, in_features), adapter, device=device, dtype=dtype
        )
        self.lora_B: Factor = make_factor(
            (out_features, adapter.r), adapter, device=device, dtype=dtype, init="zero"
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
                stacklevel=2,
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
            a, b = factor_a(dtype), factor_b(dtype)
            if self.finite_checks:
                self._check_finite(a, b)
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

    def merged(self, weight: Tensor, *, safe: bool = False, where: str = "") -> Tensor:
        r"""Return the merged weight for the stored weight ``weight``, in its dtype.

        The base of adaptation's :meth:`~AdaptationBase.merged_weight` runs in
        the compute dtype (:func:`compute_dtype`). Nothing is written.

        With ``safe``, three checks run first and raise ``ValueError`` naming
        ``where``: every parameter and buffer of the unit is finite
        (:meth:`nonfinite`); the merged weight is finite in ``weight``'s dtype;
        and unmerging it would restore :math:`W_0`:
        :math:`\max|W_0' - W_0| \le \sqrt{\epsilon}\,\max|W_0|`, with
        :math:`W_0'` the round trip and :math:`\epsilon` the machine epsilon of
        ``weight``'s dtype (float32: :math:`3.5 \cdot 10^{-4}` of the largest
        entry, bfloat16: :math:`0.088`). An update so large that merging rounds
        :math:`W_0` away (:math:`W_0 + 10^{30} = 10^{30}` in float32) fails the
        last check though every number is finite.

        Args:
            weight: the stored :math:`W_0` as ``(d_out, d_in)``.
            safe: run the checks.
            where: the layer's name for messages.

        Returns:
            The merged weight, ``weight``'s dtype and shape.

        Raises:
            RuntimeError: if the base of adaptation cannot be merged.
            ValueError: with ``safe``, if a check fails.
        """
        where = where or self.name or "this layer"
        if not self.base.mergeable:
            raise RuntimeError(f"{where}: base {self.adapter.base!r} cannot be merged")
        if safe:
            bad = self.nonfinite()
            if bad:
                raise ValueError(
                    f"{where}: adapter tensor {bad[0]!r} holds NaN or inf; nothing was merged"
                )
        cdtype = compute_dtype(weight.dtype)
        weight0 = weight.to(cdtype)
        merged = self.base.merged_weight(self, weight0).to(weight.dtype)
        if safe:
            self._check_round_trip(weight0, merged, where)
        return merged

    def _check_round_trip(self, weight0: Tensor, merged: Tensor, where: str) -> None:
        if not bool(torch.isfinite(merged).all()):
            raise ValueError(
                f"{where}: the merged weight holds NaN or inf in {merged.dtype}; nothing was merged"
            )
        try:
            restored = self.base.unmerged_weight(self, merged.to(weight0.dtype))
        except RuntimeError as exc:
            raise ValueError(
                f"{where}: merging could not be undone ({exc}); nothing was merged"
            ) from exc
        restored = restored.to(merged.dtype).to(weight0.dtype)
        eps = torch.finfo(merged.dtype).eps
        scale = float(weight0.abs().max()) if weight0.numel() else 0.0
        error = float((restored - weight0).abs().max()) if weight0.numel() else 0.0
        tolerance = math.sqrt(eps) * scale if scale > 0 else 4 * eps * float(merged.abs().max())
        if not error <= tolerance:  # NaN fails too
            raise ValueError(
                f"{where}: unmerging would not restore the frozen weight (a merge and unmerge "
                f"round trip is off by up to {error:.3g} for entries up to {scale:.3g}, "
                f"tolerance {tolerance:.3g} in {merged.dtype}): the update is too large to "
                "merge reversibly; nothing was merged"
            )

    def record_merge(self) -> None:
        """Remember the tensors just merged, so that :meth:`unmerged` undoes exactly that.

        A copy of every parameter and buffer (:math:`O(k)`); it is dropped by
        :meth:`unmerged`.
        """
        self._merged_state = {
            name: t.detach().clone()
            for name, t in [*self.named_parameters(), *self.named_buffers()]
        }

    def unmerged(self, weight: Tensor) -> Tensor:
        r"""Return :math:`W_0` from the merged weight ``weight``, in its dtype.

        The update undone is the one recorded by :meth:`record_merge`: if the
        adapter changed while merged (an optimizer step, ``p.data``), the
        recorded tensors are used instead of the current ones, so that the
        frozen weight is not shifted by the difference.

        Args:
            weight: the stored merged weight as ``(d_out, d_in)``.

        Returns:
            The restored weight, ``weight``'s dtype and shape.
        """
        state, self._merged_state = self._merged_state, None
        current = dict([*self.named_parameters(), *self.named_buffers()])
        merged = weight.to(compute_dtype(weight.dtype))
        if (
            state is None
            or state.keys() != current.keys()
            or unchanged(list(current.values()), tuple(state[name] for name in current))
        ):
            restored: Tensor = self.base.unmerged_weight(self, merged)
        else:
            restored = functional_call(
                _Unmerge(self), {f"unit.{name}": t for name, t in state.items()}, (merged,)
            )
        return restored.to(weight.dtype)

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

    def extra_repr(self) -> str:
        """Name the base of adaptation and the scale."""
        return f"base={self.adapter.base!r}, scaling={self.scaling:g}"


def _refuse_load_while_merged(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """``load_state_dict`` pre-hook: refuse adapter tensors while the layer is merged."""
    if not getattr(module, "merged", False):
        return
    frozen = prefix + "base_layer."
    keys = [k for k in state_dict if k.startswith(prefix) and not k.startswith(frozen)]
    if keys:
        name = getattr(module, "name", "") or prefix.rstrip(".") or "this layer"
        raise RuntimeError(
            f"{name}: cannot load {keys[0]!r} while the adapter is merged into the frozen "
            "weight (the merged weight would keep the old update); unmerge() first, load, "
            "then merge() again"
        )


class SpectralLayer(nn.Module):
    r"""A frozen ``nn.Linear`` / ``Conv1D`` with one spectral adapter.

    ``forward(x)`` is the base of adaptation applied to ``base_layer(x)``
    (for ``lora``: :math:`W_0 x + b + \tfrac{\alpha}{r}\tilde B \tilde A x`), or just
    ``base_layer(x)`` once merged or while the adapter is disabled.

    Args:
        base_layer: the layer to adapt (its parameters are frozen).
        adapter: the adapter description.
        name: the module's name in its model, for error messages.

    Raises:
        TypeError: if ``base_layer`` is not a supported layer type.
    """

    def __init__(self, base_layer: nn.Module, adapter: SpectralAdapter, *, name: str = "") -> None:
        super().__init__()
        weight0 = self._hold_base_layer(base_layer, name)
        self.adapter = AdapterUnit(
            adapter, self.in_features, self.out_features, weight0, name=f"{name}.adapter"
        )

    def _hold_base_layer(self, base_layer: nn.Module, name: str) -> Tensor:
        """Check, freeze and keep ``base_layer``; set sizes and flags; return :math:`W_0`.

        Wrappers with another set of adapter units (X-LoRA's experts) share it.
        """
        if is_quantized_layer(base_layer):
            raise quantized_layer_error(base_layer, name)
        if not is_supported_layer(base_layer):
            raise TypeError(
                f"selora adapts nn.Linear and transformers' Conv1D; {name or 'the module'} "
                f"is a {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        weight0 = frozen_weight(base_layer)
        self.out_features, self.in_features = int(weight0.shape[0]), int(weight0.shape[1])
        self.name = name
        self.merged = False
        self.disabled = False
        # The private form takes the module too on torch 2.4 (the public one is 2.5+).
        self._register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            _refuse_load_while_merged, with_module=True
        )
        return weight0

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight (as stored), so code reading ``.weight`` still works."""
        weight = self.base_layer.weight
        assert isinstance(weight, Tensor)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        """Return the adapted output (the base output when merged or disabled)."""
        base_layer = self._modules["base_layer"]  # the dict: __getattr__ costs, per token
        assert base_layer is not None
        base_out: Tensor = base_layer(x)
        if self.merged or self.disabled:
            return base_out
        bias = getattr(base_layer, "bias", None)
        out: Tensor = self.adapter(x, base_out, frozen_weight(base_layer), bias)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the wrapped layer's weight (no-op if merged).

        Unchecked, as PEFT's default; :meth:`check_merge` first (or
        ``selora.merge(model, safe=True)``) refuses a merge that would destroy
        the frozen weight.

        Raises:
            RuntimeError: if the base of adaptation cannot be merged.
        """
        if self.merged:
            return
        weight0 = frozen_weight(self.base_layer)
        merged = self.adapter.merged(weight0, where=self.name)
        weight0.copy_(merged)
        self.adapter.record_merge()
        self.merged = True

    @torch.no_grad()
    def check_merge(self) -> None:
        """Check that :meth:`merge` is safe, writing nothing (no-op if merged).

        The checks of :meth:`AdapterUnit.merged` with ``safe=True``: finite
        adapter tensors, a finite merged weight, and a merge that unmerge can
        undo.

        Raises:
            RuntimeError: if the layer cannot be merged (X-LoRA).
            ValueError: if a check fails (naming the layer).
        """
        if self.merged:
            return
        if not getattr(self, "mergeable", True):
            self.merge()  # raises, saying why
        self.adapter.merged(frozen_weight(self.base_layer), safe=True, where=self.name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore :math:`W_0` from the merged weight (no-op if not merged).

        The update subtracted is the one merged, even if the adapter changed
        since (:meth:`AdapterUnit.unmerged`). The restored weight is :math:`W_0`
        up to float rounding (about the dtype's epsilon times the merged
        weight's entries); a merge of a non-finite or huge update cannot be
        undone, which ``merge(safe=True)`` refuses up front.
        """
        if not self.merged:
            return
        weight = frozen_weight(self.base_layer)
        weight.copy_(self.adapter.unmerged(weight))
        self.merged = False

    def extra_repr(self) -> str:
        """Show the layer's size and whether it is merged."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"merged={self.merged}"
        )
