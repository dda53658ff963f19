"""Fine-tuning benchmark: LoRA against selora on all-MiniLM-L6-v2 and the VADER lexicon.

The task, the model and the training loop are the demo's (``selora.demo``):
predict the mean human valence rating of a lexicon token; the score is
Pearson's r between predicted and rated valence. Everything runs offline.

Protocol. The lexicon's fixed 20 % test split is untouched; a fixed 15 % of
the training split (``--val-fraction``) is held out for validation. Every
method trains with every learning rate of ``--lr-grid`` (default 3e-4 1e-3
3e-3 1e-2; for table c also 3e-2 and 1e-1, where HiRA's optimum lies) and
every seed (default 0 1 2), 2 epochs each. For each method the
learning rate with the best validation Pearson r (mean over the seeds) is
selected, and the method's test scores at that learning rate are reported
(mean and sd over the seeds), with the paired difference against dense LoRA
trained with the same seed (each at its own selected learning rate): mean
and sd of the per-seed difference of test Pearson r. The JSON keeps every
(learning rate, seed) run with its validation and test scores.

Five tables, each written as ``<out-dir>/finetune_<table>.json`` and ``.png``,
plus ``<out-dir>/finetune.md`` with every table run so far:

a. ``equal_rank``: dense LoRA against selora (sparse ratio 0.6) with every
   built-in basis, all at rank ``--rank``.
b. ``equal_budget``: selora at rank ``--budget-rank`` (sparse ratio 0.6) against
   dense LoRA at the rank whose parameter count is closest (the reference)
   and, for comparison, dense LoRA at selora's rank.
c. ``bases_of_adaptation``: dense LoRA (the reference), then DoRA and HiRA,
   each with dense factors and with spectral ones, at rank ``--rank``.
d. ``rank_sweep``: selora at ranks 4..128 with a fixed number of coefficients
   per factor (``--sweep-n-coeffs``), so every rank trains the same budget,
   beside dense LoRA at the same ranks (each selora row's reference), whose
   budget grows with the rank (FoRA's claim is that the first curve follows
   the second).
e. ``frontier``: the parameter-efficiency frontier, test Pearson r against
   trainable parameters (log scale): dense LoRA at ranks 1..64, and selora
   (``--frontier-bases``, fft and coif) across budgets: sparse ratios 0.2..0.95 at r = 8
   and r = 32, and an ``n_coeffs`` sweep at r = 64. Each selora point's
   reference is the LoRA rank with the nearest parameter count.

Runs are cached: each (method, learning rate, seed) is appended to
``<out-dir>/finetune_<table>.runs.jsonl`` as soon as it finishes, and a rerun
(``--resume``, the default) skips every run found in any table's cache with
the same settings, so an interrupted table resumes where it stopped and runs
shared by tables (dense LoRA at r = 8 in a, c, d and e) train once.
``--fresh`` retrains the selected tables, discarding their caches;
``--dry-run`` prints how many runs each table needs and how many are cached;
``--replot`` redraws the PNGs and the Markdown from the JSON files only.

One table per command. Times at the defaults on one thread: a run makes
2 x 160 training steps and scores 899 validation and 1,499 test tokens; a
training step took 0.11 to 0.15 s and scoring 1.6 s per 1,000 tokens when
measured on a shared 2-core machine (the committed 1-epoch runs of the older
protocol imply 0.33 s per step on a busier one), so a run takes 50 to 110 s::

    python benchmarks/finetune.py --tables a --threads 1   # 108 runs, 1.5 to 3.3 h
    python benchmarks/finetune.py --tables b --threads 1   #  60 runs, 0.8 to 1.8 h
    python benchmarks/finetune.py --tables c --threads 1   # 126 runs, 1.8 to 3.9 h
    python benchmarks/finetune.py --tables d --threads 1   # 216 runs, 3.0 to 6.6 h
    python benchmarks/finetune.py --tables e --threads 1   # 372 runs, 5.2 to 11.4 h

Runs shared through the cache train once: after a, table c trains 114 runs;
after a and b, table d trains 192; after d, table e trains 288; all five
tables are 762 runs, 10.6 to 23.3 h (``--dry-run`` counts them).
Each command can be stopped and started again. A reduced smoke run::

    python benchmarks/finetune.py --tables a --seeds 0 --epochs 1 --lr-grid 1e-3 3e-3 \\
        --max-train 300 --out-dir /tmp/finetune
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from selora import list_bases
from selora.demo.model import HIDDEN_SIZE
from selora.demo.report import Summary, environment, format_table, plot_summaries, summarize
from selora.demo.train import Method, RunResult, SentimentTask, TrainConfig, run

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = {
    "a": "equal_rank",
    "b": "equal_budget",
    "c": "bases_of_adaptation",
    "d": "rank_sweep",
    "e": "frontier",
}
TITLES = {
    "a": "(a) Equal rank: dense LoRA vs selora (sparse ratio {ratio}) at r = {rank}",
    "b": "(b) Equal trainable budget: selora at r = {budget_rank} vs dense LoRA at r = {match}",
    "c": "(c) DoRA and HiRA, dense and spectral factors, r = {rank}",
    "d": "(d) Rank sweep at a fixed budget of {n} coefficients per factor",
    "e": "(e) Parameter-efficiency frontier: dense LoRA vs selora ({bases}) across budgets",
}
DEFAULT_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
# Table c's HiRA and DoRA rows chose 1e-2, the edge of the default grid, and
# HiRA's validation r was still rising there (its optimum is 3e-2).
TABLE_LR_GRIDS = {"c": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}
METRIC = "pearson"
"""The score that selects the learning rate (on validation) and that is compared (on test)."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1); got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``--help`` prints the module docstring)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an old command's --lr must not pass for --lr-grid
    )  # fmt: skip
    p.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=sorted(TABLES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--lr-grid", nargs="+", type=_positive_float, default=None,
        help="learning rates tried for every method; the best on validation is reported "
        "(default 3e-4 1e-3 3e-3 1e-2; table c also 3e-2 1e-1)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--val-fraction", type=_fraction, default=0.15,
        help="fraction of the training split held out to select the learning rate",
    )  # fmt: skip
    p.add_argument("--rank", type=int, default=8, help="rank of tables a and c")
    p.add_argument("--sparse-ratio", type=float, default=0.6, help="budget of tables a, b, c")
    p.add_argument("--bases", nargs="+", default=None, help="table a (default: every built-in)")
    p.add_argument("--budget-rank", type=int, default=32, help="selora's rank in table b")
    p.add_argument("--budget-bases", nargs="+", default=["fft", "dct", "coif"])
    p.add_argument("--adapter-bases", nargs="+", default=["dora", "hira"], help="table c")
    p.add_argument("--spectral-bases", nargs="+", default=["fft", "coif"], help="table c")
    p.add_argument("--sweep-ranks", nargs="+", type=int, default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--sweep-n-coeffs", type=int, default=1024)
    p.add_argument("--sweep-bases", nargs="+", default=["fft", "coif"])
    p.add_argument(
        "--sweep-lora-ranks", nargs="+", type=int, default=None,
        help="dense LoRA reference ranks in table d (default: --sweep-ranks; 0 for none)",
    )  # fmt: skip
    p.add_argument(
        "--frontier-lora-ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64],
        help="table e: dense LoRA's ranks",
    )  # fmt: skip
    p.add_argument(
        "--frontier-bases", nargs="+", default=["fft", "coif"], help="table e: selora's bases"
    )
    p.add_argument(
        "--frontier-ranks", nargs="+", type=int, default=[8, 32],
        help="table e: selora's ranks of the sparse-ratio sweeps",
    )  # fmt: skip
    p.add_argument(
        "--frontier-ratios", nargs="+", type=float, default=[0.2, 0.5, 0.8, 0.95],
        help="table e: sparse ratios swept at each of --frontier-ranks",
    )  # fmt: skip
    p.add_argument(
        "--frontier-n-coeffs-rank", type=int, default=64,
        help="table e: selora's rank of the n_coeffs sweep",
    )  # fmt: skip
    p.add_argument(
        "--frontier-n-coeffs", nargs="*", type=int, default=[256, 1024, 4096, 16384],
        help="table e: coefficients per factor swept at --frontier-n-coeffs-rank (none: no sweep)",
    )  # fmt: skip
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", dest="resume", action="store_true", default=True,
        help="skip the runs already in the out dir's run caches (the default)",
    )  # fmt: skip
    resume.add_argument(
        "--fresh", dest="resume", action="store_false",
        help="ignore the run caches and retrain the selected tables, discarding their caches",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true", help="print the runs each table needs, train nothing"
    )
    p.add_argument(
        "--replot", action="store_true", help="redraw PNGs and Markdown from the saved JSON only"
    )
    args = p.parse_args(argv)
    if args.lr_grid is not None:
        args.lr_grid = sorted(set(args.lr_grid))
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: each seed once")
    return args


