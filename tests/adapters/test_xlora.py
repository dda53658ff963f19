"""X-LoRA: K spectral LoRA experts per layer, mixed per token by a classifier (issue 4)."""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapters_testkit import TinyMLP, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import Tensor, nn

import selora
from selora import SpectralAdapter, SpectralLayer, inject
from selora.adapters import AdapterUnit, XLoRAClassifier, XLoRALayer, get_xlora_classifier
from selora.adapters.io import CONFIG_NAME, load_adapter, save_adapter
from selora.adapters.xlora_passes import CACHE_KEYWORDS

transformers = pytest.importorskip("transformers")

SPECTRAL: list[str | None] = [*selora.list_bases(), None]
TOKENS = token_batch(2, 7, seed=3)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and lose much on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_model(build: Callable[..., nn.Module] = tiny_llama, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def xlora(
    basis: str | None = "haar", r: int = 4, targets: Any = "all-linear", **options: Any
) -> SpectralAdapter:
    return SpectralAdapter(
        basis=basis,
        base="xlora",
        r=r,
        alpha=2.0 * r,
        target_modules=targets,
        base_options=options,
    )


@torch.no_grad()
def perturb_experts(model: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every expert coefficient away from its init (so that B != 0)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in xlora_layers(model):
        for p in layer.experts.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def xlora_layers(model: nn.Module) -> list[XLoRALayer]:
    return [m for m in model.modules() if isinstance(m, XLoRALayer)]


def outputs(model: nn.Module, tokens: Tensor = TOKENS) -> Tensor:
    with torch.no_grad():
        out = model(input_ids=tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def force_weights(monkeypatch: pytest.MonkeyPatch, model: nn.Module, choice: Tensor) -> None:
    """Make the classifier return ``choice`` (broadcast over batch and sequence)."""
    classifier = get_xlora_classifier(model)

    def fixed(hidden: Tensor) -> Tensor:
        lead = hidden.shape[:-1]
        return choice.expand(*lead, *choice.shape).clone()

    monkeypatch.setattr(classifier, "forward", fixed)


def lora_twin(base: nn.Module, model: nn.Module, expert: int) -> nn.Module:
    """``base`` adapted by expert ``expert`` of each X-LoRA layer of ``model``, as plain lora."""
    layer0 = xlora_layers(model)[0]
    spec = layer0.units()[expert].adapter
    targets = selora.adapters.adapter_config(model).target_modules
    twin = inject(
        base, SpectralAdapter(**{**spec.to_dict(), "basis": spec.basis, "target_modules": targets})
    )
    experts = {layer.name: layer.units()[expert] for layer in xlora_layers(model)}
    for name, layer in selora.adapter_layers(twin):
        layer.adapter.load_state_dict(experts[name].state_dict())
    return twin


def entropy(weights: Tensor) -> float:
    return float(-(weights * weights.clamp_min(1e-30).log()).sum(-1).mean().detach())


# --------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("basis", SPECTRAL)
def test_every_basis_composes_and_one_hot_equals_lora(
    monkeypatch: pytest.MonkeyPatch, basis: str | None
) -> None:
    base = base_model()
    targets = ["q_proj", "v_proj", "down_proj"]
    model = inject(copy.deepcopy(base), xlora(basis, targets=targets, n_experts=2))
    perturb_experts(model)
    out = model(input_ids=TOKENS, labels=TOKENS)
    out.loss.backward()  # gradients flow through the classifier and the experts
    assert get_xlora_classifier(model).net[-1].weight.grad is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    force_weights(monkeypatch, model, torch.tensor([0.0, 1.0]))
    assert torch.equal(outputs(model), outputs(lora_twin(base, model, 1).eval()))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert], ids=["gpt2-conv1d", "bert-encoder"])
def test_one_hot_layerwise_equals_lora_on_other_models(
    monkeypatch: pytest.MonkeyPatch, build: Callable[..., nn.Module]
) -> None:
    base = base_model(build)
    model = inject(copy.deepcopy(base), xlora("fft", n_experts=2, layerwise=True)).eval()
    perturb_experts(model, seed=4)
    n_layers = len(xlora_layers(model))
    force_weights(monkeypatch, model, torch.tensor([[1.0, 0.0]]).repeat(n_layers, 1))
    assert torch.equal(outputs(model), outputs(lora_twin(base, model, 0).eval()))


def test_single_expert_with_weight_one_equals_lora() -> None:
    base = base_model()
    model = inject(copy.deepcopy(base), xlora("dct", n_experts=1)).eval()
    perturb_experts(model, seed=2)
    expected = outputs(lora_twin(base, model, 0).eval())
    assert torch.equal(outputs(model), expected)  # softmax over one expert is exactly 1
    assert torch.equal(get_xlora_classifier(model).last_weights, torch.ones(2, 7, 1))


def test_experts_share_locations_but_not_coefficients() -> None:
    model = inject(base_model(), xlora("fft", n_experts=3))
    layer = xlora_layers(model)[0]
    a0, a1 = layer.units()[0].lora_A, layer.units()[1].lora_A
    assert torch.equal(a0.indices, a1.indices)
    assert not torch.equal(a0.coefficients, a1.coefficients)
    assert not any(isinstance(m, AdapterUnit) and m.adapter.base != "lora" for m in model.modules())


def test_fresh_experts_leave_the_model_unchanged_and_disable_gives_base() -> None:
    base = base_model()
    model = inject(copy.deepcopy(base), xlora("haar", n_experts=2)).eval()
    assert torch.equal(outputs(model), outputs(base.eval()))  # B = 0 at init
    perturb_experts(model)
    assert not torch.equal(outputs(model), outputs(base))
    with selora.disable_adapters(model):
        assert torch.equal(outputs(model), outputs(base))


# --------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize("layerwise", [False, True])
def test_weight_shapes_and_top_k(layerwise: bool) -> None:
    options = {"n_experts": 4, "layerwise": layerwise, "top_k": 2, "renormalize": True}
    model = inject(base_model(), xlora("fft", **options))
    perturb_experts(model)
    model(input_ids=TOKENS)
    n_layers = len(xlora_layers(model))
    assert n_layers == 14  # 7 projections in each of the 2 LLaMA blocks
    weights = get_xlora_classifier(model).last_weights
    assert weights is not None
    assert weights.shape == ((2, 7, n_layers, 4) if layerwise else (2, 7, 4))
    assert torch.equal((weights != 0).sum(-1), torch.full(weights.shape[:-1], 2))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert all(layer.expert_weights is None for layer in xlora_layers(model))  # cleared


def test_top_k_without_renormalize_keeps_softmax_values() -> None:
    classifier = XLoRAClassifier(8, 5, 1, top_k=3)
    logits = torch.randn(4, 6, 5)
    weights = classifier.weights_from_logits(logits)
    full = torch.softmax(logits, -1)
    assert torch.equal((weights != 0).sum(-1), torch.full((4, 6), 3))
    kept = weights != 0
    assert torch.equal(weights[kept], full[kept])
    assert torch.equal(kept, full >= full.topk(3, -1).values[..., -1:])


def test_higher_temperature_gives_flatter_weights() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 32)
    classifier = XLoRAClassifier(32, 4, 3, layerwise=True)
    entropies = []
    for temperature in (0.1, 1.0, 10.0):
        classifier.temperature = temperature
        entropies.append(entropy(classifier(hidden)))
    assert entropies[0] < entropies[1] < entropies[2] <= float(torch.log(torch.tensor(4.0)))


