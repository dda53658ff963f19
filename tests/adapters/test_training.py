"""Tiny LLaMA, GPT-2 (Conv1D) and BERT train a few steps with every base and the loss falls."""

from __future__ import annotations

import adapters_testkit as kit
import pytest
import torch
from torch import Tensor, nn

import selora
from selora import SpectralAdapter

STEPS = 20

# Relative drop of the loss required after STEPS Adam steps at lr 1e-2. HiRA's
# update is W0 * (B A) with W0 ~ N(0, 0.02^2) (Hugging Face init), and the fft
# basis spreads each coefficient over the whole factor with a 1/(mn) scale, so
# both move the loss ~10x slower at the same learning rate: they must still
# make it fall, by less.
SLOW = {"hira", "fft"}


def _required_drop(base: str, basis: str | None) -> float:
    return 1e-3 if base in SLOW or basis in SLOW else 0.05


def _lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    loss: Tensor = model(ids, labels=ids).loss
    return loss


def _regression_loss(model: nn.Module, ids: Tensor, target: Tensor) -> Tensor:
    hidden = model(ids).last_hidden_state
    return nn.functional.mse_loss(hidden.mean(dim=1), target)


MODELS = {
    "llama": (kit.tiny_llama, "all-linear"),
    "gpt2": (kit.tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),
    "bert": (kit.tiny_bert, ["query", "value", "intermediate.dense"]),
}


def _train(kind: str, base: str, basis: str | None) -> tuple[float, float, nn.Module]:
    factory, targets = MODELS[kind]
    torch.manual_seed(0)
    model = factory()
    selora.inject(
        model, SpectralAdapter(basis=basis, base=base, r=4, alpha=8, target_modules=targets)
    )
    ids = kit.token_batch(batch=4, length=12)
    target = torch.randn(4, kit.TINY["hidden"], generator=torch.Generator().manual_seed(1))

    def loss_fn() -> Tensor:
        return _regression_loss(model, ids, target) if kind == "bert" else _lm_loss(model, ids)

    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(params, lr=1e-2)
    first = last = float("nan")
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_fn()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()
    with torch.no_grad():
        last = loss_fn().item()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
    return first, last, model


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_loss_falls_with_a_wavelet_basis(kind: str, base: str) -> None:
    first, last, _ = _train(kind, base, "db4")
    assert last < (1 - _required_drop(base, "db4")) * first, (
        f"{kind}/{base}: loss {first:.4f} -> {last:.4f}"
    )


@pytest.mark.parametrize("basis", ["fft", "dct", "coif", None], ids=str)
def test_loss_falls_with_other_bases(basis: str | None) -> None:
    first, last, model = _train("llama", "lora", basis)
    assert last < (1 - _required_drop("lora", basis)) * first, (
        f"{basis}: loss {first:.4f} -> {last:.4f}"
    )
    # The trained adapter merges into the same model.
    ids = kit.token_batch(batch=4, length=12)
    with torch.no_grad():
        adapted = model(ids).logits
        selora.unload(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
