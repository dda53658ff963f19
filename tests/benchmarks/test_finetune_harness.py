"""benchmarks/finetune.py: the tables' methods, lr selection, pairing, resuming, a tiny run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from selora.demo.data import train_test_split, train_validation_split
from selora.demo.model import HIDDEN_SIZE
from selora.demo.train import Method, RunResult, TrainConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "finetune.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finetune() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _adapter_params(r: int, keep: float | None = None) -> int:
    """Per adapted layer (d x d): A is r x d, B is d x r; SeLoRA keeps floor(keep * size) each."""
    size = r * HIDDEN_SIZE
    return 2 * (size if keep is None else math.floor(keep * size))


def _result(method: str, seed: int, lr: float, val: float, test: float, **spec: Any) -> RunResult:
    return RunResult(
        method=method, seed=seed, trainable=int(spec.pop("trainable", 1000)), pearson=test,
        spearman=test, sign_accuracy=0.5, rmse=1.0, wall_s=1.0, epoch_losses=[1.0],
        spec={"basis": None, "base": "lora", "r": 8, "lr": lr, **spec},
        validation={"pearson": val, "spearman": val, "sign_accuracy": 0.5, "rmse": 1.0},
    )  # fmt: skip


def test_matched_rank_is_the_closest_dense_rank(finetune: ModuleType) -> None:
    for selora_rank, ratio in [(32, 0.6), (16, 0.5), (64, 0.9), (8, 0.0)]:
        target = _adapter_params(selora_rank, 1 - ratio)
        brute = min(range(1, 200), key=lambda r: abs(_adapter_params(r) - target))
        assert finetune.matched_rank(selora_rank, ratio, HIDDEN_SIZE, HIDDEN_SIZE) == brute


def test_validation_split_is_fixed_and_leaves_the_test_split_alone() -> None:
    train, test = train_test_split(1000)
    fit, val = train_validation_split(train, 0.15)
    assert len(val) == round(800 * 0.15) and len(fit) + len(val) == len(train)
    assert not set(fit) & set(val) and set(fit) | set(val) == set(train)
    assert not (set(fit) | set(val)) & set(test)
    again = train_validation_split(train, 0.15)
    assert np.array_equal(fit, again[0]) and np.array_equal(val, again[1])


def test_learning_rates_and_no_base_lr(finetune: ModuleType) -> None:
    args = finetune.parse_args([])
    assert args.lr_grid is None and args.seeds == [0, 1, 2]
    for table in "abde":
        assert finetune.lr_grid(table, args) == [3e-4, 1e-3, 3e-3, 1e-2]
    assert finetune.lr_grid("c", args) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert args.epochs == 2 and args.resume and args.val_fraction == 0.15
    given = finetune.parse_args(["--lr-grid", "1e-2", "1e-3", "1e-2"])
    assert given.lr_grid == [1e-3, 1e-2] and finetune.lr_grid("c", given) == [1e-3, 1e-2]
    assert not finetune.parse_args(["--fresh"]).resume
    for bad in (["--lr-grid", "0"], ["--lr-grid", "nan"], ["--base-lr", "hira=1e-2"],
                ["--lr", "1e-3"], ["--seeds", "0", "0"], ["--fresh", "--resume"]):  # fmt: skip
        with pytest.raises(SystemExit):
            finetune.parse_args(bad)


def test_table_c_has_a_lora_reference_then_dora_and_hira(finetune: ModuleType) -> None:
    methods = finetune.methods_for("c", finetune.parse_args([]))[0]
    assert [m.label for m in methods] == [
        "lora", "dora", "dora+fft", "dora+coif", "hira", "hira+fft", "hira+coif",
    ]  # fmt: skip
    assert {m.r for m in methods} == {8}


def test_table_d_has_a_dense_lora_reference_per_rank(finetune: ModuleType) -> None:
    args = finetune.parse_args(["--sweep-ranks", "4", "16", "--sweep-bases", "dct"])
    methods = finetune.methods_for("d", args)[0]
    assert [(m.basis, m.r, m.n_coeffs) for m in methods] == [
        (None, 4, None), (None, 16, None), ("dct", 4, 1024), ("dct", 16, 1024),
    ]  # fmt: skip
    off = finetune.parse_args(["--sweep-ranks", "4", "--sweep-lora-ranks", "0"])
    assert all(m.basis is not None for m in finetune.methods_for("d", off)[0])


def test_table_e_is_lora_across_ranks_and_selora_across_budgets(finetune: ModuleType) -> None:
    methods, fmt = finetune.methods_for("e", finetune.parse_args([]))
    got = [(m.basis, m.r, m.sparse_ratio, m.n_coeffs) for m in methods]
    lora = [(None, r, None, None) for r in (1, 2, 4, 8, 16, 32, 64)]
    spectral = []
    for basis in ("fft", "coif"):
        spectral += [(basis, r, x, None) for r in (8, 32) for x in (0.2, 0.5, 0.8, 0.95)]
        spectral += [(basis, 64, None, n) for n in (256, 1024, 4096, 16384)]
    assert got == lora + spectral
    assert len({m.label for m in methods}) == len(methods)
    assert all(n <= 64 * HIDDEN_SIZE for *_, n in spectral if n is not None)  # fits rank 64
    assert fmt == {"bases": "fft, coif"}


def test_lr_selection_picks_the_best_mean_validation_score(finetune: ModuleType) -> None:
    # (method, lr) -> validation score per seed 0, 1, 2
    val = {
        ("a", 1e-3): [0.80, 0.80, 0.80],
        ("a", 3e-3): [0.95, 0.70, 0.70],  # best single seed, worse mean
        ("a", 1e-2): [0.82, 0.81, 0.80],  # best mean
        ("b", 1e-3): [0.70, 0.70, 0.70],
        ("b", 3e-3): [0.70, 0.70, 0.70],  # a tie: the smaller lr wins
        ("b", 1e-2): [math.nan, 0.99, 0.99],  # diverged once: nan mean never wins
    }
    results = [
        _result(m, seed, lr, v, test=v - 0.01)
        for (m, lr), scores in val.items()
        for seed, v in enumerate(scores)
    ]
    selection = finetune.select_lr(results)
    assert list(selection) == ["a", "b"]
    assert (selection["a"].lr, selection["a"].at_edge) == (1e-2, True)
    assert (selection["b"].lr, selection["b"].at_edge) == (1e-3, True)
    for method, sel in selection.items():  # brute force over every grid value
        means = {lr: statistics.fmean(v) for (m, lr), v in val.items() if m == method}
        finite = {lr: x for lr, x in means.items() if not math.isnan(x)}
        assert sel.lr == min(lr for lr, x in finite.items() if x == max(finite.values()))
        assert [g.lr for g in sel.grid] == sorted(means)
        for g in sel.grid:
            assert g.seeds == [0, 1, 2]
            expected = statistics.fmean(v - 0.01 for v in val[method, g.lr])
            assert g.test_mean == pytest.approx(expected, nan_ok=True)
    chosen = finetune.at_selected_lr(results, selection)
    assert [(r.method, r.spec["lr"]) for r in chosen] == [("a", 1e-2)] * 3 + [("b", 1e-3)] * 3
    middle = finetune.select_lr([_result("c", 0, lr, v, 0.0)
                                 for lr, v in [(1e-3, 0.1), (3e-3, 0.3), (1e-2, 0.2)]])  # fmt: skip
    assert (middle["c"].lr, middle["c"].at_edge) == (3e-3, False)


def test_paired_differences_are_against_lora_with_the_same_seed(finetune: ModuleType) -> None:
    rng = np.random.default_rng(0)
    specs = {
        "lora": {"r": 8},
        "lora+fft": {"basis": "fft", "r": 8, "sparse_ratio": 0.6},
        "dora": {"base": "dora", "r": 8},
    }
    seeds = {"lora": [0, 1, 2], "lora+fft": [2, 0, 1, 3], "dora": [1, 2]}  # seed 3: no pair
    score = {(m, s): float(rng.uniform(0.7, 0.9)) for m in specs for s in seeds[m]}
    results = [_result(m, s, 1e-3, 0.5, score[m, s], **specs[m]) for m in specs for s in seeds[m]]
    summaries = finetune.summarize(results)
    refs = finetune.references("a", summaries)
    assert refs == {"lora": None, "lora+fft": "lora", "dora": "lora"}
    paired = finetune.paired_differences(results, refs)
    assert set(paired) == {"lora+fft", "dora"}
    for method, p in paired.items():
        common = [s for s in seeds[method] if s in seeds["lora"]]
        diffs = [score[method, s] - score["lora", s] for s in common]
        assert p.reference == "lora" and p.seeds == common and p.diffs == pytest.approx(diffs)
        assert p.mean == pytest.approx(statistics.fmean(diffs))
        assert p.sd == pytest.approx(statistics.stdev(diffs))
    # the per-seed pairing is not the difference of the means
    unpaired = statistics.fmean(score["dora", s] for s in seeds["dora"]) - statistics.fmean(
        score["lora", s] for s in seeds["lora"]
    )
    assert paired["dora"].mean != pytest.approx(unpaired)


def test_references_of_the_sweep_and_the_frontier(finetune: ModuleType) -> None:
    rows = [
        _result("lora r=4", 0, 1e-3, 0.5, 0.8, r=4, trainable=37_000),
        _result("lora r=8", 0, 1e-3, 0.5, 0.8, r=8, trainable=74_000),
        _result("fft r=4", 0, 1e-3, 0.5, 0.8, basis="fft", r=4, trainable=25_000),
        _result("fft r=8", 0, 1e-3, 0.5, 0.8, basis="fft", r=8, trainable=25_000),
        _result("fft r=64 n", 0, 1e-3, 0.5, 0.8, basis="fft", r=64, trainable=60_000),
        _result("dora r=8", 0, 1e-3, 0.5, 0.8, base="dora", r=8, trainable=80_000),
    ]
    summaries = finetune.summarize(rows)
    assert finetune.references("d", summaries) == {
        "lora r=4": None, "lora r=8": None, "fft r=4": "lora r=4", "fft r=8": "lora r=8",
        "fft r=64 n": None, "dora r=8": "lora r=8",
    }  # fmt: skip
    assert finetune.references("e", summaries) == {  # nearest count on a log scale
        "lora r=4": None, "lora r=8": None, "fft r=4": "lora r=4", "fft r=8": "lora r=4",
        "fft r=64 n": "lora r=8", "dora r=8": "lora r=8",
    }  # fmt: skip


class _FakeTask:
    def __init__(self, **kwargs: Any) -> None:
        self.train, self.val, self.test = [0] * 40, [0] * 7, [0] * 10


def test_resume_skips_the_runs_already_done(
    finetune: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, float, int]] = []

    def fake_run(task: Any, method: Method, seed: int, config: TrainConfig) -> RunResult:
        calls.append((method.label, config.lr, seed))
        v = 0.8 - 0.1 * abs(math.log10(config.lr) + 2.5) + 0.01 * seed + 0.001 * method.r
        trainable = 2 * 12 * method.r * HIDDEN_SIZE + HIDDEN_SIZE + 1
        if method.basis is not None:
            trainable = 1000 * method.r if method.n_coeffs is None else 24 * method.n_coeffs
        return _result(method.label, seed, config.lr, v, v + 0.02, trainable=trainable,
                       basis=method.basis, base=method.base, r=method.r,
                       sparse_ratio=method.sparse_ratio, n_coeffs=method.n_coeffs)  # fmt: skip

    monkeypatch.setattr(finetune, "run", fake_run)
    monkeypatch.setattr(finetune, "SentimentTask", _FakeTask)
    common = ["--seeds", "0", "1", "--lr-grid", "1e-3", "1e-2", "--out-dir", str(tmp_path)]
    table_a = ["--tables", "a", "--bases", "fft", *common]
    table_e = ["--tables", "e", "--frontier-lora-ranks", "4", "8", "--frontier-ranks", "8",
               "--frontier-ratios", "0.5", "--frontier-n-coeffs", "64", "--frontier-bases", "fft",
               *common]  # fmt: skip

    assert finetune.main(table_a) == 0
    assert len(calls) == 2 * 2 * 2 and len(set(calls)) == len(calls)
    cache = tmp_path / "finetune_equal_rank.runs.jsonl"
    assert len(cache.read_text().splitlines()) == 8
    first = json.loads((tmp_path / "finetune_equal_rank.json").read_text())

    calls.clear()
    assert finetune.main(table_a) == 0
    assert calls == []  # everything cached
    assert json.loads((tmp_path / "finetune_equal_rank.json").read_text())["runs"] == first["runs"]

    # an interrupted run leaves a cut-off line: ignored, that run trains again
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25] + "\n")
    assert finetune.main(table_a) == 0
    assert calls == [("lora+fft", 1e-2, 1)]

    # dense LoRA at r = 8 ran for table a: table e reuses it, under its own label
    calls.clear()
    assert finetune.main(table_e) == 0
    assert sorted({label for label, *_ in calls}) == [
        "lora r=4", "lora+fft r=64 n=64", "lora+fft r=8 ratio=0.5",
    ]  # fmt: skip
    frontier = json.loads((tmp_path / "finetune_frontier.json").read_text())
    assert [s["method"] for s in frontier["summaries"]] == [
        "lora r=4", "lora r=8", "lora+fft r=8 ratio=0.5", "lora+fft r=64 n=64",
    ]  # fmt: skip
    assert len(frontier["runs"]) == 4 * 2 * 2 and frontier["meta"]["trained_now"] == 12
    assert (tmp_path / "finetune_frontier.png").read_bytes()[:8] == PNG_MAGIC

    calls.clear()
    assert finetune.main([*table_a, "--dry-run"]) == 0
    assert finetune.main([*table_a, "--fresh"]) == 0
    assert len(calls) == 8
    assert len(cache.read_text().splitlines()) == 8

    calls.clear()
    assert finetune.main([*table_a, "--epochs", "1"]) == 0  # other settings: other runs
    assert len(calls) == 8


def test_tiny_run_writes_json_png_markdown_and_replots(
    finetune: ModuleType, tmp_path: Path
) -> None:
    argv = [
        "--tables", "c", "--adapter-bases", "hira", "--spectral-bases", "fft",
        "--seeds", "0", "--epochs", "1", "--lr-grid", "1e-3", "1e-2",
        "--max-train", "48", "--max-val", "32", "--max-test", "48",
        "--threads", "1", "--no-progress", "--out-dir", str(tmp_path),
    ]  # fmt: skip
    assert finetune.main(argv) == 0
    payload = json.loads((tmp_path / "finetune_bases_of_adaptation.json").read_text())
    methods = ["lora", "hira", "hira+fft"]
    runs = {(r["method"], r["spec"]["lr"], r["seed"]): r for r in payload["runs"]}
    assert set(runs) == set(itertools.product(methods, [1e-3, 1e-2], [0]))
    assert all(set(r["validation"]) == {"pearson", "spearman", "sign_accuracy", "rmse"}
               for r in runs.values())  # fmt: skip
    assert [s["method"] for s in payload["summaries"]] == methods
    for sel, summary in zip(payload["selection"], payload["summaries"], strict=True):
        best = max(sel["grid"], key=lambda g: g["val_mean"])
        assert sel["lr"] == best["lr"] == summary["spec"]["lr"]
        run = runs[summary["method"], sel["lr"], 0]
        assert summary["mean"]["pearson"] == run["pearson"]
    assert [(p["method"], p["reference"]) for p in payload["paired"]] == [
        ("hira", "lora"), ("hira+fft", "lora"),
    ]  # fmt: skip
    meta = payload["meta"]
    assert (meta["n_train"], meta["n_val"], meta["n_test"]) == (48, 32, 48)
    assert meta["lr_grid"] == [1e-3, 1e-2] and meta["n_runs"] == 6
    assert len((tmp_path / "finetune_bases_of_adaptation.runs.jsonl").read_text().splitlines()) == 6
    png = tmp_path / "finetune_bases_of_adaptation.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    markdown = (tmp_path / "finetune.md").read_text()
    assert "| hira+fft |" in markdown and "| Δ test r |" in markdown
    assert "assets/results/finetune_bases_of_adaptation.png" in markdown
    png.unlink()
    (tmp_path / "finetune.md").unlink()
    assert finetune.main(["--replot", "--tables", "c", "--out-dir", str(tmp_path)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "finetune.md").read_text() == markdown
