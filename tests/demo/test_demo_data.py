"""The VADER lexicon loader, the fixed split and the batching of the demo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selora.demo.data import (
    LexiconEntry,
    TokenizedSplit,
    lexicon_path,
    load_vader_lexicon,
    train_test_split,
)

RAW_LINES = 7520  # vader_lexicon.txt as shipped by vadersentiment 3.3.2
DISTINCT = 7494  # distinct tokens once case is folded (the tokenizer is uncased)


@pytest.fixture(scope="module")
def entries() -> list[LexiconEntry]:
    return load_vader_lexicon()


def _raw_rows() -> list[list[str]]:
    text = lexicon_path().read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def test_file_is_the_expected_one() -> None:
    rows = _raw_rows()
    assert len(rows) == RAW_LINES
    assert all(len(r) == 4 for r in rows)


def test_count_and_uniqueness(entries: list[LexiconEntry]) -> None:
    assert len(entries) == DISTINCT
    keys = [e.token.casefold() for e in entries]
    assert len(set(keys)) == len(keys)


def test_range_and_means(entries: list[LexiconEntry]) -> None:
    for e in entries:
        assert -4.0 <= e.valence <= 4.0
        assert len(e.ratings) % 10 == 0 and len(e.ratings) >= 10
        assert all(-4 <= r <= 4 for r in e.ratings)
        # the file rounds means to one decimal (and lmfao's is off by 0.1)
        assert e.valence == pytest.approx(sum(e.ratings) / len(e.ratings), abs=0.101)
    values = np.array([e.valence for e in entries])
    assert values.min() < -3.5 and values.max() > 3.0  # both tails present
    assert 0.3 < float(np.mean(values < 0)) < 0.7


def test_unique_tokens_keep_the_file_mean(entries: list[LexiconEntry]) -> None:
    rows = _raw_rows()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[0].casefold()] = counts.get(r[0].casefold(), 0) + 1
    by_key = {e.token.casefold(): e for e in entries}
    checked = 0
    for token, mean, _std, _ratings in rows:
        if counts[token.casefold()] == 1:
            assert by_key[token.casefold()].valence == float(mean)
            checked += 1
    assert checked == DISTINCT - sum(1 for c in counts.values() if c > 1)


def test_duplicates_are_merged(entries: list[LexiconEntry]) -> None:
    lol = next(e for e in entries if e.token.casefold() == "lol")
    assert len(lol.ratings) == 20  # "lol" occurs twice in the file
    assert lol.valence == pytest.approx((2.9 + 1.8) / 2)  # the two stated means


def test_split_is_deterministic_disjoint_and_complete() -> None:
    n = DISTINCT
    train, test = train_test_split(n)
    train2, test2 = train_test_split(n)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(test, test2)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(n))
    assert len(test) == round(0.2 * n)
    other_train, _ = train_test_split(n, seed=1)
    assert not np.array_equal(train, other_train)


def test_split_ignores_global_rng() -> None:
    np.random.seed(123)
    torch.manual_seed(123)
    a = train_test_split(100)
    np.random.seed(7)
    b = train_test_split(100)
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(("n", "frac"), [(1, 0.2), (10, 0.0), (10, 1.0)])
def test_split_rejects_bad_arguments(n: int, frac: float) -> None:
    with pytest.raises(ValueError):
        train_test_split(n, test_fraction=frac)


def _toy_split(n: int = 103) -> TokenizedSplit:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (n,), generator=gen)
    mask = (torch.arange(10).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.randint(1000, 2000, (n, 10), generator=gen) * mask
    return TokenizedSplit(
        ids, mask, lengths, torch.randn(n, generator=gen), [str(i) for i in range(n)]
    )


def test_batches_cover_every_row_once_and_are_seeded() -> None:
    data = _toy_split()
    for group in (True, False):
        batches = list(data.batches(8, shuffle=True, seed=3, group_by_length=group))
        assert len(batches) == data.n_batches(8) == math.ceil(103 / 8)
        rows = torch.cat(batches)
        assert sorted(rows.tolist()) == list(range(103))
        again = torch.cat(list(data.batches(8, shuffle=True, seed=3, group_by_length=group)))
        assert torch.equal(rows, again)
        other = torch.cat(list(data.batches(8, shuffle=True, seed=4, group_by_length=group)))
        assert not torch.equal(rows, other)
    ordered = torch.cat(list(data.batches(8, shuffle=False, group_by_length=False)))
    assert torch.equal(ordered, torch.arange(103))


def test_batch_trims_padding() -> None:
    data = _toy_split()
    rows = torch.tensor([0, 1, 2])
    ids, mask, target = data.batch(rows)
    assert ids.shape[1] == int(data.lengths[rows].max())
    assert torch.equal(mask.sum(1), data.lengths[rows])
    assert torch.equal(target, data.targets[rows])
    assert len(data.subset(10)) == 10 and data.subset(None) is data
