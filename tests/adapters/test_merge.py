"""merge / unmerge / unload / disable_adapters, and copying adapted models."""

from __future__ import annotations

import copy
import io

import adapters_testkit as kit
import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import selora
from selora import SpectralAdapter, SpectralLayer


def _adapted_mlp(base: str, basis: str | None, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = kit.TinyMLP()
    original = copy.deepcopy(model)
    selora.inject(model, SpectralAdapter(basis=basis, base=base, r=4, alpha=8))
    kit.perturb(model, 0.3, seed=seed)
    return model, original


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("basis", kit.BASES, ids=str)
@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_merge_unmerge_round_trip(base: str, basis: str | None) -> None:
    model, original = _adapted_mlp(base, basis)
    adapted = model(X).detach()
    assert not torch.allclose(adapted, original(X), atol=1e-4)
    selora.merge(model)
    assert all(layer.merged for _, layer in selora.adapter_layers(model))
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
    selora.merge(model)  # a second merge is a no-op
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
    selora.unmerge(model)
    for name, layer in selora.adapter_layers(model):
        torch.testing.assert_close(
            layer.base_layer.weight, original.get_submodule(name).weight, rtol=0, atol=1e-6
        )
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("basis", [None, "fft", "db4"], ids=str)
@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_unload_gives_plain_layers_with_merged_weights(base: str, basis: str | None) -> None:
    model, _ = _adapted_mlp(base, basis)
    adapted = model(X).detach()
    expected = {}
    for name, layer in selora.adapter_layers(model):
        w0 = layer.base_layer.weight.detach().double()
        expected[name] = _merged_reference(layer, w0)
    out = selora.unload(model)
    assert out is model
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert not hasattr(model, "selora_adapter")
    for name, weight in expected.items():
        plain = model.get_submodule(name)
        assert type(plain) is nn.Linear
        torch.testing.assert_close(plain.weight.double(), weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)


def _merged_reference(layer: SpectralLayer, w0: Tensor) -> Tensor:
    unit = layer.adapter
    a, b = kit.reference_factor(unit.lora_A), kit.reference_factor(unit.lora_B)
    if unit.adapter.base == "lora":
        return w0 + unit.scaling * b @ a
    if unit.adapter.base == "dora":
        v = w0 + unit.scaling * b @ a
        return unit.magnitude.detach().double()[:, None] * v / v.norm(dim=1, keepdim=True)
    return w0 * (1 + b @ a)


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_unload_without_merge_restores_the_base_model(base: str) -> None:
    model, original = _adapted_mlp(base, "fft")
    selora.unload(model, merge_weights=False)
    assert torch.equal(model(X), original(X))
    for (n1, p1), (n2, p2) in zip(
        model.named_parameters(), original.named_parameters(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_unload_without_merge_after_merge_unmerges(base: str) -> None:
    model, original = _adapted_mlp(base, "haar")
    selora.merge(model)
    selora.unload(model, merge_weights=False)
    torch.testing.assert_close(model(X), original(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_unload_keeps_conv1d_and_merged_inference_matches(base: str) -> None:
    torch.manual_seed(0)
    model = kit.tiny_gpt2()
    selora.inject(model, SpectralAdapter(basis="dct", base=base, r=4, alpha=8))
    kit.perturb(model, 0.2)
    ids = kit.token_batch()
    adapted = model(ids).logits.detach()
    names = [name for name, _ in selora.adapter_layers(model)]
    selora.unload(model)
    assert names and all(type(model.get_submodule(n)) is Conv1D for n in names)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_merged_forward_is_the_plain_layer() -> None:
    model, _ = _adapted_mlp("lora", "fft")
    selora.merge(model)
    layer = model.fc1
    assert isinstance(layer, SpectralLayer)
    assert torch.equal(layer(X), layer.base_layer(X))


def test_hira_unmerge_refuses_a_zero_factor() -> None:
    model, _ = _adapted_mlp("hira", None)
    layer = model.fc1
    with torch.no_grad():
        layer.adapter.lora_A.weight.zero_()
        layer.adapter.lora_B.weight.zero_()
        layer.adapter.lora_A.weight[0, 0] = 1.0
        layer.adapter.lora_B.weight[0, 0] = -1.0  # 1 + (B A)[0, 0] == 0
    with pytest.raises(ValueError, match="could not be undone"):
        selora.merge(model, safe=True)
    assert not layer.merged
    selora.merge(model)  # unmerge undoes the update merged, so it must be the bad one
    with pytest.raises(RuntimeError, match=r"cannot unmerge.*1 \+ B A has a zero entry"):
        layer.unmerge()


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_disable_adapters_runs_the_base_model(base: str) -> None:
    model, original = _adapted_mlp(base, "fft")
    adapted = model(X).detach()
    with selora.disable_adapters(model) as same:
        assert same is model
        assert torch.equal(model(X), original(X))
    assert torch.equal(model(X), adapted)


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_adapted_models_can_be_deep_copied_and_saved(base: str) -> None:
    model, _ = _adapted_mlp(base, "coif")
    expected = model(X)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(X), expected, rtol=0, atol=0)
    assert selora.adapters.adapter_config(clone) == selora.adapters.adapter_config(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(X), expected, rtol=0, atol=0)


def test_state_dict_round_trip_into_a_fresh_adapted_model() -> None:
    model, _ = _adapted_mlp("dora", "fft", seed=0)
    fresh, _ = _adapted_mlp("dora", "fft", seed=1)
    assert not torch.allclose(fresh(X), model(X))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(X), model(X), rtol=0, atol=0)


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_disable_adapters_on_a_merged_model_runs_the_base_model(base: str) -> None:
    model, original = _adapted_mlp(base, "dct")
    adapted = model(X).detach()
    selora.merge(model)
    with selora.disable_adapters(model):
        torch.testing.assert_close(model(X), original(X), rtol=1e-5, atol=1e-6)
    assert all(layer.merged for _, layer in selora.adapter_layers(model))
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