def matched_rank(selora_rank: int, sparse_ratio: float, d_in: int, d_out: int) -> int:
    """Dense LoRA rank whose parameter count is closest to selora's at ``selora_rank``."""
    keep = 1.0 - sparse_ratio
    per_layer = int(keep * selora_rank * d_in) + int(keep * d_out * selora_rank)
    return max(1, round(per_layer / (d_in + d_out)))


def methods_for(table: str, args: argparse.Namespace) -> tuple[list[Method], dict[str, Any]]:
    """The methods of one table, in table order, and the fields of its title."""
    ratio, rank = args.sparse_ratio, args.rank
    if table == "a":
        bases = args.bases or list_bases()
        methods = [Method(basis=None, r=rank)]
        methods += [Method(basis=b, r=rank, sparse_ratio=ratio) for b in bases]
        return methods, {"ratio": ratio, "rank": rank}
    if table == "b":
        match = matched_rank(args.budget_rank, ratio, HIDDEN_SIZE, HIDDEN_SIZE)
        methods = [Method(basis=None, r=match, name=f"lora r={match}")]
        # for comparison: dense LoRA at selora's rank, with 1 / (1 - ratio) times the parameters
        methods.append(Method(basis=None, r=args.budget_rank, name=f"lora r={args.budget_rank}"))
        methods += [
            Method(
                basis=b,
                r=args.budget_rank,
                sparse_ratio=ratio,
                name=f"lora+{b} r={args.budget_rank}",
            )
            for b in args.budget_bases
        ]
        return methods, {"budget_rank": args.budget_rank, "match": match}
    if table == "c":
        methods = [Method(basis=None, r=rank)]
        for base in args.adapter_bases:
            methods.append(Method(basis=None, base=base, r=rank))
            methods += [
                Method(basis=b, base=base, r=rank, sparse_ratio=ratio) for b in args.spectral_bases
            ]
        return methods, {"rank": rank}
    if table == "d":
        n = args.sweep_n_coeffs
        lora_ranks = args.sweep_ranks if args.sweep_lora_ranks is None else args.sweep_lora_ranks
        methods = [Method(basis=None, r=r, name=f"lora r={r}") for r in lora_ranks if r > 0]
        methods += [
            Method(basis=b, r=r, n_coeffs=n, name=f"lora+{b} r={r}")
            for b in args.sweep_bases
            for r in args.sweep_ranks
        ]
        return methods, {"n": n}
    methods = [Method(basis=None, r=r, name=f"lora r={r}") for r in args.frontier_lora_ranks]
    for b in args.frontier_bases:
        methods += [
            Method(basis=b, r=r, sparse_ratio=ratio, name=f"lora+{b} r={r} ratio={ratio:g}")
            for r in args.frontier_ranks
            for ratio in args.frontier_ratios
        ]
        r = args.frontier_n_coeffs_rank
        methods += [
            Method(basis=b, r=r, n_coeffs=n, name=f"lora+{b} r={r} n={n}")
            for n in args.frontier_n_coeffs
        ]
    return methods, {"bases": ", ".join(args.frontier_bases)}


