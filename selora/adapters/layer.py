r"""The adapted layers: one adapter's factors (:class:`AdapterUnit`) and the wrapper.

A :class:`SpectralLayer` replaces a frozen ``nn.Linear`` (or Hugging Face's
``Conv1D``, whose weight is stored transposed) and routes its output through
the base of adaptation of one :class:`AdapterUnit`. The unit is a separate
module so that integrations holding several named adapters per layer (the
PEFT bridge, X-LoRA's experts) reuse it unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.config import SpectralAdapter
from selora.adapters.registry import AdaptationBase, get_adapter_base
from selora.spectral_bases import SparseSpectrum, get_basis

__all__ = [
    "AdapterUnit",
    "DenseFactor",
    "SpectralLayer",
    "compute_dtype",
    "frozen_weight",
    "is_supported_layer",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype adapter arithmetic runs in for a layer of ``dtype``.

    float64 layers compute (and keep their adapter parameters) in float64;
    every other dtype (float32, bfloat16, float16) in float32.

    Args:
        dtype: the frozen layer's dtype.

    Returns:
        ``torch.float64`` or ``torch.float32``.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    conv: type[nn.Module] = Conv1D
    return conv


def is_supported_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is an ``nn.Linear`` or a Hugging Face ``Conv1D``.

    Args:
        module: any module.

    Returns:
        ``True`` for the layer types selora can wrap.
    """
    conv = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def frozen_weight(module: nn.Module) -> Tensor:
    r"""Return :math:`W_0` of a supported layer as ``(d_out, d_in)`` (a view, no copy).

    Args:
        module: an ``nn.Linear`` (weight ``(d_out, d_in)``) or a ``Conv1D``
            (weight ``(d_in, d_out)``).

    Returns:
        The weight, transposed for ``Conv1D``.
    """
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight if isinstance(module, nn.Linear) else weight.t()


