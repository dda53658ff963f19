"""Evaluation metrics of the demo: correlations, sign accuracy and RMSE.

All functions take array-likes (lists, NumPy arrays, CPU tensors), compute in
float64 and return a Python float.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["pearson", "rankdata", "rmse", "sign_accuracy", "spearman"]

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


def _pair(pred: Any, target: Any) -> tuple[FloatArray, FloatArray]:
    x = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"predictions and targets differ in size: {x.size} vs {y.size}")
    if x.size < 2:
        raise ValueError(f"need at least two values; got {x.size}")
    return x, y


def pearson(pred: Any, target: Any) -> float:
    r"""Pearson's correlation coefficient.

    .. math::

        r = \frac{\sum_i (x_i - \bar x)(y_i - \bar y)}
                 {\sqrt{\sum_i (x_i - \bar x)^2}\,\sqrt{\sum_i (y_i - \bar y)^2}}

    Args:
        pred: predictions.
        target: targets of the same size.

    Returns:
        :math:`r \in [-1, 1]`, or ``nan`` if either input is constant.
    """
    x, y = _pair(pred, target)
    dx = x - x.mean()
    dy = y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(dx @ dy) / denom))


def rankdata(values: Any) -> FloatArray:
    """Ranks from 1 to n, ties given the mean of the ranks they span.

    Args:
        values: a 1-D array-like.

    Returns:
        float64 ranks (``scipy.stats.rankdata(values, method="average")``).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    start = 0
    while start < x.size:
        stop = start + 1
        while stop < x.size and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0
        start = stop
    return ranks


def spearman(pred: Any, target: Any) -> float:
    r"""Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks.

    Args:
        pred: predictions.
        target: targets of the same size.

    Returns:
        :math:`\rho \in [-1, 1]`, or ``nan`` if either input is constant.
    """
    x, y = _pair(pred, target)
    return pearson(rankdata(x), rankdata(y))


def sign_accuracy(pred: Any, target: Any) -> float:
    """Fraction of items whose predicted valence has the sign of the target.

    Targets equal to zero have no sign and are left out.

    Args:
        pred: predictions.
        target: targets of the same size.

    Returns:
        The accuracy in ``[0, 1]``, or ``nan`` if every target is zero.
    """
    x, y = _pair(pred, target)
    keep = y != 0
    if not keep.any():
        return math.nan
    return float(np.mean(np.sign(x[keep]) == np.sign(y[keep])))


def rmse(pred: Any, target: Any) -> float:
    r"""Root mean squared error.

    Args:
        pred: predictions.
        target: targets of the same size.

    Returns:
        :math:`\sqrt{\tfrac1n \sum_i (x_i - y_i)^2}`.
    """
    x, y = _pair(pred, target)
    return math.sqrt(float(np.mean((x - y) ** 2)))
