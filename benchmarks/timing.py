"""Interleaved timing and result files shared by the benchmarks.

Every repeat runs each contender once, starting from a different one in turn,
so that a slow phase of a noisy machine hits all of them alike.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def interleaved_samples(
    runs: dict[str, Callable[[], None]], repeats: int, warmup: int, number: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each run: ``repeats`` samples, each the mean of ``number`` calls."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(number):
                runs[name]()
            samples[name].append((time.perf_counter() - start) / number)
    return samples


def interleaved_wall_cpu(
    runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds of each call: ``{name: {"wall": [...], "cpu": [...]}}``.

    Process CPU time is the steadier figure on a shared machine (another job's
    load slows the wall clock, not this process's CPU time).
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            samples[name]["wall"].append(time.perf_counter() - wall)
            samples[name]["cpu"].append(time.process_time() - cpu)
    return samples


def medians_of(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each run's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path``, with the machine it was measured on."""
    machine = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, **machine}, indent=2) + "\n")
    print(f"wrote {path}")


def paired_ratios(values: list[float], reference: list[float]) -> list[float]:
    """Per-repeat ratios ``values[i] / reference[i]`` of two runs timed in the same repeats."""
    if len(values) != len(reference):
        raise ValueError(f"{len(values)} samples against {len(reference)} reference samples")
    return [v / r for v, r in zip(values, reference, strict=True)]


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    r"""The median of ``values`` and a distribution-free confidence interval for it.

    The interval is :math:`[x_{(j)}, x_{(n+1-j)}]` over the sorted sample, with
    :math:`j` the largest index for which the binomial tail
    :math:`P(\mathrm{Bin}(n, 1/2) < j) \le (1 - \text{level}) / 2`: the true median
    lies below :math:`x_{(j)}` only if fewer than :math:`j` samples fall under it.
    It needs no assumption on the noise's shape, which on a shared machine is
    anything but normal. With fewer than 6 samples (no such :math:`j` at 95 %)
    it is the sample's range.
    """
    ordered = sorted(values)
    n = len(ordered)
    tail, j, cumulative = (1.0 - level) / 2.0, 0, 0.0
    while j < n // 2:
        cumulative += math.comb(n, j) / 2.0**n  # P(Bin = j); then P(Bin < j + 1)
        if cumulative > tail:
            break
        j += 1
    low, high = (ordered[j - 1], ordered[n - j]) if j else (ordered[0], ordered[-1])
    return statistics.median(ordered), low, high
