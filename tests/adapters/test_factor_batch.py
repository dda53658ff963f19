"""One batched transform per group of factors: same numbers, same gradients, fewer calls."""

from __future__ import annotations

import adapters_testkit as kit
import pytest
import torch

import selora
from selora.adapters import factor_batch, model_hooks


@pytest.fixture(autouse=True)
def _batch_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default on the CPU (slower there); the mechanism is device-independent."""
    monkeypatch.setattr(factor_batch, "BATCHED_DEVICE_TYPES", {"cpu"})


def _model(basis: str | None, base: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = kit.tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    selora.inject(
        model, selora.SpectralAdapter(basis=basis, base=base, r=4, target_modules=targets)
    )
    kit.perturb(model, scale=0.2)
    return model.train()


def _step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = kit.token_batch()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("basis", ["fft", "dct", "haar", "coif"])
@pytest.mark.parametrize("base", ["lora", "dora", "hira"])
def test_batched_factors_give_the_per_layer_numbers(
    monkeypatch: pytest.MonkeyPatch, basis: str, base: str
) -> None:
    model = _model(basis, base)
    calls: list[int] = []
    form = factor_batch._form

    def spy(spectra: list) -> list:  # type: ignore[type-arg]
        calls.append(len(spectra))
        return form(spectra)

    monkeypatch.setattr(factor_batch, "_form", spy)
    batched, batched_grads = _step(model)
    # q/o (32x32 factors), k/v (16x32) and down: grouped by shape, several per group
    assert calls and max(calls) >= 4, calls
    monkeypatch.setattr(model_hooks, "spectra_to_batch", lambda model: [])
    calls.clear()
    single, single_grads = _step(model)
    assert not calls
    torch.testing.assert_close(batched, single, rtol=1e-6, atol=1e-6)
    assert batched_grads.keys() == single_grads.keys()
    for name, grad in batched_grads.items():
        torch.testing.assert_close(grad, single_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_eval_and_no_grad_calls_do_not_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("fft", "lora")
    calls: list[int] = []
    monkeypatch.setattr(factor_batch, "_form", lambda s: calls.append(len(s)) or [])
    with torch.no_grad():
        model(input_ids=kit.token_batch())
    model.eval()
    model(input_ids=kit.token_batch())
    assert not calls


def test_the_peft_door_batches_too(monkeypatch: pytest.MonkeyPatch) -> None:
    peft = pytest.importorskip("peft")
    from selora.integrations.peft import SeloraConfig

    torch.manual_seed(0)
    config = SeloraConfig(basis="dct", r=4, target_modules=["q_proj", "o_proj"])
    model = peft.get_peft_model(kit.tiny_llama(), config)
    kit.perturb(model, scale=0.2)
    model.train()
    calls: list[int] = []
    form = factor_batch._form
    monkeypatch.setattr(factor_batch, "_form", lambda s: calls.append(len(s)) or form(s))
    batched, grads = _step(model)
    assert calls
    from selora.integrations import peft_model

    monkeypatch.setattr(peft_model, "spectra_to_batch", lambda m: [])
    single, single_grads = _step(model)
    torch.testing.assert_close(batched, single, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, single_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_cpu_is_not_batched_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factor_batch, "BATCHED_DEVICE_TYPES", {"cuda"})
    model = _model("fft", "lora")
    calls: list[int] = []
    monkeypatch.setattr(factor_batch, "_form", lambda s: calls.append(len(s)) or [])
    _step(model)
    assert not calls