# --- the run cache -------------------------------------------------------------------------


def lr_grid(table: str, args: argparse.Namespace) -> list[float]:
    """The learning rates a table tries: ``--lr-grid``, else the table's default grid."""
    if args.lr_grid is not None:
        return list(args.lr_grid)
    return list(TABLE_LR_GRIDS.get(table, DEFAULT_LR_GRID))


def run_settings(config: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """What, besides the method, the learning rate and the seed, shapes a run's result."""
    train = {k: v for k, v in asdict(config).items() if k not in ("lr", "progress")}
    data = {k: getattr(args, k) for k in ("val_fraction", "max_train", "max_val", "max_test")}
    return {**train, **data}


def run_key(method: Method, lr: float, seed: int, settings: Mapping[str, Any]) -> str:
    """The cache key of one run: the method's fields (not its label), lr, seed and settings."""
    spec = {k: v for k, v in asdict(method).items() if k != "name"}
    spec["targets"] = list(method.targets)
    return json.dumps(
        {"method": spec, "lr": lr, "seed": seed, "settings": dict(settings)}, sort_keys=True
    )


class RunCache:
    """Finished runs, kept in one JSONL file per table in the output directory.

    Each line holds one run: its :func:`run_key` and its :class:`RunResult`.
    A line is appended as soon as its run finishes. With ``resume`` the runs of
    every table's file are read, so a run shared by two tables trains once.

    Args:
        out_dir: the output directory.
        resume: read the existing files; otherwise start from nothing.
    """

    def __init__(self, out_dir: Path, *, resume: bool) -> None:
        self.out_dir = out_dir
        self._runs: dict[str, dict[str, Any]] = {}
        self._tables: dict[str, set[str]] = {}
        if resume:
            for path in sorted(out_dir.glob("finetune_*.runs.jsonl")):
                keys = self._tables.setdefault(path.name, set())
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut off by an interruption
                        continue
                    self._runs[record["key"]] = record["result"]
                    keys.add(record["key"])

    def path(self, table: str) -> Path:
        """The cache file of ``table``."""
        return self.out_dir / f"finetune_{TABLES[table]}.runs.jsonl"

    def discard(self, table: str) -> None:
        """Delete the cache file of ``table`` (``--fresh``)."""
        self.path(table).unlink(missing_ok=True)
        self._tables.pop(self.path(table).name, None)

    def __contains__(self, key: str) -> bool:
        return key in self._runs

    def lookup(self, table: str, key: str) -> RunResult | None:
        """Return the cached run, copying it into ``table``'s file if it ran for another one."""
        found = self._runs.get(key)
        if found is None:
            return None
        result = RunResult(**found)
        if key not in self._tables.get(self.path(table).name, set()):
            self.add(table, key, result)
        return result

    def add(self, table: str, key: str, result: RunResult) -> None:
        """Record a finished run of ``table`` (appended and flushed at once)."""
        path = self.path(table)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "result": result.to_dict()}
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._runs[key] = record["result"]
        self._tables.setdefault(path.name, set()).add(key)


