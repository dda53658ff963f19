"""A gather along the last dimension that stays fast on batched tensors."""

from __future__ import annotations

from torch import Tensor

__all__ = ["select_last"]


def select_last(values: Tensor, index: Tensor) -> Tensor:
    r"""Return ``values.index_select(-1, index)``, reading the leading dims as one.

    :math:`y_{\dots, i} = x_{\dots, \text{index}_i}`. The CPU kernel of
    ``index_select`` along the last dimension of a tensor of three or more
    dimensions is far slower than along the rows of a matrix: on one thread, a
    ``(5, 32, 1536)`` permutation took 1.29 ms against 0.08 ms for the same
    values read as ``(160, 1536)``. Batched factor formation hits exactly this
    case. The reshape is a view when ``values`` allows it (else one copy), and
    autograd differentiates through it.

    Args:
        values: a tensor of at least one dimension.
        index: 1-D int64 positions into the last dimension.

    Returns:
        A tensor of shape ``values.shape[:-1] + (len(index),)``.
    """
    if values.dim() <= 2:
        return values.index_select(-1, index)
    lead = values.shape[:-1]
    flat = values.reshape(-1, values.shape[-1]).index_select(-1, index)
    return flat.view(*lead, index.numel())
