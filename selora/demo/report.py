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
    return statistics.stdev(values) if len(values) > 1 else 0.0


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
    x_key: str = "trainable",
) -> Path:
    """Write a two-panel PNG: test Pearson r against the x axis, and training loss per epoch.

    A linear probe (``head only``), fitted in closed form, shows as a dashed
    line at its training MSE.

    The figure is drawn with Matplotlib's Agg canvas, without ``pyplot``, so it
    neither needs a display nor changes the user's backend.

    Args:
        summaries: the methods to plot.
        path: the PNG's path (parent directories are created).
        title: the figure title.
        x_key: ``"trainable"`` (log scale) or a key of the summaries' ``spec``
            (for example ``"r"`` for a rank sweep).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax_loss = fig.subplots(1, 2)
    markers = "osD^vP*Xh<>p"
    for i, s in enumerate(summaries):
        color, marker = f"C{i % 10}", markers[i % len(markers)]
        x = float(s.trainable) if x_key == "trainable" else float(s.spec[x_key])
        ax.errorbar(
            [x], [s.mean["pearson"]], yerr=[s.std["pearson"]], fmt=marker, color=color,
            capsize=4, markersize=7, label=f"{s.method} ({s.trainable:,})",
        )  # fmt: skip
        if s.spec.get("head_only") and s.epoch_losses:
            ax_loss.axhline(s.epoch_losses[-1], color=color, ls="--", label=f"{s.method} (fit)")
        elif s.epoch_losses:
            epochs = list(range(1, len(s.epoch_losses) + 1))
            ax_loss.plot(epochs, s.epoch_losses, marker=marker, color=color, label=s.method)
    if x_key == "trainable":
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
    else:
        ax.set_xlabel(x_key)
    ax.set_ylabel("test Pearson r (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training MSE")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8, loc="best")
    fig.suptitle(title)
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
