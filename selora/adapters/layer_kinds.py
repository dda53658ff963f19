r"""Layer kinds: how an adapter's factors meet each kind of frozen layer.

Every base of adaptation works on the frozen weight as one matrix
:math:`W_0` ``(d_out, d_in)`` and on two factors :math:`\tilde A` ``(r, d_in)``
and :math:`\tilde B` ``(d_out, r)``. A *layer kind* says what that matrix is
for a layer type and how a matrix of that shape acts on the layer's input:

=================  ==========================================  =====================================
layer              :math:`W_0` ``(d_out, d_in)``               low-rank update of the input
=================  ==========================================  =====================================
``nn.Linear``,     the weight (transposed for ``Conv1D``)      :math:`\tilde B (\tilde A x)`
``Conv1D``
``nn.Embedding``   the table transposed, ``(embedding_dim,     the columns of :math:`\tilde A` for
                   num_embeddings)``                           the token ids, then :math:`\tilde B`
``nn.Conv1d`` /    the kernel flattened to ``(out, in *        a convolution with :math:`\tilde A`
``nn.Conv2d``      prod(kernel))``                             (the layer's stride, padding,
                                                               dilation), then a 1x1 one with
                                                               :math:`\tilde B`
=================  ==========================================  =====================================

as Hugging Face PEFT's LoRA ``Embedding`` and ``Conv`` layers do: the low-rank
path never forms the dense update. :meth:`LayerKind.dense` applies a dense
``(d_out, d_in)`` matrix the layer's way (HiRA), and :meth:`LayerKind.channels`
shapes a per-output vector to broadcast against the output (DoRA's gain, the
bias), whose features sit on the last axis for linear and embedding layers and
on axis 1 for convolutions. Convolutions with ``groups > 1`` and embeddings
with ``max_norm`` or ``sparse`` gradients are refused (:func:`kind_refusal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as nnf
from torch import Tensor, nn

__all__ = [
    "LINEAR",
    "ConvKind",
    "EmbeddingKind",
    "LayerKind",
    "flat_weight",
    "is_kind_layer",
    "kind_refusal",
    "layer_kind",
]


@dataclass(frozen=True)
class LayerKind:
    """A linear layer (``nn.Linear``, ``Conv1D``): features on the last axis."""

    label: ClassVar[str] = "linear"
    takes_dropout: ClassVar[bool] = True

    def low_rank(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        r"""Return :math:`\tilde B \tilde A` applied to ``x`` without forming it."""
        return nnf.linear(nnf.linear(x, a), b)

    def dense(self, x: Tensor, weight: Tensor) -> Tensor:
        """Apply a dense ``(d_out, d_in)`` matrix to ``x`` as the layer applies its weight."""
        return nnf.linear(x, weight)

    def channels(self, vector: Tensor) -> Tensor:
        """Shape a ``(d_out,)`` vector to broadcast against the layer's output."""
        return vector


LINEAR = LayerKind()
"""The kind of ``nn.Linear`` and ``Conv1D`` layers (and of a unit built without a layer)."""