def test_without_softmax_the_raw_scores_are_the_weights() -> None:
    classifier = XLoRAClassifier(8, 3, 1, enable_softmax=False)
    hidden = torch.randn(2, 5, 8)
    assert torch.equal(classifier(hidden), classifier.logits(hidden))


def test_deeper_classifier() -> None:
    model = inject(base_model(), xlora(n_experts=2, classifier_depth=3, classifier_hidden_size=16))
    layers = [m for m in get_xlora_classifier(model).net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(32, 16), (16, 16), (16, 2)]


# --------------------------------------------------------------------------- training


def test_frozen_experts_only_the_classifier_trains() -> None:
    model = inject(base_model(), xlora("haar", n_experts=3, freeze_experts=True))
    perturb_experts(model)
    classifier = get_xlora_classifier(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"selora_xlora_classifier.{n}" for n, _ in classifier.named_parameters()}
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    head = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
    for n, p in model.named_parameters():
        if ".experts." in n:
            assert torch.equal(p, experts[n]), n
    assert any(not torch.equal(p, head[n]) for n, p in classifier.named_parameters())


def test_three_saved_experts_of_different_bases_train_the_classifier(tmp_path: Path) -> None:
    base = base_model()
    paths = []
    for i, basis in enumerate(["fft", "haar", "dct"]):  # three experts, briefly trained
        expert = inject(copy.deepcopy(base), SpectralAdapter(basis=basis, r=4, seed=i))
        with torch.no_grad():
            for _, layer in selora.adapter_layers(expert):
                layer.adapter.lora_B.coefficients.normal_(0.0, 0.3)
        opt = torch.optim.Adam([p for p in expert.parameters() if p.requires_grad], lr=1e-2)
        data = token_batch(4, 8, seed=10 + i)
        for _ in range(3):
            opt.zero_grad()
            expert(input_ids=data, labels=data).loss.backward()
            opt.step()
        save_adapter(expert, tmp_path / basis)
        paths.append(str(tmp_path / basis))

    options = {"experts": paths, "layerwise": True, "temperature": 0.5}
    model = inject(copy.deepcopy(base), xlora("fft", **options))
    assert [u.adapter.basis_label for u in xlora_layers(model)[0].units()] == ["fft", "haar", "dct"]
    recorded = selora.adapters.adapter_config(model).base_options
    assert recorded["experts"] is None and recorded["freeze_experts"] is True
    assert [spec["basis"] for spec in recorded["expert_adapters"]] == ["fft", "haar", "dct"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"selora_xlora_classifier.net.0.{n}" for n in ("weight", "bias")
    }
    for i, path in enumerate(paths):  # each expert holds its saved adapter
        loaded = load_adapter(copy.deepcopy(base), path)
        ours = {layer.name: layer.units()[i] for layer in xlora_layers(model)}
        for name, layer in selora.adapter_layers(loaded):
            for key, value in layer.adapter.state_dict().items():
                assert torch.equal(ours[name].state_dict()[key], value)

    data = token_batch(4, 8, seed=99)
    optimizer = torch.optim.Adam(get_xlora_classifier(model).parameters(), lr=5e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]

    save_adapter(model, tmp_path / "xlora")  # self-contained: the expert files are not needed
    config = json.loads((tmp_path / "xlora" / CONFIG_NAME).read_text())
    assert config["base_options"]["experts"] is None
    for path in paths:
        for file in Path(path).iterdir():
            file.unlink()
    model.eval()
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "xlora").eval()
    assert torch.equal(outputs(fresh, data), outputs(model, data))


