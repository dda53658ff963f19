"""Time one adapted linear layer, forward + backward, against Hugging Face PEFT.

One frozen ``nn.Linear(d, d)`` (with bias) and an input of ``tokens`` rows
that requires grad (a layer in the middle of a network: the backward pass also
computes dL/dx). One step is ``layer(x).backward(upstream)`` followed by
dropping the gradients. Every contender wraps the *same* frozen weight and
runs in this one process; contenders are interleaved within each repeat (in a
rotating order, so none always runs first) and the median over repeats is
reported.

Pairs and goals:

* each selora base (lora, dora, hira) with each built-in basis and with dense
  factors (basis=None) vs PEFT's LoRA / DoRA (``LoraConfig(use_dora=True)``) /
  HiRA at the same rank: time ratio selora / PEFT, goal <= 1.05;
* selora LoRA at the same number of trainable coefficients as FourierFT and
  WaveFT (``--budget`` per layer, split evenly between the two factors): fft vs
  FourierFT, haar vs WaveFT(db1 = Haar), db4 vs WaveFT(db4); speed-up PEFT / selora,
  goal >= 2;
* peak memory of a step vs PEFT LoRA, goal <= 1.05 (the goal applies to the
  LoRA base: DoRA and HiRA need the dense d x d weight by definition);
* after ``merge``, inference (no_grad forward) vs the plain base layer.

Peak memory. With CUDA, ``torch.cuda.max_memory_allocated`` over the step
minus the memory allocated before it. On the CPU, tracemalloc does not see
torch's allocator and RSS deltas mostly reflect the allocator's caching, so
the step runs once under ``torch.profiler`` with ``profile_memory=True``:
every allocation and free of torch's CPU allocator is an event with a signed
size; their running sum, in time order, peaks at the step's peak of memory
allocated on top of what existed before it (weights and input excluded,
activations, temporaries and gradients included).

Threads. On a CPU shared with other jobs, pass ``--threads`` = the number of
idle cores: when a core is busy elsewhere, every OpenMP parallel region waits
for a descheduled thread, which costs milliseconds per *small* op. That
penalises whichever contender runs many small ops (selora's transforms of the
r x d factors: measured 30-70x slower with 2 threads on 2 cores of which one
was busy, against one thread) far more than the few large matmuls of the
dense contenders, and says nothing about either library.

Run from the repository root::

    python benchmarks/step.py                           # d=4096, r=32, 2048 tokens
    python benchmarks/step.py --d 2048 --tokens 1024 --threads 1 --json step.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import interleaved_samples, medians_of, write_results

import selora
from selora.adapters import DEFAULT_SPARSE_RATIO


class Holder(nn.Module):
    """A one-layer model, so that every library can target the layer by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x)
        return out


@dataclasses.dataclass
class Contender:
    name: str
    layer: nn.Module  # the adapted layer itself (called directly: no wrapper overhead)
    trainable: int