class DenseFactor(nn.Module):
    """A plain dense factor (``basis=None``): the matrix is the parameter itself.

    Args:
        shape: ``(m, n)``.
        device: where the weight lives.
        dtype: the weight's dtype (float32 by default).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype or torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        r"""Kaiming-uniform init as ``nn.Linear``: :math:`U(-1/\sqrt n, 1/\sqrt n)`."""
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @torch.no_grad()
    def reset_zero(self) -> None:
        """Set the factor to zero (LoRA's B at init)."""
        self.weight.zero_()

    @property
    def n_coeffs(self) -> int:
        """Number of trainable entries, ``m * n``."""
        return int(self.weight.numel())

    def forward(self, dtype: torch.dtype | None = None) -> Tensor:
        """Return the matrix, cast to ``dtype`` if given.

        Args:
            dtype: output dtype; the weight's own if ``None``.

        Returns:
            The ``(m, n)`` matrix.
        """
        return self.weight if dtype is None else self.weight.to(dtype)


Factor = SparseSpectrum | DenseFactor


def make_factor(
    shape: tuple[int, int],
    adapter: SpectralAdapter,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Factor:
    """Build one factor of ``adapter``: a :class:`~selora.SparseSpectrum` or a dense one.

    Args:
        shape: ``(m, n)`` of the factor.
        adapter: gives the basis, the budget and the seed.
        device: where the parameters live.
        dtype: the parameters' dtype (float32 if ``None``).

    Returns:
        The factor, calibrated (Kaiming variance).
    """
    if adapter.basis is None:
        return DenseFactor(shape, device=device, dtype=dtype)
    basis = get_basis(adapter.basis) if isinstance(adapter.basis, str) else adapter.basis
    return SparseSpectrum(
        shape,
        basis,
        sparse_ratio=adapter.sparse_ratio,
        n_coeffs=adapter.n_coeffs,
        seed=adapter.seed,
        device=device,
        dtype=dtype,
    )


class AdapterUnit(nn.Module):
    r"""One adapter on one layer: :math:`\tilde A` ``(r, d_in)``, :math:`\tilde B` ``(d_out, r)``.

    :math:`\tilde A` is calibrated and :math:`\tilde B` starts at zero, so an
    adapted model equals its base model at init. The parameters are float32
    (float64 when :math:`W_0` is float64, see :func:`compute_dtype`), whatever
    the layer's compute dtype. Under ``eval()`` and
    ``torch.no_grad()`` the factors are formed once and cached; the cache is
    keyed on the version counters of the unit's parameters, so any in-place
    change (an optimizer step, ``load_state_dict``) or ``train()`` drops it.

    Args:
        adapter: the adapter description.
        in_features: :math:`d_{in}`.
        out_features: :math:`d_{out}`.
        weight0: the frozen weight ``(d_out, d_in)`` (its device places the
            factors; bases such as DoRA read it at set-up).

    Raises:
        ValueError: if the budget does not fit a factor's shape.
    """

    def __init__(
        self, adapter: SpectralAdapter, in_features: int, out_features: int, weight0: Tensor
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.base: AdaptationBase = get_adapter_base(adapter.base)()
        self.scaling = adapter.scaling
        device = weight0.device
        dtype = compute_dtype(weight0.dtype)
        self.lora_A: Factor = make_factor(
            (adapter.r, in_features), adapter, device=device, dtype=dtype
        )
        self.lora_B: Factor = make_factor(
            (out_features, adapter.r), adapter, device=device, dtype=dtype
        )
        self.lora_B.reset_zero()
        self.dropout: nn.Module = nn.Dropout(adapter.dropout) if adapter.dropout else nn.Identity()
        self._cache: tuple[tuple[Any, ...], Tensor, Tensor] | None = None
        self.base.setup(self, weight0)

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
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.lora_A(dtype), self.lora_B(dtype)
        # Buffers count too: a checkpoint may replace a spectrum's locations.
        tensors = [*self.parameters(), *self.buffers()]
        key = (dtype, *[(id(t), t._version, t.device) for t in tensors])
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.lora_A(dtype), self.lora_B(dtype))
        return self._cache[1], self._cache[2]

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
        self.adapter = AdapterUnit(adapter, self.in_features, self.out_features, weight0)

    def _hold_base_layer(self, base_layer: nn.Module, name: str) -> Tensor:
        """Check, freeze and keep ``base_layer``; set sizes and flags; return :math:`W_0`.

        Wrappers with another set of adapter units (X-LoRA's experts) share it.
        """
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
        return weight0

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight (as stored), so code reading ``.weight`` still works."""
        weight = self.base_layer.weight
        assert isinstance(weight, Tensor)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        """Return the adapted output (the base output when merged or disabled)."""
        base_out: Tensor = self.base_layer(x)
        if self.merged or self.disabled:
            return base_out
        bias = getattr(self.base_layer, "bias", None)
        out: Tensor = self.adapter(x, base_out, frozen_weight(self.base_layer), bias)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the wrapped layer's weight (no-op if merged).

        Raises:
            RuntimeError: if the base of adaptation cannot be merged.
        """
        if self.merged:
            return
        if not self.adapter.base.mergeable:
            raise RuntimeError(
                f"{self.name or 'this layer'}: base {self.adapter.adapter.base!r} cannot be merged"
            )
        weight0 = frozen_weight(self.base_layer)
        merged = self.adapter.base.merged_weight(
            self.adapter, weight0.to(compute_dtype(weight0.dtype))
        )
        weight0.copy_(merged.to(weight0.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore :math:`W_0` from the merged weight (no-op if not merged)."""
        if not self.merged:
            return
        weight = frozen_weight(self.base_layer)
        restored = self.adapter.base.unmerged_weight(
            self.adapter, weight.to(compute_dtype(weight.dtype))
        )
        weight.copy_(restored.to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        """Show the layer's size and whether it is merged."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"merged={self.merged}"
        )