# --------------------------------------------------------------------------- model surgery


@pytest.mark.parametrize("layerwise", [False, True])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, layerwise: bool) -> None:
    base = base_model()
    options = {"n_experts": 3, "layerwise": layerwise, "top_k": 2, "classifier_depth": 2}
    model = inject(copy.deepcopy(base), xlora("coif", **options))
    perturb_experts(model)
    with torch.no_grad():
        for p in get_xlora_classifier(model).parameters():
            p.add_(torch.randn_like(p))
    model.eval()
    expected = outputs(model)
    save_adapter(model, tmp_path)
    torch.manual_seed(123)  # a fresh injection would draw other values
    fresh = load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(outputs(fresh), expected)
    assert torch.equal(
        get_xlora_classifier(fresh).last_weights, get_xlora_classifier(model).last_weights
    )


def test_merge_raises_and_unload_gives_back_the_base_model() -> None:
    base = base_model()
    model = inject(copy.deepcopy(base), xlora("db4", n_experts=2))
    perturb_experts(model)
    with pytest.raises(RuntimeError, match=r"cannot be merged: .*each token"):
        selora.merge(model)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        xlora_layers(model)[0].merge()
    assert not any(layer.merged for layer in xlora_layers(model))
    assert selora.unload(model) is model
    assert not any(isinstance(m, (SpectralLayer, XLoRAClassifier)) for m in model.modules())
    assert not hasattr(model, "selora_xlora_classifier") and not hasattr(model, "selora_adapters")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert "selora_unload" not in vars(model)
    assert torch.equal(outputs(model.eval()), outputs(base.eval()))
    inject(model, xlora("fft", n_experts=2))  # can be adapted again


