"""One batched transform per group of factors: same numbers, same gradients, fewer calls."""

from __future__ import annotations

import adapters_testkit as kit
import pytest
import torch

import selora
from selora.adapters import factor_batch, model_hooks


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


def test_a_training_call_on_the_cpu_batches_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("fft", "lora")
    calls: list[int] = []
    form = factor_batch._form
    monkeypatch.setattr(factor_batch, "_form", lambda s: calls.append(len(s)) or form(s))
    _step(model)
    assert calls and max(calls) > 1


@pytest.mark.parametrize("basis", ["fft", "dct", "db4"])
def test_cpu_groups_are_cut_into_chunks_that_fit_the_cache(
    monkeypatch: pytest.MonkeyPatch, basis: str
) -> None:
    model = _model(basis, "lora")
    reference, reference_grads = _step(model)
    spectra = factor_batch.active_spectra(model)
    groups: dict[tuple[object, ...], list[int]] = {}
    for spectrum in spectra:
        groups.setdefault(factor_batch._group_key(spectrum), []).append(
            spectrum.shape[0] * spectrum.shape[1] * 4  # float32 bytes of one matrix
        )
    budget = 2 * max(max(sizes) for sizes in groups.values())
    monkeypatch.setattr(factor_batch, "CPU_CHUNK_BYTES", budget)
    calls: list[int] = []
    form = factor_batch._form
    monkeypatch.setattr(factor_batch, "_form", lambda s: calls.append(len(s)) or form(s))
    chunked, chunked_grads = _step(model)
    # a group of g matrices of b bytes: chunks of budget // b, the last one shorter;
    # chunks of one are left to the layer
    expected = []
    for sizes in groups.values():
        per_chunk = budget // sizes[0]
        expected += [min(per_chunk, len(sizes) - i) for i in range(0, len(sizes), per_chunk)]
    assert sorted(calls) == sorted(c for c in expected if c > 1), (calls, expected)
    assert max(calls) < max(len(sizes) for sizes in groups.values())  # some group was cut
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-6)
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_device_type_left_out_forms_its_factors_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(factor_batch, "BATCHED_DEVICE_TYPES", {"cuda"})
    model = _model("fft", "lora")
    calls: list[int] = []
    monkeypatch.setattr(factor_batch, "_form", lambda s: calls.append(len(s)) or [])
    _step(model)
    assert not calls
