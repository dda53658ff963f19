"""Fine-tuning loop of the demo and the benchmarks.

:class:`SentimentTask` loads the lexicon, the split, the tokenizer and the
pretrained encoder once; :func:`run` fine-tunes one :class:`Method` with one
seed on a fresh copy of the encoder and returns a :class:`RunResult`.
"""

from __future__ import annotations

import copy
import importlib
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from selora.demo.data import (
    TokenizedSplit,
    load_vader_lexicon,
    tokenize,
    train_test_split,
    train_validation_split,
)
from selora.demo.metrics import pearson, rmse, sign_accuracy, spearman
from selora.demo.model import HIDDEN_SIZE, SentimentRegressor, load_encoder, load_tokenizer

__all__ = [
    "DEFAULT_TARGETS",
    "Method",
    "RunResult",
    "SentimentTask",
    "TrainConfig",
    "fit_linear_probe",
    "run",
    "run_grid",
    "seed_everything",
]

DEFAULT_TARGETS = ("query", "value")
"""The encoder's layers that the demo adapts (as in the LoRA paper)."""

# tqdm ships no type hints; import it untyped rather than require its stubs.
_tqdm: Any = importlib.import_module("tqdm.auto").tqdm


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators.

    Args:
        seed: a non-negative integer.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: an adapter, or a linear probe on the frozen encoder.

    Attributes:
        basis: a spectral basis name, or ``None`` for dense factors.
        base: the base of adaptation (``"lora"``, ``"dora"``, ``"hira"``, ...).
        r: the rank.
        sparse_ratio: SeLoRA's budget (spectral bases only).
        n_coeffs: FoRA's budget (spectral bases only).
        head_only: fit only the head, in closed form, on the frozen encoder's
            pooled embeddings (:func:`fit_linear_probe`); the other fields are ignored.
        targets: names of the adapted layers.
        name: an optional label overriding :attr:`label`.
    """

    basis: str | None = None
    base: str = "lora"
    r: int = 8
    sparse_ratio: float | None = None
    n_coeffs: int | None = None
    head_only: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    name: str | None = None

    @property
    def label(self) -> str:
        """A short name: ``"lora"``, ``"lora+fft"``, ``"dora+coif"``, ``"head only"``."""
        if self.name is not None:
            return self.name
        if self.head_only:
            return "head only"
        return self.base if self.basis is None else f"{self.base}+{self.basis}"

    def adapter(self, seed: int) -> Any:
        """Build the :class:`selora.SpectralAdapter` of this method.

        Args:
            seed: seeds the spectral locations.

        Returns:
            The adapter; the head is trained through ``modules_to_save``.
        """
        from selora import SpectralAdapter

        if self.basis is None:
            return SpectralAdapter(
                basis=None, base=self.base, r=self.r, target_modules=self.targets,
                modules_to_save=("head",), seed=seed,
            )  # fmt: skip
        return SpectralAdapter(
            basis=self.basis, base=self.base, r=self.r, sparse_ratio=self.sparse_ratio,
            n_coeffs=self.n_coeffs, target_modules=self.targets, modules_to_save=("head",),
            seed=seed,
        )  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every method of a comparison.

    One learning rate for every trainable parameter, as a ``transformers.Trainer``
    user has: selora's coefficients are on LoRA's scale (``scale="lora"``), so
    the same ``lr`` moves a spectral factor as much as a dense one.

    Attributes:
        epochs: passes over the training split.
        lr: AdamW's peak learning rate.
        batch_size: rows per step.
        weight_decay: AdamW's decoupled weight decay.
        warmup: fraction of the steps with a linear warm-up (then linear decay to 0).
        eval_batch_size: rows per evaluation step.
        progress: show tqdm progress bars.
    """

    epochs: int = 2
    lr: float = 1e-2
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup: float = 0.06
    eval_batch_size: int = 256
    progress: bool = True


