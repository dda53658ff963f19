"""The LoRA base never forms a d_out x d_in matrix, in forward or backward.

Two independent probes: a ``TorchDispatchMode`` that records the shape of
every op's output (forward and backward), and ``saved_tensors_hooks`` that
record every tensor autograd keeps for the backward pass. Views of the frozen
base weight itself are excluded (they are the base model's, not the adapter's).
HiRA, whose update is dense by nature, shows that the probes do catch it.
"""

from __future__ import annotations

import adapters_testkit as kit
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import selora
from selora import SpectralAdapter

# x has TOKENS * D_IN = 2048 < D_OUT * D_IN entries. The sizes are large enough that a
# matrix basis' own per-axis work (db2-boundary's banded windows, O(r n w) for a band
# width w of a few dozen) stays below one d_out x d_in matrix, as it does at model sizes.
D_IN, D_OUT, R, TOKENS = 256, 240, 4, 8


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self, excluded_storage: int) -> None:
        super().__init__()
        self.excluded = excluded_storage
        self.largest = 0
        self.largest_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if (
                isinstance(leaf, Tensor)
                and leaf.untyped_storage().data_ptr() != self.excluded
                and leaf.numel() > self.largest
            ):
                self.largest, self.largest_op = leaf.numel(), str(func)
        return out


def _layer(base: str, basis: str | None) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT))
    budget = {} if basis is None else {"sparse_ratio": 0.5}
    selora.inject(model, SpectralAdapter(basis=basis, base=base, r=R, alpha=8, **budget))  # type: ignore[arg-type]
    kit.perturb(model, 0.1)
    weight = model[0].base_layer.weight
    return model, weight


def _probe(model: nn.Module, weight: Tensor) -> tuple[int, str, int]:
    x = torch.randn(TOKENS, D_IN, requires_grad=True)
    saved: list[int] = []
    excluded = weight.untyped_storage().data_ptr()

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() != excluded:
            saved.append(t.numel())
        return t

    recorder = _ShapeRecorder(excluded)
    with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    return recorder.largest, recorder.largest_op, max(saved, default=0)


@pytest.mark.parametrize("basis", kit.BASES, ids=str)
def test_lora_never_forms_a_dense_update(basis: str | None) -> None:
    model, weight = _layer("lora", basis)
    largest_op_output, op, largest_saved = _probe(model, weight)
    assert largest_op_output < D_OUT * D_IN, f"{op} produced {largest_op_output} entries"
    assert largest_saved < D_OUT * D_IN


@pytest.mark.parametrize("base", ["hira", "dora"])
def test_probe_detects_dense_updates(base: str) -> None:
    """HiRA and DoRA need W densely (a Hadamard product, a row norm): the probe must see it."""
    model, weight = _layer(base, "fft")
    largest_op_output, _, _ = _probe(model, weight)
    assert largest_op_output >= D_OUT * D_IN
