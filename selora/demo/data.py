"""The demo's data: the VADER sentiment lexicon as a token-level regression task.

The VADER lexicon (Hutto and Gilbert, 2014) ships with the ``vadersentiment``
package: about 7,500 words, emoticons and slang tokens, each rated by ten
people on a valence scale from -4 (extremely negative) to +4 (extremely
positive). The task is to predict a token's mean rating from its text alone.

Everything here is deterministic and offline: the lexicon is read from the
installed package, the train/test split is a fixed seeded permutation, and
batches are drawn by a generator seeded per epoch.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SPLIT_SEED",
    "TEST_FRACTION",
    "VALIDATION_SEED",
    "LexiconEntry",
    "TokenizedSplit",
    "lexicon_path",
    "load_vader_lexicon",
    "train_test_split",
    "train_validation_split",
    "tokenize",
]

SPLIT_SEED = 0
"""Seed of the fixed train/test permutation (independent of the training seeds)."""

TEST_FRACTION = 0.2
"""Fraction of the lexicon held out for testing."""

VALIDATION_SEED = 1
"""Seed of the permutation that holds a validation split out of the training split."""


@dataclass(frozen=True)
class LexiconEntry:
    """One lexicon token and its human ratings.

    Attributes:
        token: the token text (a word, an emoticon, an abbreviation).
        valence: the mean rating as stated in the lexicon, in ``[-4, 4]``.
        ratings: the individual integer ratings, each in ``[-4, 4]``.
    """

    token: str
    valence: float
    ratings: tuple[int, ...]


def lexicon_path() -> Path:
    """Locate ``vader_lexicon.txt`` inside the installed ``vadersentiment`` package.

    Returns:
        The path of the lexicon file.

    Raises:
        FileNotFoundError: if the package or its lexicon file is missing.
    """
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the VADER lexicon ships with the 'vadersentiment' package; "
            "install it with: pip install 'selora[demo]'"
        )
    path = Path(spec.origin).parent / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vader_lexicon.txt not found next to {spec.origin}")
    return path


def _parse_ratings(text: str, line_no: int) -> tuple[int, ...]:
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError(f"line {line_no}: ratings must be a bracketed list; got {text!r}")
    return tuple(int(x) for x in body[1:-1].split(","))


def load_vader_lexicon(path: str | Path | None = None) -> list[LexiconEntry]:
    """Read the VADER lexicon, one entry per distinct (case-folded) token.

    Each line holds four tab-separated fields: token, mean rating, standard
    deviation and the list of ten raw ratings. The model's tokenizer is
    uncased, so tokens that differ only in case (``"D:"`` and ``"d:"``) or
    that occur twice are the same input; such duplicates are merged into one
    entry whose ratings are the union of theirs and whose valence is the mean
    of their valences. The token of the first occurrence is kept and entries
    keep the order of the file. The valence is the file's mean column (one
    entry, ``lmfao``, states a mean that differs from its ratings by 0.1; the
    file's value is kept).

    Args:
        path: the lexicon file; the one in the installed ``vadersentiment``
            package if ``None``.

    Returns:
        The entries, in file order.

    Raises:
        ValueError: on a malformed line.
    """
    source = Path(path) if path is not None else lexicon_path()
    merged: dict[str, tuple[str, list[float], list[int]]] = {}
    for line_no, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{source}:{line_no}: expected 4 tab-separated fields; got {line!r}")
        token = fields[0]
        ratings = _parse_ratings(fields[3], line_no)
        key = token.casefold()
        mean = float(fields[1])
        if key in merged:
            merged[key][1].append(mean)
            merged[key][2].extend(ratings)
        else:
            merged[key] = (token, [mean], list(ratings))
    return [
        LexiconEntry(token=token, valence=sum(means) / len(means), ratings=tuple(r))
        for token, means, r in merged.values()
    ]


def train_test_split(
    n: int, *, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, np.dtype[np.int64]]]:
    """Split ``range(n)`` into disjoint train and test indices by a seeded permutation.

    The permutation comes from a dedicated NumPy PCG64 generator, so the split
    depends only on ``(n, test_fraction, seed)`` and never on a global RNG.

    Args:
        n: number of items.
        test_fraction: fraction held out, in ``(0, 1)``; the test set has
            ``round(n * test_fraction)`` items.
        seed: the permutation's seed.

    Returns:
        ``(train, test)``: two sorted int64 index arrays whose union is ``range(n)``.

    Raises:
        ValueError: if ``n < 2`` or ``test_fraction`` is outside ``(0, 1)``.
    """
    if n < 2:
        raise ValueError(f"need at least two items to split; got n={n}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction}")
    rng = np.random.Generator(np.random.PCG64(seed))
    perm = rng.permutation(n).astype(np.int64)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def train_validation_split(
    train: np.ndarray[Any, np.dtype[np.int64]],
    fraction: float,
    *,
    seed: int = VALIDATION_SEED,
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, np.dtype[np.int64]]]:
    """Hold a fixed fraction of the training indices out for validation.

    The held-out test split is not involved: tune on this validation split,
    report on the test split. Like :func:`train_test_split`, the result depends
    only on ``(train, fraction, seed)``.

    Args:
        train: the training indices (from :func:`train_test_split`).
        fraction: fraction of them held out, in ``(0, 1)``.
        seed: the permutation's seed.

    Returns:
        ``(fit, validation)``: two sorted, disjoint subsets of ``train``
        whose union is ``train``.

    Raises:
        ValueError: if ``train`` has fewer than two items or ``fraction`` is
            outside ``(0, 1)``.
    """
    fit, val = train_test_split(len(train), test_fraction=fraction, seed=seed)
    return np.sort(train[fit]), np.sort(train[val])


@dataclass
class TokenizedSplit:
    """Tokenized inputs and targets of one split, padded to a common length.

    Attributes:
        input_ids: ``(N, L)`` token ids, right-padded.
        attention_mask: ``(N, L)``, 1 on real tokens.
        lengths: ``(N,)`` number of real tokens per row.
        targets: ``(N,)`` mean valence, float32.
        tokens: the token texts, for reference.
    """

    input_ids: Tensor
    attention_mask: Tensor
    lengths: Tensor
    targets: Tensor
    tokens: list[str]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, limit: int | None) -> TokenizedSplit:
        """Return the first ``limit`` rows (all of them if ``limit`` is ``None``).

        Args:
            limit: how many rows to keep.

        Returns:
            A new split sharing no storage with this one.
        """
        if limit is None or limit >= len(self):
            return self
        return TokenizedSplit(
            self.input_ids[:limit].clone(),
            self.attention_mask[:limit].clone(),
            self.lengths[:limit].clone(),
            self.targets[:limit].clone(),
            self.tokens[:limit],
        )

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gather rows, trimmed to the longest of them.

        Args:
            rows: int64 row indices.

        Returns:
            ``(input_ids, attention_mask, targets)`` of the batch.
        """
        width = int(self.lengths[rows].max())
        return (
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            self.targets[rows],
        )

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, group_by_length: bool = True
    ) -> Iterator[Tensor]:
        """Yield row indices of successive batches.

        With ``group_by_length`` rows are shuffled, cut into windows of 50
        batches, sorted by length inside each window and the batches shuffled
        again (Hugging Face's *group by length*): little padding, random order.

        Args:
            batch_size: rows per batch (the last batch may be smaller).
            shuffle: draw a random order; otherwise the natural order.
            seed: seeds the order (a dedicated generator, not the global RNG).
            group_by_length: group rows of similar length.

        Yields:
            int64 tensors of row indices.
        """
        n = len(self)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        if group_by_length:
            window = batch_size * 50
            chunks = []
            for start in range(0, n, window):
                part = order[start : start + window]
                keys = self.lengths[part]
                chunks.append(part[torch.argsort(keys, stable=True)])
            order = torch.cat(chunks) if chunks else order
        groups = list(torch.split(order, batch_size))
        if shuffle and group_by_length:
            perm = torch.randperm(len(groups), generator=gen).tolist()
            groups = [groups[i] for i in perm]
        yield from groups

    def n_batches(self, batch_size: int) -> int:
        """Number of batches of one pass.

        Args:
            batch_size: rows per batch.

        Returns:
            ``ceil(len / batch_size)``.
        """
        return math.ceil(len(self) / batch_size)


def tokenize(
    entries: Sequence[LexiconEntry], tokenizer: Any, max_length: int = 32
) -> TokenizedSplit:
    """Tokenize lexicon entries with a Hugging Face tokenizer.

    Args:
        entries: the entries of one split.
        tokenizer: a callable tokenizer (``transformers.PreTrainedTokenizerBase``).
        max_length: truncation length; lexicon tokens use at most a dozen.

    Returns:
        The tokenized split.
    """
    texts = [e.token for e in entries]
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    input_ids = enc["input_ids"].to(torch.int64)
    mask = enc["attention_mask"].to(torch.int64)
    return TokenizedSplit(
        input_ids=input_ids,
        attention_mask=mask,
        lengths=mask.sum(dim=1),
        targets=torch.tensor([e.valence for e in entries], dtype=torch.float32),
        tokens=texts,
    )
