"""Fine-tuning benchmark: LoRA against selora on all-MiniLM-L6-v2 and the VADER lexicon.

Four tables, each written as ``benchmarks/results/finetune_<table>.json`` and
``.png``, plus ``benchmarks/results/finetune.md`` with every table run so far:

a. ``equal_rank``: dense LoRA against selora (sparse ratio 0.6) with every
   built-in basis, all at rank ``--rank``.
b. ``equal_budget``: selora at rank ``--budget-rank`` (sparse ratio 0.6) against
   dense LoRA at the rank whose parameter count is closest (and, for
   reference, dense LoRA at the same rank).
c. ``bases_of_adaptation``: DoRA and HiRA, each with dense factors and with
   spectral ones, at the shared learning rate and, for the bases named in
   ``--base-lr`` (default ``hira=1e-2``), again at their own learning rate:
   HiRA's update W0 * (BA) (elementwise) is scaled by the entries of
   W0 (rms 0.04 to 0.10 in MiniLM's query and value), so it needs a larger one.
d. ``rank_sweep``: selora at ranks 4..128 with a fixed number of coefficients
   per factor (``--sweep-n-coeffs``), so every rank trains the same budget,
   beside dense LoRA at the same ranks, whose budget grows with the rank
   (FoRA's claim is that the first curve follows the second).

The task, the model and the training loop are the demo's (``selora.demo``):
the test metric is Pearson's r between predicted and rated valence on a
fixed 20 % held-out split. Everything runs offline. The full default run
(3 seeds, 2 epochs, all tables) takes hours on a laptop CPU; it is not part of
CI. Example of a reduced run::

    python benchmarks/finetune.py --tables a c --seeds 0 1 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from selora import list_bases
from selora.demo.model import HIDDEN_SIZE
from selora.demo.report import Summary, format_table, plot_summaries, summarize, write_json
from selora.demo.train import Method, SentimentTask, TrainConfig, run

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = {
    "a": "equal_rank",
    "b": "equal_budget",
    "c": "bases_of_adaptation",
    "d": "rank_sweep",
}
TITLES = {
    "a": "(a) Equal rank: dense LoRA vs selora (sparse ratio {ratio}) at r = {rank}",
    "b": "(b) Equal trainable budget: selora at r = {budget_rank} vs dense LoRA at r = {match}",
    "c": "(c) DoRA and HiRA, dense and spectral factors, r = {rank}",
    "d": "(d) Rank sweep at a fixed budget of {n} coefficients per factor",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=sorted(TABLES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-scaling", choices=["matched", "none"], default="matched")
    p.add_argument("--rank", type=int, default=8, help="rank of tables a and c")
    p.add_argument("--sparse-ratio", type=float, default=0.6, help="budget of tables a, b, c")
    p.add_argument("--bases", nargs="+", default=None, help="table a (default: every built-in)")
    p.add_argument("--budget-rank", type=int, default=32, help="selora's rank in table b")
    p.add_argument("--budget-bases", nargs="+", default=["fft", "dct", "coif"])
    p.add_argument("--adapter-bases", nargs="+", default=["dora", "hira"], help="table c")
    p.add_argument("--spectral-bases", nargs="+", default=["fft", "coif"], help="table c")
    p.add_argument(
        "--base-lr", nargs="*", default=["hira=1e-2"], metavar="BASE=LR",
        help="table c: also run these bases of adaptation at their own learning rate",
    )  # fmt: skip
    p.add_argument("--sweep-ranks", nargs="+", type=int, default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--sweep-n-coeffs", type=int, default=1024)
    p.add_argument("--sweep-bases", nargs="+", default=["fft", "coif"])
    p.add_argument(
        "--sweep-lora-ranks", nargs="+", type=int, default=None,
        help="dense LoRA reference ranks in table d (default: --sweep-ranks; 0 for none)",
    )  # fmt: skip
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--replot", action="store_true", help="redraw PNGs and Markdown from the saved JSON only"
    )
    return p.parse_args(argv)


def matched_rank(selora_rank: int, sparse_ratio: float, d_in: int, d_out: int) -> int:
    """Dense LoRA rank whose parameter count is closest to selora's at ``selora_rank``."""
    keep = 1.0 - sparse_ratio
    per_layer = int(keep * selora_rank * d_in) + int(keep * d_out * selora_rank)
    return max(1, round(per_layer / (d_in + d_out)))


def base_learning_rates(pairs: Sequence[str]) -> dict[str, float]:
    """Parse ``--base-lr`` entries ``BASE=LR`` (for example ``hira=1e-2``)."""
    out: dict[str, float] = {}
    for pair in pairs:
        base, sep, value = pair.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not sep or not base or not lr > 0:
            raise SystemExit(f"--base-lr: expected BASE=LR with LR > 0, got {pair!r}")
        out[base] = lr
    return out