# --- learning-rate selection and paired differences -----------------------------------------


@dataclass
class LrScore:
    """One method's scores at one learning rate, over the seeds.

    Attributes:
        lr: the learning rate.
        seeds: the seeds that ran.
        val_mean: mean validation score.
        val_sd: its sample standard deviation (0 with one seed).
        test_mean: mean test score.
        test_sd: its sample standard deviation.
    """

    lr: float
    seeds: list[int]
    val_mean: float
    val_sd: float
    test_mean: float
    test_sd: float


@dataclass
class Selection:
    """The learning rate selected for one method, and every learning rate's scores.

    Attributes:
        method: the method's label.
        lr: the learning rate with the best mean validation score.
        at_edge: the selected learning rate is the smallest or the largest of
            several tried (the best may lie outside the grid).
        grid: the scores at each learning rate, in increasing order.
    """

    method: str
    lr: float
    at_edge: bool
    grid: list[LrScore] = field(default_factory=list)


@dataclass
class Paired:
    """A method's per-seed test-score difference against its reference.

    Attributes:
        method: the method's label.
        reference: the reference's label (dense LoRA).
        seeds: the seeds both ran.
        diffs: method's minus reference's test score, seed by seed.
        mean: mean of ``diffs``.
        sd: sample standard deviation of ``diffs`` (0 with one seed).
    """

    method: str
    reference: str
    seeds: list[int]
    diffs: list[float]
    mean: float
    sd: float


