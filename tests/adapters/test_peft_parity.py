"""Dense (basis=None) LoRA / DoRA / HiRA against Hugging Face PEFT with the same weights.

PEFT's ``LoraConfig`` (``use_dora``) and ``HiraConfig`` are independent
implementations of the same formulas; with A, B (and the DoRA magnitude)
copied over, outputs, gradients and merged weights must agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import adapters_testkit as kit
import pytest
import torch
from torch import Tensor, nn

import selora
from selora import SpectralAdapter

peft = pytest.importorskip("peft")

R, ALPHA = 4, 8.0


def _peft_config(base: str, targets: list[str], conv1d: bool) -> object:
    if base == "hira":
        return peft.HiraConfig(r=R, target_modules=targets, fan_in_fan_out=conv1d)
    return peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=targets,
        use_dora=base == "dora",
        fan_in_fan_out=conv1d,
    )


@torch.no_grad()
def _copy_into_peft(ours: nn.Module, theirs: nn.Module, base: str) -> None:
    inner = theirs.get_base_model()
    copied = 0
    for name, layer in selora.adapter_layers(ours):
        unit = layer.adapter
        peft_layer = inner.get_submodule(name)
        a, b = unit.lora_A(None), unit.lora_B(None)
        if base == "hira":
            peft_layer.hira_A["default"].copy_(a)
            peft_layer.hira_B["default"].copy_(b)
        else:
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
            if base == "dora":
                peft_layer.lora_magnitude_vector["default"].weight.copy_(unit.magnitude)
        copied += 1
    assert copied > 0


def _pair(
    base: str, factory: Callable[[], nn.Module], targets: list[str], conv1d: bool
) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = factory()
    ours = copy.deepcopy(model)
    selora.inject(
        ours, SpectralAdapter(basis=None, base=base, r=R, alpha=ALPHA, target_modules=targets)
    )
    kit.perturb(ours, scale=0.3)
    theirs = peft.get_peft_model(copy.deepcopy(model), _peft_config(base, targets, conv1d))
    _copy_into_peft(ours, theirs, base)
    return ours, theirs


def _grads(model: nn.Module) -> list[Tensor]:
    return [
        p.grad.detach().clone()
        for _, p in sorted(_named_adapter_params(model))
        if p.grad is not None
    ]


def _named_adapter_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


CASES = {
    "mlp": (lambda: kit.TinyMLP(), ["fc1", "fc2"], False),
    "gpt2": (lambda: kit.tiny_gpt2(), ["c_attn", "c_fc"], True),
}


def _run(model: nn.Module, case: str) -> Tensor:
    if case == "mlp":
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
        out: Tensor = model(x)
        return out
    logits: Tensor = model(kit.token_batch()).logits
    return logits


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("base", ["lora", "dora", "hira"])
def test_outputs_gradients_and_merge_match_peft(base: str, case: str) -> None:
    factory, targets, conv1d = CASES[case]
    ours, theirs = _pair(base, factory, targets, conv1d)
    y_ours, y_theirs = _run(ours, case), _run(theirs, case)
    assert not torch.allclose(y_ours, _run(_base_copy(ours), case), atol=1e-4), "adapter is inert"
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-6)

    # Gradients of every adapter parameter, matched by role.
    upstream = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(2))
    (y_ours * upstream).sum().backward()
    (y_theirs * upstream).sum().backward()
    inner = theirs.get_base_model()
    for name, layer in selora.adapter_layers(ours):
        unit, peft_layer = layer.adapter, inner.get_submodule(name)
        if base == "hira":
            pairs = [
                (unit.lora_A.weight, peft_layer.hira_A["default"]),
                (unit.lora_B.weight, peft_layer.hira_B["default"]),
            ]
        else:
            pairs = [
                (unit.lora_A.weight, peft_layer.lora_A["default"].weight),
                (unit.lora_B.weight, peft_layer.lora_B["default"].weight),
            ]
            if base == "dora":
                pairs.append((unit.magnitude, peft_layer.lora_magnitude_vector["default"].weight))
        for mine, peers in pairs:
            assert mine.grad is not None and peers.grad is not None
            torch.testing.assert_close(mine.grad, peers.grad, rtol=1e-5, atol=1e-6)

    # Merged weights.
    with torch.no_grad():
        selora.unload(ours)
        merged_theirs = theirs.merge_and_unload()
        for name, module in merged_theirs.named_modules():
            if name.split(".")[-1] in targets:
                mine = ours.get_submodule(name)
                assert type(mine) is type(module)
                torch.testing.assert_close(mine.weight, module.weight, rtol=1e-6, atol=1e-6)


def _base_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    return selora.unload(clone, merge_weights=False)


@pytest.mark.parametrize("base", ["lora", "dora", "hira"])
def test_trainable_counts_match_peft(base: str) -> None:
    factory, targets, conv1d = CASES["gpt2"]
    ours, theirs = _pair(base, factory, targets, conv1d)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert selora.trainable_parameters(ours) == peft_trainable
    assert sum(p.numel() for p in ours.parameters()) == peft_total
