"""X-LoRA as a model-level wrapper over named spectral adapters (issue 12)."""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from xlora_testkit import (
    EXPERTS,
    base_model,
    outputs,
    perturb,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_batch,
    with_experts,
    xlora_model,
)

import selora
from selora import SpectralAdapter, SpectralLayer
from selora.xlora import XLoRAClassifier, XLoRAConfig, XLoRAModel

pytest.importorskip("transformers")
TOKENS = token_batch(2, 7, seed=3)


def force_weights(monkeypatch: pytest.MonkeyPatch, model: XLoRAModel, choice: Tensor) -> None:
    """Make the classifier return ``choice`` for every token."""

    def fixed(hidden: Tensor) -> Tensor:
        return choice.expand(*hidden.shape[:-1], *choice.shape).clone()

    monkeypatch.setattr(model.classifier, "forward", fixed)


def entropy(weights: Tensor) -> float:
    return float(-(weights * weights.clamp_min(1e-30).log()).sum(-1).mean())


# --------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize(
    "build", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2-conv1d", "bert"]
)
def test_one_hot_weights_equal_the_chosen_expert_alone(
    monkeypatch: pytest.MonkeyPatch, build: Callable[[], nn.Module], layerwise: bool
) -> None:
    model = with_experts(base_model(build)).eval()
    alone = {}
    for name in EXPERTS:
        selora.set_adapter(model, name)
        alone[name] = outputs(model, TOKENS)
    xmodel = XLoRAModel(model, XLoRAConfig(experts=list(EXPERTS), layerwise=layerwise)).eval()
    n_layers = len(xmodel.expert_layers)
    for i, name in enumerate(EXPERTS):
        choice = torch.nn.functional.one_hot(torch.tensor(i), len(EXPERTS)).float()
        force_weights(monkeypatch, xmodel, choice.repeat(n_layers, 1) if layerwise else choice)
        torch.testing.assert_close(outputs(xmodel, TOKENS), alone[name], rtol=0, atol=1e-6)
    assert not all(torch.allclose(alone["fourier"], out) for out in alone.values())


@pytest.mark.parametrize("basis", [*selora.list_bases(), None])
def test_one_expert_equals_that_adapter_for_every_basis(basis: str | None) -> None:
    expert = {"only": SpectralAdapter(basis=basis, r=4, alpha=8.0)}
    model = with_experts(base_model(), expert, seed=2)
    expected = outputs(copy.deepcopy(model).eval(), TOKENS)
    xmodel = XLoRAModel(model, XLoRAConfig(experts=["only"], freeze_experts=False))
    out = xmodel(input_ids=TOKENS, labels=TOKENS)
    out.loss.backward()  # gradients reach the classifier and the expert
    assert xmodel.classifier.net[-1].weight.grad is not None
    assert all(p.grad is not None for p in xmodel.parameters() if p.requires_grad)
    xmodel.eval()
    torch.testing.assert_close(outputs(xmodel, TOKENS), expected, rtol=0, atol=1e-6)
    assert torch.equal(xmodel.expert_weights(input_ids=TOKENS), torch.ones(2, 7, 1))


def test_fresh_experts_leave_the_model_unchanged_and_disable_gives_base() -> None:
    base = base_model()
    model = copy.deepcopy(base)
    for name, adapter in EXPERTS.items():
        selora.inject(model, adapter, name=name)
    xmodel = XLoRAModel(model, XLoRAConfig(experts=list(EXPERTS))).eval()
    torch.testing.assert_close(outputs(xmodel), outputs(base.eval()), rtol=0, atol=1e-6)
    perturb(model)
    assert not torch.allclose(outputs(xmodel), outputs(base))
    with selora.disable_adapters(model):
        assert torch.equal(outputs(xmodel), outputs(base))