def _sd(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    return math.nan if any(math.isnan(v) for v in values) else statistics.stdev(values)


def _by_method(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.method, []).append(r)
    return groups


def select_lr(results: Sequence[RunResult], metric: str = METRIC) -> dict[str, Selection]:
    """For each method, the learning rate with the best mean validation score over seeds.

    A larger score is better; a NaN mean (a diverged run) never wins, and of
    equal means the smaller learning rate wins.

    Args:
        results: runs with ``spec["lr"]`` and ``validation`` scores.
        metric: the score (a key of :attr:`RunResult.validation`).

    Returns:
        One selection per method, in order of first appearance.
    """
    out = {}
    for method, runs in _by_method(results).items():
        per_lr: dict[float, list[RunResult]] = {}
        for r in runs:
            per_lr.setdefault(float(r.spec["lr"]), []).append(r)
        grid = []
        for lr in sorted(per_lr):
            val = [r.validation.get(metric, math.nan) for r in per_lr[lr]]
            test = [float(getattr(r, metric)) for r in per_lr[lr]]
            score = LrScore(
                lr=lr, seeds=[r.seed for r in per_lr[lr]],
                val_mean=statistics.fmean(val), val_sd=_sd(val),
                test_mean=statistics.fmean(test), test_sd=_sd(test),
            )  # fmt: skip
            grid.append(score)
        best = max(grid, key=lambda g: -math.inf if math.isnan(g.val_mean) else g.val_mean)
        at_edge = len(grid) > 1 and best.lr in (grid[0].lr, grid[-1].lr)
        out[method] = Selection(method=method, lr=best.lr, at_edge=at_edge, grid=grid)
    return out


def at_selected_lr(
    results: Sequence[RunResult], selection: Mapping[str, Selection]
) -> list[RunResult]:
    """The runs of each method at its selected learning rate, in the original order."""
    return [r for r in results if float(r.spec["lr"]) == selection[r.method].lr]


def _is_lora(s: Summary) -> bool:
    spec = s.spec
    dense = spec.get("basis") is None and not spec.get("head_only")
    return dense and spec.get("base", "lora") == "lora"


def references(table: str, summaries: Sequence[Summary]) -> dict[str, str | None]:
    """The dense LoRA method each method of ``table`` is compared with.

    Tables a, b and c: the table's first dense LoRA row. Table d: dense LoRA
    at the same rank. Table e: dense LoRA with the nearest number of
    trainable parameters (on a log scale). A reference has none itself.

    Args:
        table: ``"a"`` .. ``"e"``.
        summaries: the table's methods.

    Returns:
        Each method's reference label, or ``None``.
    """
    loras = [s for s in summaries if _is_lora(s)]
    out: dict[str, str | None] = {}
    for s in summaries:
        ref: Summary | None = None
        if table in ("a", "b", "c"):
            ref = loras[0] if loras else None
        elif table == "d":
            ref = next((x for x in loras if x.spec.get("r") == s.spec.get("r")), None)
        elif not _is_lora(s) and loras:
            ref = min(loras, key=lambda x: abs(math.log(x.trainable / s.trainable)))
        out[s.method] = None if ref is None or ref.method == s.method else ref.method
    return out


def paired_differences(
    results: Sequence[RunResult],
    reference: Mapping[str, str | None],
    metric: str = METRIC,
) -> dict[str, Paired]:
    """Per-seed test-score differences of each method against its reference.

    Args:
        results: one run per (method, seed), each at its selected learning rate.
        reference: each method's reference label (``None``: no comparison).
        metric: the test score compared.

    Returns:
        The differences of the methods that have a reference run with a
        common seed, in order of first appearance.
    """
    score = {(r.method, r.seed): float(getattr(r, metric)) for r in results}
    out = {}
    for method, runs in _by_method(results).items():
        ref = reference.get(method)
        if ref is None:
            continue
        seeds = [r.seed for r in runs if (ref, r.seed) in score]
        if not seeds:
            continue
        diffs = [score[method, s] - score[ref, s] for s in seeds]
        out[method] = Paired(
            method=method, reference=ref, seeds=seeds, diffs=diffs,
            mean=statistics.fmean(diffs), sd=_sd(diffs),
        )  # fmt: skip
    return out


# --- running a table -------------------------------------------------------------------------


def collect_runs(
    table: str,
    methods: Sequence[Method],
    args: argparse.Namespace,
    task: SentimentTask,
    config: TrainConfig,
    cache: RunCache,
) -> tuple[list[RunResult], int]:
    """Every (method, learning rate, seed) run of a table, from the cache or trained now.

    Returns:
        The runs (labelled as in this table, ``spec["lr"]`` set) and how many trained now.
    """
    settings = run_settings(config, args)
    grid = lr_grid(table, args)
    total = len(methods) * len(grid) * len(args.seeds)
    results, trained, done = [], 0, 0
    for method in methods:
        for lr in grid:
            for seed in args.seeds:
                done += 1
                key = run_key(method, lr, seed, settings)
                result = cache.lookup(table, key)
                if result is None:
                    result = run(task, method, seed, replace(config, lr=lr))
                    result.spec["lr"] = lr
                    cache.add(table, key, result)
                    trained += 1
                    print(
                        f"[{table} {done}/{total}] {method.label} lr={lr:g} seed {seed}: "
                        f"val {result.validation.get(METRIC, math.nan):.4f}, "
                        f"test {getattr(result, METRIC):.4f} ({result.wall_s:.0f} s)",
                        file=sys.stderr,
                    )
                spec = {**result.spec, "name": method.name, "lr": lr}
                results.append(replace(result, method=method.label, spec=spec))
    return results, trained


def analyse(table: str, results: Sequence[RunResult]) -> dict[str, Any]:
    """The ``summaries``, ``selection`` and ``paired`` parts of a table's JSON.

    Selects each method's learning rate on validation, summarises its runs at
    that learning rate and pairs them with their reference's.
    """
    selection = select_lr(results)
    chosen = at_selected_lr(results, selection)
    summaries = summarize(chosen)
    paired = paired_differences(chosen, references(table, summaries))
    return {
        "summaries": [asdict(s) for s in summaries],
        "selection": [asdict(s) for s in selection.values()],
        "paired": [asdict(p) for p in paired.values()],
    }


def plan(args: argparse.Namespace, config: TrainConfig, cache: RunCache) -> None:
    """Print the number of runs each selected table needs and how many are cached."""
    settings = run_settings(config, args)
    for table in args.tables:
        methods, grid = methods_for(table, args)[0], lr_grid(table, args)
        keys = {run_key(m, lr, s, settings) for m in methods for lr in grid for s in args.seeds}
        runs = len(methods) * len(grid) * len(args.seeds)
        cached = sum(key in cache for key in keys)
        print(
            f"table {table} ({TABLES[table]}): {len(methods)} methods x {len(grid)} "
            f"learning rates x {len(args.seeds)} seeds = {runs} runs, {cached} cached, "
            f"{len(keys) - cached} to train"
        )


# --- reports ---------------------------------------------------------------------------------


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"  # fmt: skip
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _spread(mean: float, sd: float, n: int, sign: str = "") -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:{sign}.4f} ± {sd:.4f}" if n > 1 else f"{mean:{sign}.4f}"


