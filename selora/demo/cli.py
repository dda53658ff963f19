"""Command line of the demo: ``python -m selora.demo --help``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_methods", "build_parser", "main"]

DENSE_NAMES = ("none", "dense", "lora")
"""Values of ``--bases`` that mean plain dense factors (``basis=None``)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a ratio in [0, 1); got {text}")
    return value


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    """Return the demo's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m selora.demo",
        description=(
            "Fine-tune all-MiniLM-L6-v2 to predict the valence of VADER lexicon tokens "
            "with plain LoRA and with sparse spectral adapters; print a results table "
            "and write a plot. Everything runs offline on the CPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--bases", nargs="+", default=["none", "fft", "coif"],
        help="spectral bases to compare; 'none' is plain dense LoRA (basis=None)",
    )  # fmt: skip
    parser.add_argument(
        "--adapter-bases", nargs="+", default=["lora"],
        help="bases of adaptation (lora, dora, hira, ...); every one is combined with every basis",
    )  # fmt: skip
    parser.add_argument("--rank", "-r", type=_positive_int, default=8, help="adapter rank r")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--sparse-ratio", type=_ratio, default=None,
        help="SeLoRA budget: fraction of each factor's spectrum left out (default 0.6)",
    )  # fmt: skip
    budget.add_argument(
        "--n-coeffs", type=_positive_int, default=None,
        help="FoRA budget: coefficients per factor",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    parser.add_argument(
        "--epochs", type=_positive_int, default=2, help="passes over the training split"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-2, help="peak learning rate (AdamW), one for every parameter"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="rows per step")
    parser.add_argument(
        "--output", "-o", type=Path, default=Path("demo_results.png"), help="PNG plot to write"
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument(
        "--max-train", type=_positive_int, default=None,
        help="use only this many training rows (quick smoke runs)",
    )  # fmt: skip
    parser.add_argument(
        "--max-test", type=_positive_int, default=None, help="use only this many test rows"
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=_positive_int, default=_default_threads(),
        help="torch intra-op threads (default: the CPU cores available to this process)",
    )  # fmt: skip
    parser.add_argument(
        "--no-head-only", dest="head_only", action="store_false",
        help="skip the baseline that trains only the head on the frozen encoder",
    )  # fmt: skip
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    return parser


def build_methods(
    bases: Sequence[str],
    adapter_bases: Sequence[str],
    rank: int,
    *,
    sparse_ratio: float | None = None,
    n_coeffs: int | None = None,
    head_only: bool = True,
) -> list[Any]:
    """Combine every base of adaptation with every spectral basis.

    Args:
        bases: basis names; ``"none"`` (or ``"dense"``) means dense factors.
        adapter_bases: names of bases of adaptation.
        rank: the rank of every adapter.
        sparse_ratio: SeLoRA's budget for the spectral bases.
        n_coeffs: FoRA's budget for the spectral bases (exclusive with ``sparse_ratio``).
        head_only: put the linear-probe baseline first.

    Returns:
        The :class:`selora.demo.Method` list.
    """
    from selora.demo.train import Method

    if sparse_ratio is None and n_coeffs is None:
        sparse_ratio = 0.6
    methods = [Method(head_only=True)] if head_only else []
    for base in adapter_bases:
        for name in bases:
            if name.lower() in DENSE_NAMES:
                methods.append(Method(basis=None, base=base, r=rank))
            else:
                methods.append(
                    Method(
                        basis=name, base=base, r=rank, sparse_ratio=sparse_ratio, n_coeffs=n_coeffs
                    )
                )
    return methods


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` if ``None``).

    Returns:
        The exit status, 0 on success.
    """
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from selora.demo.report import format_table, plot_summaries, summarize, write_json
    from selora.demo.train import SentimentTask, TrainConfig, run_grid

    methods = build_methods(
        args.bases, args.adapter_bases, args.rank, sparse_ratio=args.sparse_ratio,
        n_coeffs=args.n_coeffs, head_only=args.head_only,
    )  # fmt: skip
    config = TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, progress=args.progress,
    )  # fmt: skip
    print(
        f"Loading all-MiniLM-L6-v2 and the VADER lexicon ({args.threads} threads) ...",
        file=sys.stderr,
    )
    task = SentimentTask(max_train=args.max_train, max_test=args.max_test)
    print(
        f"train {len(task.train)} tokens, test {len(task.test)} tokens; "
        f"{len(methods)} methods x {len(args.seeds)} seeds, {args.epochs} epochs",
        file=sys.stderr,
    )
    results = run_grid(task, methods, args.seeds, config)
    summaries = summarize(results)
    print()
    print(format_table(summaries))
    plot = plot_summaries(summaries, args.output)
    print(f"\nplot: {plot}")
    if args.json is not None:
        meta = {"argv": list(sys.argv[1:] if argv is None else argv), "config": config.__dict__}
        print(f"json: {write_json(args.json, results, summaries, meta)}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return 0