# --------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize("layerwise", [False, True])
def test_weight_shapes_and_top_k(layerwise: bool) -> None:
    xmodel = xlora_model(layerwise=layerwise, top_k=2, renormalize=True)
    weights = xmodel.expert_weights(input_ids=TOKENS)
    n_layers = len(xmodel.expert_layers)
    assert n_layers == 14  # 7 projections in each of the 2 LLaMA blocks
    assert weights.shape == ((2, 7, n_layers, 3) if layerwise else (2, 7, 3))
    assert torch.equal((weights != 0).sum(-1), torch.full(weights.shape[:-1], 2))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_top_k_without_renormalize_keeps_softmax_values() -> None:
    classifier = XLoRAClassifier(8, 5, 1, top_k=3)
    logits = torch.randn(4, 6, 5)
    weights = classifier.weights_from_logits(logits)
    full = torch.softmax(logits, -1)
    kept = weights != 0
    assert torch.equal(kept.sum(-1), torch.full((4, 6), 3))
    assert torch.equal(weights[kept], full[kept])


def test_higher_temperature_gives_flatter_weights() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 32)
    classifier = XLoRAClassifier(32, 4, 3, layerwise=True)
    entropies = []
    for temperature in (0.1, 1.0, 10.0):
        classifier.temperature = temperature
        entropies.append(entropy(classifier(hidden).detach()))
    assert entropies[0] < entropies[1] < entropies[2] <= float(torch.log(torch.tensor(4.0)))


def test_without_softmax_the_raw_scores_are_the_weights_and_deeper_classifier() -> None:
    classifier = XLoRAClassifier(8, 3, 1, enable_softmax=False)
    hidden = torch.randn(2, 5, 8)
    assert torch.equal(classifier(hidden), classifier.logits(hidden))
    xmodel = xlora_model(classifier_depth=3, classifier_width=16)
    layers = [m for m in xmodel.classifier.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(32, 16), (16, 16), (16, 3)]


# --------------------------------------------------------------------------- training