def test_deepcopy_is_an_independent_x_lora_model() -> None:
    base = base_model()
    model = inject(copy.deepcopy(base), xlora("fft", n_experts=2)).eval()
    perturb_experts(model)
    twin = copy.deepcopy(model)
    assert get_xlora_classifier(twin) is not get_xlora_classifier(model)
    assert torch.equal(outputs(twin), outputs(model))
    selora.unload(twin)
    assert torch.equal(outputs(twin), outputs(base.eval()))
    # the original keeps its hooks: X-LoRA's scoring pass and selora's mixed-batch routing
    assert len(model._forward_pre_hooks) == 2 and not torch.equal(outputs(model), outputs(base))


def test_layer_outside_a_model_call_explains() -> None:
    model = inject(base_model(), xlora(n_experts=2))
    layer = xlora_layers(model)[0]
    with pytest.raises(RuntimeError, match="pre-hook"):
        layer(torch.randn(2, 3, layer.in_features))
    with pytest.raises(AttributeError, match="experts"):
        _ = layer.adapter


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    base = base_model()
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        if checkpointing:  # re-runs the layers in backward: the weights must still be there
            enable = getattr(model, "activation_checkpointing_enable", None)
            enable = enable or model.gradient_checkpointing_enable  # transformers < 5.x
            enable({"use_reentrant": False})
        torch.manual_seed(1)
        inject(model, xlora("fft", n_experts=2, layerwise=True)).train()
        perturb_experts(model)
        model(input_ids=TOKENS, labels=TOKENS, use_cache=False).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def sharp_xlora_model() -> nn.Module:
    model = inject(base_model(), xlora("fft", n_experts=3)).eval()
    perturb_experts(model, scale=0.5)
    with torch.no_grad():
        for p in get_xlora_classifier(model).parameters():
            p.mul_(20.0)  # sharp, token-dependent weights
    return model


@pytest.mark.parametrize("left_padding", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam"])
def test_cached_generation_equals_uncached(num_beams: int, left_padding: bool) -> None:
    model = sharp_xlora_model()
    prompt = token_batch(3, 6, seed=8).clamp_min(1)
    mask = torch.ones_like(prompt)
    if left_padding:  # rows of 6, 4 and 2 real tokens
        for row, pad in enumerate((0, 2, 4)):
            prompt[row, :pad] = 0
            mask[row, :pad] = 0
    kwargs = {
        "attention_mask": mask,
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 0,
        "num_beams": num_beams,
    }
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)
    # the check can fail: the experts do change the tokens
    with selora.disable_adapters(model):
        assert not torch.equal(model.generate(prompt, use_cache=False, **kwargs), uncached)


