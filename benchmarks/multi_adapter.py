"""Several active adapters on one layer cost what their sum costs: selora vs PEFT LoRA.

One frozen ``nn.Linear(d, d)``; K = 1, 2, 3 adapters active at once (selora:
lora + fft, PEFT: LoRA, both at rank r), forward + backward of ``tokens`` rows.
A step with K adapters should cost the frozen layer's step plus K times one
adapter's extra cost, so the printed "excess" ratio

    (t_K - t_0) / (K * (t_1 - t_0))

is about 1 when K adapters cost their sum (t_0: the frozen layer alone).
The same ratio for PEFT's LoRA, measured in the same process and interleaved,
is the reference. Wall time and process CPU time are both reported (medians
over the repeats); on a shared machine the CPU time is the steadier one.

Run from the repository root::

    python benchmarks/multi_adapter.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step import Holder
from step import shared_linear as _shared
from timing import interleaved_wall_cpu

import selora


def _selora(base: nn.Linear, k: int, r: int) -> nn.Module:
    holder = Holder(_shared(base))
    names = [f"a{i}" for i in range(k)]
    for i, name in enumerate(names):
        adapter = selora.SpectralAdapter(
            basis="fft", r=r, alpha=2 * r, seed=i, target_modules=["layer"]
        )
        selora.inject(holder, adapter, name=name)
    selora.set_adapter(holder, names)
    return holder.layer


def _peft(base: nn.Linear, k: int, r: int) -> nn.Module:
    import peft

    holder = Holder(_shared(base))
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"])
    model = peft.get_peft_model(holder, config, adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"]))
    model.base_model.set_adapter([f"a{i}" for i in range(k)])
    return model.get_base_model().layer


def _step(layer: nn.Module, x: Tensor, upstream: Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def run() -> None:
        layer(x).backward(upstream)
        for p in params:
            p.grad = None
        x.grad = None

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = nn.Linear(args.d, args.d)
    base.requires_grad_(False)
    x = torch.randn(args.tokens, args.d, requires_grad=True)
    upstream = torch.randn(args.tokens, args.d)
    runs: dict[str, Callable[[], None]] = {"frozen": _step(_shared(base), x, upstream)}
    for k in (1, 2, 3):
        runs[f"selora K={k}"] = _step(_selora(base, k, args.r), x, upstream)
        runs[f"peft K={k}"] = _step(_peft(base, k, args.r), x, upstream)
    samples = interleaved_wall_cpu(runs, args.repeats)
    med_w = {n: statistics.median(s["wall"]) for n, s in samples.items()}
    med_c = {n: statistics.median(s["cpu"]) for n, s in samples.items()}
    print(
        f"one layer {args.d}x{args.d}, r={args.r}, {args.tokens} tokens, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats"
    )
    print(f"{'contender':<14}{'wall ms':>9}{'cpu ms':>9}{'excess(wall)':>14}{'excess(cpu)':>13}")
    for lib in ("selora", "peft"):
        one_w = med_w[f"{lib} K=1"] - med_w["frozen"]
        one_c = med_c[f"{lib} K=1"] - med_c["frozen"]
        for k in (1, 2, 3):
            name = f"{lib} K={k}"
            ew = (med_w[name] - med_w["frozen"]) / (k * one_w)
            ec = (med_c[name] - med_c["frozen"]) / (k * one_c)
            times = f"{1e3 * med_w[name]:>9.1f}{1e3 * med_c[name]:>9.1f}"
            print(f"{name:<14}{times}{ew:>14.3f}{ec:>13.3f}")
    print(f"{'frozen':<14}{1e3 * med_w['frozen']:>9.1f}{1e3 * med_c['frozen']:>9.1f}")


if __name__ == "__main__":
    main()
