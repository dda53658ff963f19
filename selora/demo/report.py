"""Summaries of runs: mean and spread over seeds, a text table, a PNG plot and JSON."""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from selora.demo.train import RunResult

__all__ = ["METRICS", "Summary", "format_table", "plot_summaries", "summarize", "write_json"]

METRICS = ("pearson", "spearman", "sign_accuracy", "rmse", "wall_s")
"""Per-run numbers that :func:`summarize` averages."""


@dataclass
class Summary:
    """One method's results over its seeds.

    Attributes:
        method: the method's label.
        trainable: trainable parameters (equal for every seed).
        seeds: the seeds that ran.
        mean: mean of each metric in :data:`METRICS`.
        std: sample standard deviation of each metric (0 with one seed).
        epoch_losses: mean training loss per epoch, averaged over seeds.
        spec: the method's fields.
    """

    method: str
    trainable: int
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    epoch_losses: list[float] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    # statistics.stdev raises on a NaN (a diverged run's score) before Python 3.12
    return math.nan if any(math.isnan(v) for v in values) else statistics.stdev(values)


def summarize(results: Sequence[RunResult]) -> list[Summary]:
    """Group runs by method (in order of first appearance) and average over seeds.

    Args:
        results: runs, any number of seeds per method.

    Returns:
        One summary per method.
    """
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.method, []).append(r)
    out = []
    for method, runs in groups.items():
        n_epochs = min(len(r.epoch_losses) for r in runs)
        out.append(
            Summary(
                method=method,
                trainable=runs[0].trainable,
                seeds=[r.seed for r in runs],
                mean={k: statistics.fmean(getattr(r, k) for r in runs) for k in METRICS},
                std={k: _std([getattr(r, k) for r in runs]) for k in METRICS},
                epoch_losses=[
                    statistics.fmean(r.epoch_losses[e] for r in runs) for e in range(n_epochs)
                ],
                spec=runs[0].spec,
            )
        )
    return out


def _cell(s: Summary, key: str, digits: int) -> str:
    mean = s.mean[key]
    if math.isnan(mean):
        return "nan"
    if len(s.seeds) > 1:
        return f"{mean:.{digits}f} ± {s.std[key]:.{digits}f}"
    return f"{mean:.{digits}f}"


def format_table(summaries: Sequence[Summary]) -> str:
    """Render summaries as a Markdown table.

    Columns: method, trainable parameters, test Pearson r, Spearman rho, sign
    accuracy, RMSE and wall time (mean ± standard deviation over seeds when
    there are several).

    Args:
        summaries: what to show, one row each.

    Returns:
        The table, one line per row, no trailing newline.
    """
    header = ["method", "trainable", "pearson", "spearman", "sign acc", "rmse", "wall (s)", "seeds"]
    rows = [
        [
            s.method,
            f"{s.trainable:,}",
            _cell(s, "pearson", 4),
            _cell(s, "spearman", 4),
            _cell(s, "sign_accuracy", 4),
            _cell(s, "rmse", 4),
            _cell(s, "wall_s", 1),
            str(len(s.seeds)),
        ]
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 3, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def plot_summaries(
    summaries: Sequence[Summary],
    path: str | Path,
    *,
    title: str = "all-MiniLM-L6-v2 on the VADER lexicon",
) -> Path:
    """Write a PNG with one row per method: test Pearson r and trainable parameters.

    The left panel shows the mean test Pearson r with the standard deviation
    over seeds as error bars, and a dashed line at the first dense-factor
    method (plain LoRA, DoRA, ...) for reference; the right panel shows the
    number of trainable parameters (on a log scale when they span more than
    a factor of 20). The figure is drawn with
    Matplotlib's Agg canvas, without ``pyplot``, so it neither needs a display
    nor changes the user's backend.

    Args:
        summaries: the methods to plot, top to bottom.
        path: the PNG's path (parent directories are created).
        title: the figure title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    n = len(summaries)
    fig = Figure(figsize=(10, 1.6 + 0.42 * n), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax_params = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    rows = list(range(n))[::-1]  # first summary on top
    colors = [f"C{i % 10}" for i in range(n)]
    means = [s.mean["pearson"] for s in summaries]
    ax.errorbar(
        means, rows, xerr=[s.std["pearson"] for s in summaries], fmt="none",
        ecolor="0.3", capsize=4, zorder=1,
    )  # fmt: skip
    ax.scatter(means, rows, c=colors, s=50, zorder=2)
    for s, y, m in zip(summaries, rows, means, strict=True):
        spread = f" ± {s.std['pearson']:.4f}" if len(s.seeds) > 1 else ""
        ax.annotate(
            f"{m:.4f}{spread}", (m, y), textcoords="offset points", xytext=(0, 7),
            ha="center", fontsize=7,
        )  # fmt: skip
    reference = next(
        (s for s in summaries if s.spec.get("basis") is None and not s.spec.get("head_only")),
        None,
    )
    if reference is not None:
        ax.axvline(reference.mean["pearson"], color="0.5", ls="--", lw=1, zorder=0)
    ax.set_yticks(rows, [s.method for s in summaries])
    ax.set_ylim(-0.7, n - 0.3)
    n_seeds = max(len(s.seeds) for s in summaries)
    ax.set_xlabel(
        f"test Pearson r (mean ± sd over {n_seeds} seeds)" if n_seeds > 1 else "test Pearson r"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    ax_params.barh(rows, [s.trainable for s in summaries], color=colors, height=0.5)
    for s, y in zip(summaries, rows, strict=True):
        ax_params.annotate(
            f" {s.trainable:,}", (s.trainable, y), va="center", fontsize=7
        )  # fmt: skip
    counts = [s.trainable for s in summaries]
    if max(counts) > 20 * min(counts):
        ax_params.set_xscale("log")
        ax_params.set_xlim(10 ** math.floor(math.log10(min(counts))), max(counts) * 8)
        ax_params.xaxis.set_minor_formatter(NullFormatter())
        ax_params.set_xlabel("trainable parameters (log scale)")
    else:
        ax_params.set_xlim(0, max(counts) * 1.35)
        ax_params.set_xlabel("trainable parameters")
    ax_params.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def environment() -> dict[str, Any]:
    """Describe where the numbers were measured (versions, threads, platform).

    Returns:
        A JSON-serialisable dict.
    """
    import selora

    return {
        "selora": selora.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def write_json(
    path: str | Path,
    results: Sequence[RunResult],
    summaries: Sequence[Summary],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write runs, summaries and settings as JSON.

    Args:
        path: the file (parent directories are created).
        results: every run.
        summaries: their summaries.
        meta: extra settings to record (training configuration, command line).

    Returns:
        The path written.
    """
    payload = {
        "meta": {**environment(), **dict(meta or {})},
        "summaries": [asdict(s) for s in summaries],
        "runs": [r.to_dict() for r in results],
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return out