def methods_for(
    table: str, args: argparse.Namespace
) -> tuple[list[tuple[Method, float]], dict[str, Any]]:
    """The methods of one table, each with its learning rate, and the title's fields."""
    runs, fmt = _methods(table, args)
    own = base_learning_rates(args.base_lr) if table == "c" else {}
    extra = [
        (replace(m, name=f"{m.label} lr={own[m.base]:g}"), own[m.base])
        for m in runs
        if m.base in own
    ]
    return [(m, args.lr) for m in runs] + extra, fmt


def _methods(table: str, args: argparse.Namespace) -> tuple[list[Method], dict[str, Any]]:
    ratio, rank = args.sparse_ratio, args.rank
    if table == "a":
        bases = args.bases or list_bases()
        methods = [Method(basis=None, r=rank)]
        methods += [Method(basis=b, r=rank, sparse_ratio=ratio) for b in bases]
        return methods, {"ratio": ratio, "rank": rank}
    if table == "b":
        match = matched_rank(args.budget_rank, ratio, HIDDEN_SIZE, HIDDEN_SIZE)
        methods = [Method(basis=None, r=match, name=f"lora r={match}")]
        # reference: dense LoRA at selora's rank, with 1 / (1 - ratio) times the parameters
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
        methods = []
        for base in args.adapter_bases:
            methods.append(Method(basis=None, base=base, r=rank))
            methods += [
                Method(basis=b, base=base, r=rank, sparse_ratio=ratio) for b in args.spectral_bases
            ]
        return methods, {"rank": rank}
    n = args.sweep_n_coeffs
    lora_ranks = args.sweep_ranks if args.sweep_lora_ranks is None else args.sweep_lora_ranks
    methods = [Method(basis=None, r=r, name=f"lora r={r}") for r in lora_ranks if r > 0]
    methods += [
        Method(basis=b, r=r, n_coeffs=n, name=f"lora+{b} r={r}")
        for b in args.sweep_bases
        for r in args.sweep_ranks
    ]
    return methods, {"n": n}


def plot_sweep(summaries: Sequence[Summary], path: Path, title: str) -> Path:
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
    ax.set_xlabel("rank r (same number of coefficients at every rank)")
    ax.set_ylabel("test Pearson r (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_markdown(out_dir: Path) -> Path:
    """Collect every table's JSON into one Markdown file (embedded by docs/benchmarks.md)."""
    parts = []
    for name in TABLES.values():
        js = out_dir / f"finetune_{name}.json"
        if not js.is_file():
            continue
        payload = json.loads(js.read_text())
        meta = payload["meta"]
        summaries = [Summary(**s) for s in payload["summaries"]]
        cfg = meta["config"]
        parts.append(
            f"### {meta['title']}\n\n"
            f"{format_table(summaries)}\n\n"
            f"Seeds {meta['seeds']}, {cfg['epochs']} epoch(s), lr {cfg['lr']} "
            f"(lr scaling: {cfg['lr_scaling']}), batch {cfg['batch_size']}, "
            f"{meta['n_train']} training and {meta['n_test']} test tokens, "
            f"{meta['torch_threads']} CPU threads ({meta['processor']}), "
            f"{meta['elapsed_s'] / 60:.0f} min in all.\n\n"
            f"![{name}](assets/results/finetune_{name}.png)\n"
        )
    out = out_dir / "finetune.md"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def plot_table(table: str, summaries: Sequence[Summary], out_dir: Path, title: str) -> Path:
    png = out_dir / f"finetune_{TABLES[table]}.png"
    if table == "d":
        return plot_sweep(summaries, png, title)
    return plot_summaries(summaries, png, title=title)


def replot(args: argparse.Namespace) -> int:
    for table in args.tables:
        js = args.out_dir / f"finetune_{TABLES[table]}.json"
        if js.is_file():
            payload = json.loads(js.read_text())
            summaries = [Summary(**s) for s in payload["summaries"]]
            print(f"wrote {plot_table(table, summaries, args.out_dir, payload['meta']['title'])}")
    print(f"wrote {write_markdown(args.out_dir)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        lr_scaling=args.lr_scaling, progress=args.progress,
    )  # fmt: skip
    task = SentimentTask(max_train=args.max_train, max_test=args.max_test)
    for table in args.tables:
        methods, fmt = methods_for(table, args)
        title = TITLES[table].format(**fmt)
        print(f"\n{title}: {len(methods)} methods x {len(args.seeds)} seeds", file=sys.stderr)
        start = time.perf_counter()
        results = []
        for method, lr in methods:
            for seed in args.seeds:
                result = run(task, method, seed, replace(config, lr=lr))
                result.spec["lr"] = lr  # the table's config holds only the shared one
                results.append(result)
        summaries = summarize(results)
        name = TABLES[table]
        meta = {
            "title": title, "table": name, "seeds": args.seeds, "config": config.__dict__,
            "argv": list(sys.argv[1:] if argv is None else argv),
            "n_train": len(task.train), "n_test": len(task.test),
            "elapsed_s": time.perf_counter() - start,
        }  # fmt: skip
        write_json(args.out_dir / f"finetune_{name}.json", results, summaries, meta)
        plot_table(table, summaries, args.out_dir, title)
        print(f"\n{title}\n\n{format_table(summaries)}\n")
    print(f"wrote {write_markdown(args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