def shared_linear(base: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` holding the same frozen weight and bias (no copy)."""
    with torch.device("meta"):
        layer = nn.Linear(base.in_features, base.out_features)
    layer.weight = base.weight
    layer.bias = base.bias
    return layer


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def selora_contender(
    base: nn.Linear, name: str, adapter_base: str, basis: str | None, r: int, **budget: object
) -> Contender:
    holder = Holder(shared_linear(base))
    adapter = selora.SpectralAdapter(
        basis=basis, base=adapter_base, r=r, alpha=2 * r, target_modules=["layer"], **budget
    )  # type: ignore[arg-type]
    selora.inject(holder, adapter)
    return Contender(name, holder.layer, trainable_count(holder))


def peft_contender(base: nn.Linear, name: str, config: object) -> Contender:
    import peft

    holder = Holder(shared_linear(base))
    model = peft.get_peft_model(holder, config)
    layer = model.get_base_model().layer
    return Contender(name, layer, trainable_count(model))


def make_step(layer: nn.Module, x: Tensor, upstream: Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        out = layer(x)
        out.backward(upstream)
        for p in params:
            p.grad = None
        x.grad = None

    return step


def make_inference(layer: nn.Module, x: Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            layer(x)

    return run


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop lines (written straight to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(run: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated by one call on top of what was allocated before it (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with (
        quiet_native_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += int(event.nbytes())
        peak = max(peak, live)
    return peak


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096, help="d_in = d_out (default 4096)")
    parser.add_argument("--r", type=int, default=32, help="rank (default 32)")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x (default 2048)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--sparse-ratio",
        type=float,
        default=DEFAULT_SPARSE_RATIO,
        help="selora's budget in the pairs against PEFT LoRA/DoRA/HiRA",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="trainable coefficients per layer for the FourierFT/WaveFT pairs "
        "(default: what --sparse-ratio gives at rank r, 2 * floor((1 - ratio) * r * d))",
    )
    parser.add_argument(
        "--bases", nargs="+", default=["lora", "dora", "hira"], help="selora bases to time"
    )
    parser.add_argument(
        "--basis",
        nargs="+",
        default=None,
        help="spectral bases to time ('none' for dense factors; default: all + none)",
    )
    parser.add_argument("--no-ft", action="store_true", help="skip FourierFT / WaveFT")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import peft

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d, r = args.d, args.r
    bases_of_adaptation = args.bases
    spectral = args.basis or [*selora.list_bases(), "none"]
    spectral_bases: list[str | None] = [None if b == "none" else b for b in spectral]
    budget = args.budget or 2 * math.floor((1 - args.sparse_ratio) * r * d)

    torch.manual_seed(0)
    with torch.device(device):
        base = nn.Linear(d, d)
        base.requires_grad_(False)
        x = torch.randn(args.tokens, d, requires_grad=True)
        upstream = torch.randn(args.tokens, d)

    contenders: dict[str, Contender] = {}

    def add(c: Contender) -> None:
        contenders[c.name] = c

    peft_name = {"lora": "peft:LoRA", "dora": "peft:DoRA", "hira": "peft:HiRA"}
    for adapter_base in bases_of_adaptation:
        if adapter_base == "hira":
            add(
                peft_contender(
                    base, peft_name[adapter_base], peft.HiraConfig(r=r, target_modules=["layer"])
                )
            )
        else:
            cfg = peft.LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=["layer"], use_dora=adapter_base == "dora"
            )
            add(peft_contender(base, peft_name[adapter_base], cfg))
        for basis in spectral_bases:
            kw = {} if basis is None else {"sparse_ratio": args.sparse_ratio}
            name = f"selora:{adapter_base}/{basis or 'dense'}"
            add(selora_contender(base, name, adapter_base, basis, r, **kw))
    if "peft:LoRA" not in contenders:
        add(peft_contender(base, "peft:LoRA", peft.LoraConfig(r=r, target_modules=["layer"])))

    ft_pairs: list[tuple[str, str]] = []
    if not args.no_ft:
        half = budget // 2
        ft_specs = [
            (
                "fft",
                "peft:FourierFT",
                peft.FourierFTConfig(n_frequency=budget, target_modules=["layer"]),
            ),
            (
                "haar",
                "peft:WaveFT(db1)",
                peft.WaveFTConfig(
                    n_frequency=budget, wavelet_family="db1", target_modules=["layer"]
                ),
            ),
            (
                "db4",
                "peft:WaveFT(db4)",
                peft.WaveFTConfig(
                    n_frequency=budget, wavelet_family="db4", target_modules=["layer"]
                ),
            ),
        ]
        for basis, peft_label, cfg in ft_specs:
            ours = f"selora:lora/{basis}@{budget}"
            add(selora_contender(base, ours, "lora", basis, r, n_coeffs=half))
            add(peft_contender(base, peft_label, cfg))
            ft_pairs.append((ours, peft_label))

    print(
        f"one linear layer {d}x{d}, r={r}, {args.tokens} tokens, float32, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, peft {peft.__version__}; "
        f"forward+backward (x requires grad), median of {args.repeats} interleaved repeats",
        flush=True,
    )
    steps = {name: make_step(c.layer, x, upstream) for name, c in contenders.items()}
    started = time.perf_counter()
    samples = interleaved_samples(steps, args.repeats, args.warmup)
    medians = medians_of(samples)
    print(f"timed {len(steps)} contenders in {time.perf_counter() - started:.0f} s", flush=True)

    peaks: dict[str, int] = {}
    if not args.no_memory:
        for name, step in steps.items():
            peaks[name] = peak_memory(step, device)

    # Merged inference against the plain base layer (each merged layer owns a copy of W0).
    x_inference = x.detach()
    merged_runs: dict[str, Callable[[], None]] = {
        "plain nn.Linear": make_inference(base, x_inference)
    }
    basis_for_merge = "fft" if "fft" in spectral else spectral_bases[0]
    for adapter_base in bases_of_adaptation:
        name = f"selora:{adapter_base}/{basis_for_merge or 'dense'}"
        if name in contenders:
            layer = copy.deepcopy(contenders[name].layer)
            layer.merge()
            merged_runs[f"merged {name}"] = make_inference(layer, x_inference)
    merged_samples = interleaved_samples(merged_runs, args.repeats, args.warmup)
    merged_medians = medians_of(merged_samples)

    rows = report(args, contenders, medians, peaks, ft_pairs, merged_medians, budget)
    if args.json is not None:
        payload = {
            "benchmark": "one adapted linear layer, forward + backward, vs Hugging Face PEFT",
            "d": d,
            "r": r,
            "tokens": args.tokens,
            "repeats": args.repeats,
            "sparse_ratio": args.sparse_ratio,
            "budget": budget,
            "device": str(device),
            "peft": peft.__version__,
            "seconds": medians,
            "samples": samples,
            "peak_bytes": peaks,
            "trainable": {name: c.trainable for name, c in contenders.items()},
            "merged_inference_seconds": merged_medians,
            "merged_inference_samples": merged_samples,
            "rows": rows,
        }
        write_results(args.json, payload)
    return 0


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(
    args: argparse.Namespace,
    contenders: dict[str, Contender],
    medians: dict[str, float],
    peaks: dict[str, int],
    ft_pairs: list[tuple[str, str]],
    merged: dict[str, float],
    budget: int,
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    peft_name = {"lora": "peft:LoRA", "dora": "peft:DoRA", "hira": "peft:HiRA"}
    lora_peak = peaks.get("peft:LoRA")

    print(
        f"\n[1] selora vs PEFT at rank {args.r} (selora sparse_ratio={args.sparse_ratio}); "
        "goal ratio <= 1.05"
    )
    header = f"{'contender':<24}{'trainable':>11}{'ms':>10}{'PEFT ms':>10}{'ratio':>8}  goal"
    if peaks:
        header += f"{'peak MiB':>11}{'/LoRA':>8}  goal"
    print(header)
    print("-" * len(header))
    for name, c in contenders.items():
        if not name.startswith("selora:") or "@" in name:
            continue
        adapter_base = name.split(":")[1].split("/")[0]
        peer = peft_name[adapter_base]
        ratio = medians[name] / medians[peer]
        line = (
            f"{name:<24}{c.trainable:>11,d}{medians[name] * 1e3:>10.1f}"
            f"{medians[peer] * 1e3:>10.1f}{ratio:>8.3f}  {_verdict(ratio <= 1.05):<6}"
        )
        row: dict[str, object] = {"pair": [name, peer], "time_ratio": ratio}
        if peaks and lora_peak:
            mem_ratio = peaks[name] / lora_peak
            goal = _verdict(mem_ratio <= 1.05) if adapter_base == "lora" else "n/a"
            line += f"{peaks[name] / 2**20:>11.1f}{mem_ratio:>8.3f}  {goal}"
            row["peak_ratio_vs_peft_lora"] = mem_ratio
        print(line)
        rows.append(row)
    for peer in sorted({peft_name[b] for b in args.bases}):
        line = f"{peer:<24}{contenders[peer].trainable:>11,d}{medians[peer] * 1e3:>10.1f}"
        if peaks and lora_peak:
            line += " " * 26 + f"{peaks[peer] / 2**20:>11.1f}{peaks[peer] / lora_peak:>8.3f}"
        print(line)

    if ft_pairs:
        print(
            f"\n[2] selora LoRA vs FourierFT / WaveFT at {budget:,d} trainable coefficients; "
            "goal speed-up >= 2"
        )
        header = f"{'selora':<28}{'ms':>10}{'PEFT':>20}{'ms':>10}{'speed-up':>10}  goal"
        if peaks:
            header += f"{'peak MiB':>10}{'PEFT MiB':>10}"
        print(header)
        print("-" * len(header))
        for ours, theirs in ft_pairs:
            speedup = medians[theirs] / medians[ours]
            line = (
                f"{ours:<28}{medians[ours] * 1e3:>10.1f}{theirs:>20}{medians[theirs] * 1e3:>10.1f}"
                f"{speedup:>10.2f}  {_verdict(speedup >= 2):<6}"
            )
            if peaks:
                line += f"{peaks[ours] / 2**20:>10.1f}{peaks[theirs] / 2**20:>10.1f}"
            print(line)
            rows.append({"pair": [ours, theirs], "speedup": speedup})

    plain = merged["plain nn.Linear"]
    print("\n[3] inference after merge (no_grad forward) vs the plain layer; goal ratio ~ 1")
    print(f"{'layer':<32}{'ms':>10}{'ratio':>8}")
    for name, seconds in merged.items():
        print(f"{name:<32}{seconds * 1e3:>10.2f}{seconds / plain:>8.3f}")
        rows.append({"merged": name, "ratio_vs_plain": seconds / plain})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
