"""X-LoRA's training step against plain LoRA with the same experts summed.

A small random LLaMA (no download) holds K experts as named selora adapters
(fft / lora, haar / dora, dense / hira by default). Two contenders, each one
forward + backward + AdamW step on the same batch:

* ``summed``: the K experts all active (their updates add), as
  ``selora.set_adapter(model, experts)`` gives;
* ``xlora``: the same experts in a :class:`selora.xlora.XLoRAModel` (a no-grad
  scoring pass with the adapters off, the classifier, the mixed pass).

The experts train in both (``--freeze-experts`` trains only X-LoRA's
classifier). The goal (issue 12) is ``xlora / summed <= 2.1``: the step costs
the two passes and no more. Each repeat runs both contenders, starting with
a different one in turn; wall time and process CPU time are reported (medians).

Run from the repository root (not during the tests)::

    python benchmarks/xlora_step.py --threads 1 --repeats 20
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

from timing import interleaved_wall_cpu

import selora
from selora import SpectralAdapter
from selora.xlora import XLoRAConfig, XLoRAModel

EXPERTS = {
    "fourier": SpectralAdapter(basis="fft", r=8, alpha=16.0, seed=0),
    "wave": SpectralAdapter(basis="haar", base="dora", r=8, alpha=16.0, seed=1),
    "dense": SpectralAdapter(basis=None, base="hira", r=8, seed=2),
}


def _llama(hidden: int, layers: int, vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).float().train()


def _step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return run


def measure(
    runs: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median wall and process CPU seconds per call, interleaved."""
    samples = interleaved_wall_cpu(runs, repeats, warmup)
    return {
        n: {"wall_s": statistics.median(s["wall"]), "cpu_s": statistics.median(s["cpu"])}
        for n, s in samples.items()
    }


def main() -> None:
    """Build both contenders, time them, print and optionally save the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--freeze-experts", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = _llama(args.hidden, args.layers, args.vocab)
    for name, adapter in EXPERTS.items():
        selora.inject(base, adapter, name=name)
    with torch.no_grad():  # non-zero experts, as after training
        for _, layer in selora.adapter_layers(base):
            for p in layer.selora_units.parameters():
                p.add_(0.01 * torch.randn_like(p))
    summed = copy.deepcopy(base)
    selora.set_adapter(summed, list(EXPERTS))
    config = XLoRAConfig(experts=list(EXPERTS), freeze_experts=args.freeze_experts)
    mixed = XLoRAModel(copy.deepcopy(base), config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    result = measure(
        {"summed": _step(summed, ids), "xlora": _step(mixed, ids)}, args.repeats, args.warmup
    )
    ratio = {k: result["xlora"][k] / result["summed"][k] for k in ("wall_s", "cpu_s")}
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "medians": result}
    payload["ratio_xlora_over_summed"] = ratio
    payload["goal"] = "ratio <= 2.1"
    print(json.dumps(payload, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