def results_table(payload: Mapping[str, Any]) -> str:
    """The main Markdown table of a table's JSON: test scores at the selected lr, and Δ."""
    selection = {s["method"]: s for s in payload["selection"]}
    paired = {p["method"]: p for p in payload["paired"]}
    rows = []
    for s in payload["summaries"]:
        sel = selection[s["method"]]
        best = next(g for g in sel["grid"] if g["lr"] == sel["lr"])
        n = len(s["seeds"])
        p = paired.get(s["method"])
        rows.append([
            s["method"], f"{s['trainable']:,}", f"{sel['lr']:g}" + ("†" if sel["at_edge"] else ""),
            _spread(best["val_mean"], best["val_sd"], n),
            _spread(s["mean"]["pearson"], s["std"]["pearson"], n),
            "—" if p is None else _spread(p["mean"], p["sd"], len(p["seeds"]), "+"),
            "—" if p is None else p["reference"],
            _spread(s["mean"]["spearman"], s["std"]["spearman"], n),
            _spread(s["mean"]["rmse"], s["std"]["rmse"], n),
            str(n),
        ])  # fmt: skip
    header = [
        "method", "trainable", "lr", "val r", "test r", "Δ test r", "vs", "test spearman",
        "test rmse", "seeds",
    ]  # fmt: skip
    return _markdown_table(header, rows)


def grid_table(payload: Mapping[str, Any]) -> str:
    """Markdown table of the mean validation Pearson r at every learning rate (bold: selected)."""
    lrs = sorted({g["lr"] for s in payload["selection"] for g in s["grid"]})
    rows = []
    for s in payload["selection"]:
        cells = {g["lr"]: g["val_mean"] for g in s["grid"]}
        row = [s["method"]]
        for lr in lrs:
            text = "" if lr not in cells else f"{cells[lr]:.4f}"
            row.append(f"**{text}**" if lr == s["lr"] else text)
        rows.append(row)
    return _markdown_table(["val r at lr", *(f"{lr:g}" for lr in lrs)], rows)


