"""Time forward + backward of every spectral basis through a SparseSpectrum.

For each shape, every basis builds a float32 ``SparseSpectrum`` (sparse ratio
0.6 by default) and one step is ``spectrum().backward(upstream)``: scatter,
inverse transform, and the adjoint back to the ``k`` coefficients. Bases are
interleaved within each repeat (in a rotating order, so none always runs
first), and the median over repeats is reported, with ratios to ``fft``.

A basis is a name (``db4``, ``db4-l2``, ``db2-boundary``, any PyWavelets
name) or a name with constructor options, ``NAME:KEY=VALUE[,KEY=VALUE]``
(``coif1:boundary=orthogonal,levels=2``). A shape a basis refuses is skipped
(shown as ``-``). Building each spectrum (locations, scale constant) and its
first step, which builds the basis' constants (wavelet plans; ptwt's
boundary-filter matrices, once per length), are timed apart: ``first ms``.

For comparison, ptwt's route for one wavelet is timed the same way: circular
padding of the four quadrants, ``ptwt.waverec2``, centre crop (which gives the
periodized transform exactly, see tests/spectral_bases/test_basis_oracles.py).
It runs in a second interleaved pass, against ``fft`` alone: its large
allocations otherwise slow down whichever basis follows it in the rotation
(by about 20 % at 8x384). Its ratio is to that pass' ``fft``.

Run from the repository root::

    python benchmarks/bases.py
    python benchmarks/bases.py --shapes 32x4096 4096x32 --repeats 30 --json bases.json
    python benchmarks/bases.py --quick --bases db2 db2-boundary db4 db4-l2 coif1:boundary=orthogonal
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pywt
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import interleaved_samples, medians_of, write_results

from selora.spectral_bases import InverseTransform, SparseSpectrum, get_basis, list_bases

Step = Callable[[], None]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape must look like 32x4096; got {text!r}") from exc
    return m, n


def parse_basis(text: str) -> tuple[str, InverseTransform]:
    """``NAME`` or ``NAME:KEY=VALUE[,KEY=VALUE]`` (values read as JSON, else as strings)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"basis options look like key=value; got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return text, get_basis(name, **options)


def accepts(basis: InverseTransform, m: int, n: int) -> bool:
    try:
        basis.check_shape(m, n)
    except ValueError:
        return False
    return True


def ptwt_periodized(spectrum: Tensor, wavelet: str) -> Tensor:
    """Periodized one-level inverse DWT through ptwt (pad circularly, waverec2, crop)."""
    import ptwt

    m, n = spectrum.shape[-2:]
    hm, hn = m // 2, n // 2
    taps = pywt.Wavelet(wavelet).dec_len
    pad = -(-taps // 4)
    crop = 2 * pad - taps // 2 + 1

    def wrap(band: Tensor) -> Tensor:
        rows = torch.arange(-pad, band.shape[-2] + pad) % band.shape[-2]
        cols = torch.arange(-pad, band.shape[-1] + pad) % band.shape[-1]
        return band[..., rows, :][..., cols]

    a, h = spectrum[..., :hm, :hn], spectrum[..., :hm, hn:]
    v, d = spectrum[..., hm:, :hn], spectrum[..., hm:, hn:]
    out: Tensor = ptwt.waverec2((wrap(a), (wrap(h), wrap(v), wrap(d))), pywt.Wavelet(wavelet))
    return out[..., crop : crop + m, crop : crop + n]


def make_step(spectrum: SparseSpectrum, upstream: Tensor, route: str | None = None) -> Step:
    def step() -> None:
        spectrum.coefficients.grad = None
        out = spectrum() if route is None else ptwt_periodized(spectrum.dense_spectrum(), route)
        out.backward(upstream)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[(32, 4096), (4096, 32)],
        help="spectrum shapes as MxN (default: 32x4096 4096x32)",
    )
    parser.add_argument("--repeats", type=int, default=21, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--number", type=int, default=5, help="steps per timed sample")
    parser.add_argument(
        "--bases", nargs="+", default=None, help="basis names (default: list_bases())"
    )
    parser.add_argument("--sparse-ratio", type=float, default=0.6)
    parser.add_argument(
        "--ptwt",
        default="db4",
        metavar="WAVELET",
        help="also time ptwt's waverec2 route for this wavelet ('' to skip)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: shapes 16x512 512x16, 7 repeats of 3 steps, 1 warmup",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.number, args.warmup = [(16, 512), (512, 16)], 7, 3, 1

    torch.set_num_threads(args.threads)
    names = args.bases or list_bases()
    if "fft" not in names:
        names = ["fft", *names]
    bases = dict(parse_basis(text) for text in names)
    torch.manual_seed(0)

    results: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}
    first: dict[str, dict[str, float]] = {}
    labels: list[str] = list(bases)
    for m, n in args.shapes:
        steps: dict[str, Step] = {}
        first_steps: dict[str, float] = {}
        upstream = torch.randn(m, n)
        for label, basis in bases.items():
            if not accepts(basis, m, n):
                continue
            start = time.perf_counter()
            spectrum = SparseSpectrum((m, n), basis, sparse_ratio=args.sparse_ratio)
            steps[label] = make_step(spectrum, upstream)
            steps[label]()
            first_steps[label] = time.perf_counter() - start
        medians = medians_of(interleaved_samples(steps, args.repeats, args.warmup, args.number))
        ratio = {label: value / medians["fft"] for label, value in medians.items()}
        if args.ptwt:
            label = f"ptwt:{args.ptwt}"
            spectrum = SparseSpectrum((m, n), args.ptwt, sparse_ratio=args.sparse_ratio)
            pair = {"fft": steps["fft"], label: make_step(spectrum, upstream, route=args.ptwt)}
            alone = medians_of(interleaved_samples(pair, args.repeats, args.warmup, args.number))
            medians[label] = alone[label]
            ratio[label] = alone[label] / alone["fft"]
            if label not in labels:
                labels.append(label)
        results[f"{m}x{n}"] = medians
        ratios[f"{m}x{n}"] = ratio
        first[f"{m}x{n}"] = first_steps

    shape_keys = list(results)
    width = max(12, *(len(label) + 2 for label in labels))
    header = f"{'basis':<{width}}" + "".join(
        f"{k + ' ms':>14}{'/fft':>8}{'first ms':>10}" for k in shape_keys
    )
    print(
        f"forward+backward of SparseSpectrum (float32, sparse_ratio={args.sparse_ratio}), "
        f"median of {args.repeats} x {args.number} steps, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(header)
    print("-" * len(header))
    for label in labels:
        row = f"{label:<{width}}"
        for key in shape_keys:
            if label not in results[key]:
                row += f"{'-':>14}{'-':>8}{'-':>10}"
                continue
            seconds = results[key][label]
            cold = first[key].get(label)
            cold_text = f"{cold * 1e3:>10.1f}" if cold is not None else f"{'':>10}"
            row += f"{seconds * 1e3:>14.3f}{ratios[key][label]:>8.2f}{cold_text}"
        print(row)

    if args.json is not None:
        payload = {
            "benchmark": "spectral bases, forward+backward through SparseSpectrum",
            "sparse_ratio": args.sparse_ratio,
            "dtype": "float32",
            "repeats": args.repeats,
            "number": args.number,
            "seconds": results,
            "ratio_to_fft": ratios,
            "first_step_seconds": first,
        }
        write_results(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