@dataclass(frozen=True)
class EmbeddingKind(LayerKind):
    """An ``nn.Embedding``: integer ids in, features on the last axis; no dropout (as PEFT)."""

    label: ClassVar[str] = "embedding"
    takes_dropout: ClassVar[bool] = False
    padding_idx: int | None = None
    scale_grad_by_freq: bool = False

    def _embed(self, x: Tensor, table: Tensor) -> Tensor:
        return nnf.embedding(
            x, table, padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq
        )

    def low_rank(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        r"""Gather the columns of :math:`\tilde A` for the ids, then apply :math:`\tilde B`."""
        return nnf.linear(self._embed(x, a.t()), b)

    def dense(self, x: Tensor, weight: Tensor) -> Tensor:
        """Look the ids up in ``weight`` ``(embedding_dim, num_embeddings)`` transposed."""
        return self._embed(x, weight.t())


@dataclass(frozen=True)
class ConvKind(LayerKind):
    """An ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups == 1``: channels on axis 1."""

    label: ClassVar[str] = "conv"
    weight_shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = ()

    @property
    def dims(self) -> int:
        """1 or 2, the number of spatial axes."""
        return len(self.weight_shape) - 2

    def _conv(self, x: Tensor, weight: Tensor, full: bool) -> Tensor:
        fn = nnf.conv1d if self.dims == 1 else nnf.conv2d
        if not full:  # the 1x1 convolution
            return fn(x, weight)
        if self.padding_mode != "zeros":
            x = nnf.pad(x, self.reversed_padding, mode=self.padding_mode)
            return fn(x, weight, None, self.stride, 0, self.dilation)
        return fn(x, weight, None, self.stride, self.padding, self.dilation)

    def low_rank(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        r"""Convolve with :math:`\tilde A` as a kernel, then with :math:`\tilde B` as 1x1."""
        r, kernel = a.shape[0], self.weight_shape[1:]
        hidden = self._conv(x, a.reshape(r, *kernel), True)
        return self._conv(hidden, b.reshape(b.shape[0], r, *([1] * self.dims)), False)

    def dense(self, x: Tensor, weight: Tensor) -> Tensor:
        """Convolve with ``weight`` ``(out, in * prod(kernel))`` reshaped to the kernel."""
        return self._conv(x, weight.reshape(self.weight_shape), True)

    def channels(self, vector: Tensor) -> Tensor:
        """Shape ``(out,)`` to ``(out, 1[, 1])`` (channels on axis 1)."""
        return vector.reshape(-1, *([1] * self.dims))


_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


def is_kind_layer(module: nn.Module) -> bool:
    """Tell whether ``module`` is an ``nn.Embedding``, ``nn.Conv1d`` or ``nn.Conv2d``.

    Subclasses from quantization packages are not meant here; they are refused
    by :mod:`selora.adapters.layer_types` first.

    Args:
        module: any module.

    Returns:
        ``True`` for the non-linear layer types selora adapts.
    """
    return isinstance(module, (nn.Embedding, *_CONV_TYPES))


def kind_refusal(module: nn.Module) -> str | None:
    """Say why an embedding or convolution cannot be adapted, or ``None`` if it can.

    Args:
        module: an ``nn.Embedding``, ``nn.Conv1d`` or ``nn.Conv2d``.

    Returns:
        The reason, or ``None``.
    """
    kind = type(module).__name__
    if isinstance(module, _CONV_TYPES) and module.groups != 1:
        return (
            f"it is a {kind} with groups={module.groups}; selora adapts convolutions with "
            "groups=1 only (as PEFT's LoRA)"
        )
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return (
                f"it is an {kind} with max_norm={module.max_norm}, which renormalises the "
                "table at each lookup; selora adapts embeddings without max_norm"
            )
        if module.sparse:
            return f"it is an {kind} with sparse=True; selora adapts dense-gradient embeddings"
    return None


def layer_kind(module: nn.Module) -> LayerKind:
    """Return the kind of a supported layer (:data:`LINEAR` for linear ones).

    Args:
        module: a layer selora adapts.

    Returns:
        Its kind.
    """
    if isinstance(module, nn.Embedding):
        return EmbeddingKind(module.padding_idx, module.scale_grad_by_freq)
    if isinstance(module, _CONV_TYPES):
        padding = module.padding
        return ConvKind(
            weight_shape=tuple(int(s) for s in module.weight.shape),
            stride=tuple(module.stride),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(module.dilation),
            padding_mode=module.padding_mode,
            reversed_padding=tuple(module._reversed_padding_repeated_twice),
        )
    return LINEAR


def flat_weight(module: nn.Module) -> Tensor | None:
    """Return an embedding's or convolution's weight as ``(d_out, d_in)`` (a view), else ``None``.

    Args:
        module: any module.

    Returns:
        The embedding table transposed, or the kernel flattened to
        ``(out, in * prod(kernel))``; ``None`` for other layers.
    """
    if isinstance(module, nn.Embedding):
        return module.weight.t()
    if isinstance(module, _CONV_TYPES):
        weight = module.weight
        return weight.view(weight.shape[0], math.prod(weight.shape[1:]))
    return None