def table_markdown(name: str, payload: Mapping[str, Any]) -> str:
    """One table's section of ``finetune.md``."""
    meta = payload["meta"]
    cfg = meta["config"]
    machine = f"{meta['torch_threads']} CPU threads ({meta['processor']})"
    figure = f"![{name}](assets/results/finetune_{name}.png)\n"
    if "selection" not in payload:  # written before the learning rate was selected
        lr_note = f" (lr scaling: {cfg['lr_scaling']})" if "lr_scaling" in cfg else ""
        return (
            f"### {meta['title']}\n\n"
            "*Old protocol: one fixed learning rate for every method, no validation "
            "split; rerun this table.*\n\n"
            f"{format_table([Summary(**s) for s in payload['summaries']])}\n\n"
            f"Seeds {meta['seeds']}, {cfg['epochs']} epoch(s), lr {cfg['lr']}{lr_note}, "
            f"batch {cfg['batch_size']}, {meta['n_train']} training and {meta['n_test']} "
            f"test tokens, {machine}, {meta['elapsed_s'] / 60:.0f} min in all.\n\n{figure}"
        )
    grid = ", ".join(f"{lr:g}" for lr in meta["lr_grid"])
    return (
        f"### {meta['title']}\n\n"
        f"{results_table(payload)}\n\n"
        f"Each method at the learning rate (lr) of the grid {{{grid}}} with the best "
        "validation Pearson r, mean over the seeds († the smallest or largest of the grid: "
        "the best may lie outside it). val r, test r, test spearman, test rmse: mean ± sd over "
        "the seeds at that lr. Δ test r: test Pearson r minus that of the dense LoRA run "
        "(vs) with the same seed, each at its own selected lr; mean ± sd of the per-seed "
        "difference.\n\n"
        f"{grid_table(payload)}\n\n"
        f"Seeds {meta['seeds']}, {cfg['epochs']} epoch(s), batch {cfg['batch_size']}, "
        f"{meta['n_train']} training, {meta['n_val']} validation and {meta['n_test']} test "
        f"tokens; {meta['n_runs']} runs, {meta['compute_s'] / 3600:.1f} h of training on "
        f"{machine}.\n\n{figure}"
    )


def write_markdown(out_dir: Path) -> Path:
    """Collect every table's JSON into one Markdown file (embedded by docs/benchmarks.md)."""
    parts = []
    for name in TABLES.values():
        js = out_dir / f"finetune_{name}.json"
        if js.is_file():
            parts.append(table_markdown(name, json.loads(js.read_text())))
    out = out_dir / "finetune.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _with_lr(summaries: Sequence[Summary]) -> list[Summary]:
    return [
        replace(s, method=f"{s.method} (lr {s.spec['lr']:g})") if "lr" in s.spec else s
        for s in summaries
    ]


def plot_sweep(summaries: Sequence[Summary], path: Path, title: str) -> Path:
    """Table d: test Pearson r against the rank, one curve per basis (dense LoRA dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    by_basis: dict[str, list[Summary]] = {}
    for s in summaries:
        by_basis.setdefault(str(s.spec["basis"] or "lora"), []).append(s)
    for basis, rows in by_basis.items():
        rows = sorted(rows, key=lambda s: int(s.spec["r"]))
        counts = sorted({s.trainable for s in rows})
        if len(counts) == 1:
            label = f"lora+{basis} ({counts[0]:,} trainable at every r)"
        else:
            label = f"dense {basis} ({counts[0]:,} to {counts[-1]:,} trainable)"
        ax.errorbar(
            [int(s.spec["r"]) for s in rows],
            [s.mean["pearson"] for s in rows],
            yerr=[s.std["pearson"] for s in rows],
            marker="o", capsize=4, label=label, ls="--" if len(counts) > 1 else "-",
        )  # fmt: skip
    ranks = sorted({int(s.spec["r"]) for s in summaries})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlabel("rank r (selora: same number of coefficients at every rank)")
    ax.set_ylabel("test Pearson r (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title + "\neach point at its validation-selected learning rate", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _frontier_point(spec: Mapping[str, Any]) -> tuple[str, str]:
    """The curve a table-e method belongs to, and the point's own label."""
    name = f"{spec['base']}+{spec['basis']}"
    if spec["basis"] is None:
        return f"dense {spec['base']} (rank)", f"r={spec['r']}"
    if spec.get("n_coeffs") is not None:
        return f"{name} r={spec['r']} (coefficients per factor)", f"{spec['n_coeffs']}"
    return f"{name} r={spec['r']} (sparse ratio)", f"{spec['sparse_ratio']:g}"