@dataclass
class RunResult:
    """What one fine-tuning run measured.

    Attributes:
        method: the method's label.
        seed: the run's seed.
        trainable: number of trainable parameters (adapter and head).
        pearson: Pearson's r on the test split.
        spearman: Spearman's rho on the test split.
        sign_accuracy: accuracy of the predicted sign on the test split.
        rmse: root mean squared error on the test split.
        wall_s: seconds spent training and evaluating.
        epoch_losses: mean training loss of each epoch (for a linear probe,
            its one closed-form fit's training MSE).
        spec: the method's fields.
        validation: the same four scores on the validation split, when the
            task holds one out (:class:`SentimentTask`'s ``val_fraction``);
            empty otherwise.
    """

    method: str
    seed: int
    trainable: int
    pearson: float
    spearman: float
    sign_accuracy: float
    rmse: float
    wall_s: float
    epoch_losses: list[float] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of every field."""
        return asdict(self)


class SentimentTask:
    """The VADER valence task with the pretrained encoder, loaded once.

    Args:
        max_train: keep only the first rows of the training split (smoke runs).
        max_test: keep only the first rows of the test split.
        val_fraction: hold this fraction of the training split out as a
            validation split (:func:`selora.demo.data.train_validation_split`;
            the test split is unchanged); 0 for none.
        max_val: keep only the first rows of the validation split.

    Attributes:
        train: the split that trains.
        val: the validation split, or ``None`` when ``val_fraction`` is 0.
        test: the held-out test split.
    """

    def __init__(
        self,
        max_train: int | None = None,
        max_test: int | None = None,
        *,
        val_fraction: float = 0.0,
        max_val: int | None = None,
    ) -> None:
        entries = load_vader_lexicon()
        train_idx, test_idx = train_test_split(len(entries))
        val_idx = None
        if val_fraction:
            train_idx, val_idx = train_validation_split(train_idx, val_fraction)
        self.tokenizer = load_tokenizer()
        self.train: TokenizedSplit = tokenize([entries[i] for i in train_idx], self.tokenizer)
        self.test: TokenizedSplit = tokenize([entries[i] for i in test_idx], self.tokenizer)
        self.train = self.train.subset(max_train)
        self.test = self.test.subset(max_test)
        self.val: TokenizedSplit | None = None
        if val_idx is not None:
            val = tokenize([entries[i] for i in val_idx], self.tokenizer)
            self.val = val.subset(max_val)
        self._encoder = load_encoder()
        self._features: dict[str, Tensor] = {}

    def fresh_model(self) -> SentimentRegressor:
        """Return a new regressor around a deep copy of the pretrained encoder.

        The head is initialised from torch's global RNG: seed first.

        Returns:
            The model, in train mode.
        """
        return SentimentRegressor(copy.deepcopy(self._encoder), HIDDEN_SIZE).train()

    @torch.no_grad()
    def features(self, split: Literal["train", "val", "test"]) -> Tensor:
        """Pooled embeddings of the frozen encoder (eval mode), computed once per split.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            ``(N, hidden)`` float32 features.

        Raises:
            ValueError: for ``"val"`` when the task holds no validation split.
        """
        if split not in self._features:
            data = {"train": self.train, "val": self.val, "test": self.test}[split]
            if data is None:
                raise ValueError("this task holds no validation split (val_fraction=0)")
            probe = SentimentRegressor(self._encoder, HIDDEN_SIZE).eval()
            feats = torch.empty(len(data), HIDDEN_SIZE)
            for rows in data.batches(256, shuffle=False):  # grouped by length: little padding
                feats[rows] = probe.embed(*data.batch(rows)[:2])
            self._features[split] = feats
        return self._features[split]


def _schedule(total: int, warmup: float) -> Any:
    warm = max(1, math.ceil(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _fit(
    forward: Any,
    model: nn.Module,
    data: TokenizedSplit,
    config: TrainConfig,
    seed: int,
    desc: str,
) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * data.n_batches(config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, config.warmup))
    losses: list[float] = []
    bar = _tqdm(total=steps, desc=desc, disable=not config.progress, leave=False, unit="step")
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        for rows in data.batches(config.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            pred, target = forward(rows)
            loss = nn.functional.mse_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(rows)
            count += len(rows)
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.3f}", epoch=epoch + 1)
        losses.append(total / max(1, count))
    bar.close()
    return losses


def fit_linear_probe(
    features: Tensor, targets: Tensor, ridge: float = 1e-3
) -> tuple[Tensor, Tensor]:
    r"""Least-squares linear head on frozen features (the best "head only" baseline).

    Solves :math:`\min_{w, b} \lVert X w + b - y \rVert^2 + \lambda n \lVert w \rVert^2` in
    float64 on centred features, with a small ridge :math:`\lambda` relative
    to the mean feature variance for numerical stability.

    Args:
        features: ``(N, d)`` features.
        targets: ``(N,)`` targets.
        ridge: :math:`\lambda` as a fraction of the mean feature variance.

    Returns:
        ``(w, b)``: the weight ``(d,)`` and the bias (a 0-d tensor), float32.
    """
    x = features.double()
    y = targets.double()
    x_mean, y_mean = x.mean(dim=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean())
    weight = torch.linalg.solve(gram + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
    bias = y_mean - x_mean @ weight
    return weight.float(), bias.float()


def _scores(pred: Tensor, target: Tensor) -> dict[str, float]:
    p, t = pred.double().numpy(), target.double().numpy()
    return {
        "pearson": pearson(p, t),
        "spearman": spearman(p, t),
        "sign_accuracy": sign_accuracy(p, t),
        "rmse": rmse(p, t),
    }


@torch.no_grad()
def predict(model: SentimentRegressor, data: TokenizedSplit, batch_size: int = 256) -> Tensor:
    """Predict every row of a split in eval mode, in row order.

    Args:
        model: the regressor.
        data: the split.
        batch_size: rows per forward pass.

    Returns:
        ``(N,)`` predictions.
    """
    model.eval()
    out = torch.empty(len(data))
    for rows in data.batches(batch_size, shuffle=False):  # grouped by length: little padding
        ids, mask, _ = data.batch(rows)
        out[rows] = model(ids, mask)
    return out


def run(task: SentimentTask, method: Method, seed: int, config: TrainConfig) -> RunResult:
    """Fine-tune ``method`` with ``seed`` on a fresh encoder and score it on the test split.

    When the task holds a validation split, the run is scored on it too
    (:attr:`RunResult.validation`).

    Args:
        task: the loaded task.
        method: what to train.
        seed: seeds the head, the adapter's initialisation and locations, and
            the batch order.
        config: optimisation settings.

    Returns:
        The run's scores, trainable-parameter count and wall time.
    """
    seed_everything(seed)
    start = time.perf_counter()
    desc = f"{method.label} (seed {seed})"
    if method.head_only:
        feats, targets = task.features("train"), task.train.targets
        weight, bias = fit_linear_probe(feats, targets)
        train_mse = float(((feats @ weight + bias - targets) ** 2).mean())
        losses = [train_mse]
        pred = task.features("test") @ weight + bias
        val_pred = None if task.val is None else task.features("val") @ weight + bias
        trainable = HIDDEN_SIZE + 1
    else:
        from selora import inject, trainable_parameters

        model = task.fresh_model()
        inject(model, method.adapter(seed))
        model.train()

        def step(rows: Tensor) -> tuple[Tensor, Tensor]:
            ids, mask, target = task.train.batch(rows)
            out: Tensor = model(ids, mask)
            return out, target

        losses = _fit(step, model, task.train, config, seed, desc)
        pred = predict(model, task.test, config.eval_batch_size)
        val_pred = None if task.val is None else predict(model, task.val, config.eval_batch_size)
        trainable = trainable_parameters(model)
    wall = time.perf_counter() - start
    spec = {k: v for k, v in asdict(method).items() if k != "targets"}
    spec["targets"] = list(method.targets)
    validation = {} if task.val is None or val_pred is None else _scores(val_pred, task.val.targets)
    return RunResult(
        method=method.label, seed=seed, trainable=int(trainable), wall_s=wall,
        epoch_losses=losses, spec=spec, validation=validation, **_scores(pred, task.test.targets),
    )  # fmt: skip


def run_grid(
    task: SentimentTask,
    methods: Sequence[Method],
    seeds: Iterable[int],
    config: TrainConfig,
) -> list[RunResult]:
    """Run every method with every seed, methods outermost.

    Args:
        task: the loaded task.
        methods: what to train.
        seeds: the seeds.
        config: optimisation settings.

    Returns:
        One result per (method, seed), in that order.
    """
    seed_list = list(seeds)
    return [run(task, m, s, config) for m in methods for s in seed_list]
