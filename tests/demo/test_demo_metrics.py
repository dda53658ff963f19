"""The demo's metrics against SciPy and NumPy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from selora.demo.metrics import pearson, rankdata, rmse, sign_accuracy, spearman


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for n in (2, 3, 17, 500):
        x = rng.standard_normal(n)
        out.append((x, 0.7 * x + rng.standard_normal(n)))
    # ties on both sides (ratings come in steps of 0.1)
    x = np.round(rng.standard_normal(300), 1)
    out.append((x, np.round(x + rng.standard_normal(300), 1)))
    out.append((np.arange(50.0), -(np.arange(50.0) ** 3)))
    return out


@pytest.mark.parametrize("pair", _pairs())
def test_pearson_matches_scipy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = pair
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("pair", _pairs())
def test_spearman_matches_scipy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = pair
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_rankdata_matches_scipy() -> None:
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x, method="average"))


def test_sign_accuracy_and_rmse_match_numpy() -> None:
    rng = np.random.default_rng(1)
    y = np.round(rng.standard_normal(400), 1)  # some exact zeros
    x = y + 0.5 * rng.standard_normal(400)
    keep = y != 0
    assert (~keep).any()
    expected = np.mean(np.sign(x[keep]) == np.sign(y[keep]))
    assert sign_accuracy(x, y) == pytest.approx(expected)
    assert rmse(x, y) == pytest.approx(np.sqrt(np.mean((x - y) ** 2)))


def test_edge_cases() -> None:
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(sign_accuracy([1.0, -1.0], [0.0, 0.0]))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in size"):
        pearson([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least two"):
        spearman([1.0], [1.0])


def test_linear_probe_matches_least_squares() -> None:
    import torch

    from selora.demo.train import fit_linear_probe

    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 12))
    y = x @ rng.standard_normal(12) + 0.5 + 0.1 * rng.standard_normal(300)
    w, b = fit_linear_probe(torch.from_numpy(x).float(), torch.from_numpy(y).float(), ridge=0.0)
    design = np.hstack([x, np.ones((300, 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), coef[:12], atol=1e-4)
    assert float(b) == pytest.approx(coef[12], abs=1e-4)