def plot_frontier(summaries: Sequence[Summary], path: Path, title: str) -> Path:
    """Table e: test Pearson r against trainable parameters (log scale), one curve per family."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    curves: dict[str, list[tuple[Summary, str]]] = {}
    for s in summaries:
        curve, point = _frontier_point(s.spec)
        curves.setdefault(curve, []).append((s, point))
    for curve, points in curves.items():
        points.sort(key=lambda p: p[0].trainable)
        dense = curve.startswith("dense")
        bars = ax.errorbar(
            [s.trainable for s, _ in points],
            [s.mean["pearson"] for s, _ in points],
            yerr=[s.std["pearson"] for s, _ in points],
            marker="s" if dense else "o", capsize=3, label=curve, ls="--" if dense else "-",
            color="0.2" if dense else None, zorder=3 if dense else 2,
        )  # fmt: skip
        color = bars.lines[0].get_color()
        for s, point in points:
            ax.annotate(
                point, (s.trainable, s.mean["pearson"]), textcoords="offset points",
                xytext=(4, -9 if dense else 5), fontsize=6, color=color,
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, adapter and head (log scale)")
    ax.set_ylabel("test Pearson r (mean ± sd over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle(title + "\neach point at its validation-selected learning rate", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_table(table: str, summaries: Sequence[Summary], out_dir: Path, title: str) -> Path:
    """Draw one table's PNG."""
    png = out_dir / f"finetune_{TABLES[table]}.png"
    if table == "d":
        return plot_sweep(summaries, png, title)
    if table == "e":
        return plot_frontier(summaries, png, title)
    return plot_summaries(_with_lr(summaries), png, title=title)


def replot(args: argparse.Namespace) -> int:
    """Redraw the selected tables' PNGs and ``finetune.md`` from the JSON files only."""
    for table in args.tables:
        js = args.out_dir / f"finetune_{TABLES[table]}.json"
        if js.is_file():
            payload = json.loads(js.read_text())
            summaries = [Summary(**s) for s in payload["summaries"]]
            print(f"wrote {plot_table(table, summaries, args.out_dir, payload['meta']['title'])}")
    print(f"wrote {write_markdown(args.out_dir)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the selected tables; write their JSON, PNGs and ``finetune.md``."""
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        epochs=args.epochs, lr=DEFAULT_LR_GRID[0], batch_size=args.batch_size,
        progress=args.progress,
    )  # fmt: skip
    cache = RunCache(args.out_dir, resume=args.resume)
    if args.dry_run:
        plan(args, config, cache)
        return 0
    task = SentimentTask(
        max_train=args.max_train, max_test=args.max_test, val_fraction=args.val_fraction,
        max_val=args.max_val,
    )  # fmt: skip
    assert task.val is not None
    for table in args.tables:
        if not args.resume:
            cache.discard(table)
        methods, fmt = methods_for(table, args)
        title = TITLES[table].format(**fmt)
        grid = lr_grid(table, args)
        n_runs = len(methods) * len(grid) * len(args.seeds)
        print(f"\n{title}: {len(methods)} methods x {len(grid)} lr x "
              f"{len(args.seeds)} seeds = {n_runs} runs", file=sys.stderr)  # fmt: skip
        start = time.perf_counter()
        results, trained = collect_runs(table, methods, args, task, config, cache)
        name = TABLES[table]
        meta = {
            "title": title, "table": name, "seeds": args.seeds, "lr_grid": grid,
            "selected_on": f"validation {METRIC}, mean over seeds",
            "config": {k: v for k, v in asdict(config).items() if k != "lr"},
            "settings": run_settings(config, args),
            "argv": list(sys.argv[1:] if argv is None else argv),
            "n_train": len(task.train), "n_val": len(task.val), "n_test": len(task.test),
            "n_runs": len(results), "trained_now": trained,
            "compute_s": sum(r.wall_s for r in results),
            "elapsed_s": time.perf_counter() - start,
        }  # fmt: skip
        payload = {
            "meta": {**environment(), **meta},
            **analyse(table, results),
            "runs": [r.to_dict() for r in results],
        }
        js = args.out_dir / f"finetune_{name}.json"
        js.parent.mkdir(parents=True, exist_ok=True)
        js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        plot_table(table, [Summary(**s) for s in payload["summaries"]], args.out_dir, title)
        print(f"\n{title}\n\n{results_table(payload)}\n")
    print(f"wrote {write_markdown(args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