def test_frozen_experts_are_bit_identical_after_training() -> None:
    xmodel = xlora_model(freeze_experts=True)
    trainable = {n for n, p in xmodel.named_parameters() if p.requires_grad}
    assert trainable == {
        f"selora_xlora_classifier.{n}" for n, _ in xmodel.classifier.named_parameters()
    }
    experts = {n: t.clone() for n, t in xmodel.state_dict().items() if ".selora_units." in n}
    head = {n: p.detach().clone() for n, p in xmodel.classifier.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in xmodel.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        xmodel(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    after = xmodel.state_dict()
    assert all(torch.equal(after[n], t) for n, t in experts.items())
    assert any(not torch.equal(p, head[n]) for n, p in xmodel.classifier.named_parameters())


def test_classifier_loss_falls_with_three_experts_of_different_bases(tmp_path: Path) -> None:
    base = base_model()
    paths = {}
    for i, (name, adapter) in enumerate(EXPERTS.items()):  # three experts, briefly trained
        expert = perturb(selora.inject(copy.deepcopy(base), adapter, name=name), seed=i)
        opt = torch.optim.Adam([p for p in expert.parameters() if p.requires_grad], lr=1e-2)
        data = token_batch(4, 8, seed=10 + i)
        for _ in range(3):
            opt.zero_grad()
            expert(input_ids=data, labels=data).loss.backward()
            opt.step()
        selora.save_adapter(expert, tmp_path / name, name=name)
        paths[name] = str(tmp_path / name)
    config = XLoRAConfig(experts=paths, layerwise=True, temperature=0.5)
    xmodel = XLoRAModel(copy.deepcopy(base), config)
    assert xmodel.experts == tuple(EXPERTS)
    layer = xmodel.expert_layers[0]
    assert [layer.unit(n).adapter.base for n in EXPERTS] == ["lora", "dora", "hira"]
    data = token_batch(4, 8, seed=99)
    optimizer = torch.optim.Adam(xmodel.classifier.parameters(), lr=5e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = xmodel(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        xmodel = xlora_model(layerwise=True, freeze_experts=False)
        if checkpointing:  # re-runs the blocks in backward, after the call ended
            enable = getattr(xmodel.model, "activation_checkpointing_enable", None)
            (enable or xmodel.model.gradient_checkpointing_enable)({"use_reentrant": False})
        xmodel(input_ids=TOKENS, labels=TOKENS, use_cache=False).loss.backward()
        grads.append([p.grad for p in xmodel.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- concurrency


def test_four_threads_of_fifty_eval_forwards_equal_single_threaded() -> None:
    xmodel = xlora_model(layerwise=True, top_k=2)
    xmodel.eval()
    inputs = [token_batch(1 + t % 2, 5 + t, seed=20 + t) for t in range(4)]
    expected = [outputs(xmodel, tokens) for tokens in inputs]
    wrong: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run(t: int) -> None:
        try:
            barrier.wait()
            for i in range(50):
                if not torch.equal(outputs(xmodel, inputs[t]), expected[t]):
                    wrong.append((t, i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert not wrong, f"{len(wrong)} of 200 forwards differ"


# --------------------------------------------------------------------------- generation


def sharp_model() -> XLoRAModel:
    xmodel = xlora_model().eval()
    perturb(xmodel.model, scale=0.5, seed=5)
    with torch.no_grad():
        for p in xmodel.classifier.parameters():
            p.normal_(0.0, 2.0)  # sharp, token-dependent weights
    return xmodel


@pytest.mark.parametrize("left_padding", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam"])
def test_cached_generation_equals_uncached(num_beams: int, left_padding: bool) -> None:
    xmodel = sharp_model()
    prompt = token_batch(3, 6, seed=8).clamp_min(1)
    mask = torch.ones_like(prompt)
    if left_padding:  # rows of 6, 4 and 2 real tokens
        for row, pad in enumerate((0, 2, 4)):
            prompt[row, :pad] = 0
            mask[row, :pad] = 0
    kwargs: dict[str, Any] = {
        "attention_mask": mask,
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 0,
        "num_beams": num_beams,
    }
    uncached = xmodel.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(xmodel.generate(prompt, use_cache=True, **kwargs), uncached)
    with selora.disable_adapters(xmodel.model):  # the check can fail: the experts matter
        assert not torch.equal(xmodel.generate(prompt, use_cache=False, **kwargs), uncached)


def test_cache_with_foreign_history_is_refused() -> None:
    from transformers import DynamicCache

    from selora.xlora.passes import CACHE_KEYWORDS

    base = base_model()
    prompt = token_batch(2, 5, seed=8)
    params = inspect.signature(base.forward).parameters
    keyword = next(name for name in CACHE_KEYWORDS if name in params)
    cache = DynamicCache()
    with torch.no_grad():
        base(input_ids=prompt, **{keyword: cache}, use_cache=True)  # the base model's history
    with pytest.raises(TypeError, match="use_cache=False"), torch.no_grad():
        sharp_model()(input_ids=prompt[:, -1:], **{keyword: cache}, use_cache=True)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("layerwise", [False, True])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, layerwise: bool) -> None:
    from selora import xlora

    options = {"layerwise": layerwise, "top_k": 2, "classifier_depth": 2}
    xmodel = xlora_model(**options)
    with torch.no_grad():
        for p in xmodel.classifier.parameters():
            p.add_(torch.randn_like(p))
    xmodel.eval()
    expected = outputs(xmodel)
    xmodel.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name in EXPERTS:  # the experts as named units of the shared layer
        assert any(f".selora_units.{name}.lora_A." in k for k in tensors)
    assert any(k.startswith("base_model.model.selora_xlora_classifier.") for k in tensors)
    torch.manual_seed(123)  # a fresh construction would draw other values
    fresh = xlora.load(base_model(), tmp_path).eval()
    assert torch.equal(outputs(fresh), expected)
    assert fresh.xlora_config == xmodel.xlora_config
    for key, value in xmodel.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_bad_checkpoint_changes_nothing(tmp_path: Path) -> None:
    from selora import AdapterCheckpointError, xlora

    xmodel = xlora_model(top_k=2)
    xmodel.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    (tmp_path / "adapter_config.json").write_text(config.replace('"top_k": 2', '"top_k": 1'))
    model = base_model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(AdapterCheckpointError, match="not saved with this X-LoRA config"):
        xlora.load(model, tmp_path)
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert not model._forward_pre_hooks and "selora_adapters" not in vars(model)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


# --------------------------------------------------------------------------- model surgery


def test_merge_refused_unwrap_and_unload_give_back_the_base_model() -> None:
    base = base_model()
    xmodel = XLoRAModel(with_experts(copy.deepcopy(base)), XLoRAConfig(experts=list(EXPERTS)))
    with pytest.raises(RuntimeError, match=r"cannot be merged: .*each token"):
        xmodel.merge()
    model = xmodel.unwrap()
    assert not any(isinstance(m, XLoRAClassifier) for m in model.modules())
    assert len(model._forward_pre_hooks) == 1  # selora's mixed-batch routing, not X-LoRA's
    selora.unload(model, merge_weights=False)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert torch.equal(outputs(model.eval()), outputs(base.eval()))


def test_deepcopy_is_an_independent_x_lora_model() -> None:
    xmodel = xlora_model(layerwise=True).eval()
    twin = copy.deepcopy(xmodel)
    assert twin.classifier is not xmodel.classifier
    assert torch.equal(outputs(twin), outputs(xmodel))
    with torch.no_grad():
        for p in twin.classifier.parameters():
            p.mul_(3.0)
    assert not torch.equal(outputs(twin), outputs(xmodel))


def test_adapter_names_are_refused_and_the_next_call_still_mixes() -> None:
    xmodel = xlora_model().eval()
    expected = outputs(xmodel)
    with pytest.raises(ValueError, match="adapter_names"):
        xmodel(input_ids=TOKENS, adapter_names=["fourier", "wave"])
    assert torch.equal(outputs(xmodel), expected)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"experts": []}, "experts"),
        ({"experts": "a"}, "experts"),
        ({"experts": ["a", "a"]}, "experts"),
        ({"experts": ["a.b"]}, "experts"),
        ({"layerwise": "yes"}, "layerwise"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": 4}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"enable_softmax": False, "renormalize": True}, "renormalize"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"classifier_depth": 0}, "classifier_depth"),
        ({"classifier_width": 0}, "classifier_width"),
        ({"freeze_experts": "no"}, "freeze_experts"),
    ],
)
def test_bad_config_names_the_field(options: dict[str, Any], field: str) -> None:
    values = {"experts": ["a", "b", "c"], **options}
    with pytest.raises(ValueError, match=rf"XLoRAConfig\.{field}\b"):
        XLoRAConfig(**values)


def test_config_round_trips_through_a_dict() -> None:
    config = XLoRAConfig(experts={"a": "x/a", "b": "x/b"}, top_k=1, layerwise=True)
    assert config.names == ("a", "b") and config.checkpoints == {"a": "x/a", "b": "x/b"}
    again = XLoRAConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.checkpoints == {}


def test_missing_expert_and_non_hugging_face_model_are_refused() -> None:
    model = with_experts(base_model())
    with pytest.raises(ValueError, match=r"holds no adapter \['nope'\]"):
        XLoRAModel(model, XLoRAConfig(experts=["fourier", "nope"]))
    assert len(model._forward_pre_hooks) == 1  # selora's mixed-batch routing only
    XLoRAModel(model, XLoRAConfig(experts=["fourier"]))
    with pytest.raises(ValueError, match="wrapped by X-LoRA already"):
        XLoRAModel(model, XLoRAConfig(experts=["wave"]))
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    selora.inject(plain, SpectralAdapter(basis=None, r=2, target_modules=["0"]), name="a")
    with pytest.raises(TypeError, match=r"Hugging Face.*config.hidden_size"):
        XLoRAModel(plain, XLoRAConfig(experts=["a"]))
    with pytest.raises(TypeError, match="output_hidden_states"):
        XLoRAModel(plain, XLoRAConfig(experts=["a"], hidden_size=8))