def test_cache_with_foreign_history_is_refused() -> None:
    """A cache filled without X-LoRA's scoring history cannot be continued: an error, no guess."""
    from transformers import DynamicCache

    base = base_model()
    prompt = token_batch(2, 5, seed=8)
    keyword = cache_keyword(base)
    cache = DynamicCache()
    with torch.no_grad():
        base(input_ids=prompt, **{keyword: cache}, use_cache=True)  # the base model's history only
    model = sharp_xlora_model()
    with pytest.raises(TypeError, match="use_cache=False"), torch.no_grad():
        model(input_ids=prompt[:, -1:], **{keyword: cache}, use_cache=True)


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword of this transformers release for the KV cache."""
    params = inspect.signature(model.forward).parameters
    return next(name for name in CACHE_KEYWORDS if name in params)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"n_experts": 0}, "n_experts"),
        ({"n_experts": 2.5}, "n_experts"),
        ({"layerwise": "yes"}, "layerwise"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"n_experts": 3, "top_k": 4}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"renormalize": 1}, "renormalize"),
        ({"enable_softmax": False, "renormalize": True}, "renormalize"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"classifier_depth": 0}, "classifier_depth"),
        ({"classifier_hidden_size": 0}, "classifier_hidden_size"),
        ({"experts": "one/path"}, "experts"),
        ({"experts": ["a", "b"], "n_experts": 3}, "experts"),
        ({"freeze_experts": "no"}, "freeze_experts"),
        ({"expert_adapters": [{"basis": "fft", "rank": 4}]}, "expert_adapters"),
        ({"expert_adapters": [{"basis": "nope"}]}, "expert_adapters"),
        ({"expert_adapters": [{"basis": selora.get_basis("fft")}]}, "expert_adapters"),
        ({"experts": ["a"], "expert_adapters": [{"basis": "fft"}]}, "expert_adapters"),
        ({"n_expert": 2}, "n_expert"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"base_options.*\b{name}\b"):
        xlora(**options)


def test_options_are_filled_and_json_serialisable() -> None:
    adapter = xlora(n_experts=3, top_k=2)
    options = dict(adapter.base_options)
    assert options["layerwise"] is False and options["temperature"] == 1.0
    assert options["freeze_experts"] is False and options["enable_softmax"] is True
    assert SpectralAdapter.from_dict(json.loads(json.dumps(adapter.to_dict()))) == adapter


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), "config.hidden_size"),
        (TinyMLP(), "config.hidden_size"),
    ],
)
def test_non_hugging_face_model_is_refused(model: nn.Module, message: str) -> None:
    adapter = xlora(None, n_experts=2)
    with pytest.raises(TypeError, match=rf"Hugging Face.*{message}"):
        inject(model, SpectralAdapter(**{**adapter.to_dict(), "target_modules": ["0", "2", "fc1"]}))
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert not hasattr(model, "selora_adapters") and not hasattr(model, "selora_xlora_classifier")
    with pytest.raises(TypeError, match="output_hidden_states"):
        inject(
            model,
            SpectralAdapter(
                **{
                    **adapter.to_dict(),
                    "target_modules": ["0", "2", "fc1"],
                    "base_options": {"n_experts": 2, "hidden_size": 8},
                }
            ),
        )


def test_saved_experts_must_fit(tmp_path: Path) -> None:
    base = base_model()
    save_adapter(inject(copy.deepcopy(base), SpectralAdapter(basis="fft", r=4)), tmp_path / "ok")
    save_adapter(inject(copy.deepcopy(base), SpectralAdapter(basis="fft", r=8)), tmp_path / "r8")
    save_adapter(
        inject(copy.deepcopy(base), SpectralAdapter(basis="fft", base="dora", r=4)),
        tmp_path / "dora",
    )
    save_adapter(
        inject(copy.deepcopy(base), SpectralAdapter(basis="fft", r=4, target_modules=["q_proj"])),
        tmp_path / "q",
    )
    ok = str(tmp_path / "ok")
    for other, message in [
        ("r8", "rank r=8"),
        ("dora", "'lora' adapter"),
        ("q", "same modules"),
        ("missing", "cannot read"),
    ]:
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=message):
            inject(model, xlora("fft", experts=[ok, str(tmp_path / other)]))
        assert not any(isinstance(m, SpectralLayer) for m in model.modules())
        assert not hasattr(model, "selora_adapters")
