"""inject: target matching, freezing, errors, and a user-registered base of adaptation."""

from __future__ import annotations

import re

import adapters_testkit as kit
import pytest
import torch
from torch import Tensor, nn

import selora
from selora import AdaptationBase, SpectralAdapter, SpectralLayer
from selora.adapters.layer import AdapterUnit
from selora.adapters.lora import delta_weight, low_rank_update


def _wrapped(model: nn.Module) -> list[str]:
    return [name for name, _ in selora.adapter_layers(model)]


def _check_frozen(model: nn.Module, saved: tuple[str, ...] = ()) -> None:
    """Only adapter parameters and those of modules_to_save train; all else is frozen."""
    for name, p in model.named_parameters():
        in_adapter = ".selora_units." in f".{name}"
        in_saved = any(f".{s}." in f".{name}" for s in saved)
        assert p.requires_grad == (in_adapter or in_saved), name


def test_exact_names() -> None:
    model = selora.inject(kit.TinyMLP(), SpectralAdapter(target_modules=["fc1", "head"]))
    assert _wrapped(model) == ["fc1", "head"]
    _check_frozen(model)


def test_dotted_suffixes_match_every_layer() -> None:
    model = selora.inject(
        kit.tiny_llama(), SpectralAdapter(target_modules=["q_proj", "self_attn.v_proj"])
    )
    names = _wrapped(model)
    assert names == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    _check_frozen(model)


def test_suffix_matches_whole_components_only() -> None:
    with pytest.raises(ValueError, match="matches no module") as info:
        selora.inject(kit.tiny_llama(), SpectralAdapter(target_modules=["proj"]))
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message and "lm_head" in message


def test_regex_string_is_a_full_match() -> None:
    model = selora.inject(kit.tiny_llama(), SpectralAdapter(target_modules=r".*\.(k|o)_proj"))
    assert _wrapped(model) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "o_proj")
    ]
    with pytest.raises(ValueError, match="matches no module"):
        selora.inject(kit.tiny_llama(), SpectralAdapter(target_modules="q_proj"))


@pytest.mark.parametrize(
    ("factory", "count", "head"),
    [(kit.tiny_llama, 14, "lm_head"), (kit.tiny_gpt2, 8, "lm_head"), (kit.tiny_bert, 13, None)],
    ids=["llama", "gpt2", "bert"],
)
def test_all_linear_skips_the_output_embedding(factory, count: int, head: str | None) -> None:  # type: ignore[no-untyped-def]
    model = selora.inject(factory(), SpectralAdapter(basis="fft", target_modules="all-linear"))
    names = _wrapped(model)
    assert len(names) == count
    if head is not None:
        assert head not in names
        assert not isinstance(model.get_submodule(head), SpectralLayer)
    _check_frozen(model)


def test_exclude_modules() -> None:
    model = selora.inject(
        kit.tiny_llama(),
        SpectralAdapter(
            target_modules="all-linear", exclude_modules=["down_proj", "layers.1.self_attn.q_proj"]
        ),
    )
    names = _wrapped(model)
    assert len(names) == 14 - 2 - 1
    assert not any(n.endswith("down_proj") for n in names)
    assert "model.layers.1.self_attn.q_proj" not in names
    assert "model.layers.0.self_attn.q_proj" in names


@pytest.mark.filterwarnings("error")  # an exclusion that matches must not warn
def test_regex_exclude_is_a_full_match() -> None:
    model = selora.inject(
        kit.tiny_llama(), SpectralAdapter(target_modules="all-linear", exclude_modules=r".*\.1\..*")
    )
    names = _wrapped(model)
    assert len(names) == 7 and all(".layers.0." in n for n in names)


def test_exclusion_that_matches_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="exclude_modules=.*matches no module"):
        model = selora.inject(kit.TinyMLP(), SpectralAdapter(exclude_modules=["fc3"]))
    assert _wrapped(model) == ["fc1", "fc2", "head"]


def test_modules_to_save_become_trainable() -> None:
    model = kit.tiny_llama()
    selora.inject(
        model, SpectralAdapter(target_modules=["q_proj"], modules_to_save=["lm_head", "norm"])
    )
    _check_frozen(model, saved=("lm_head", "norm"))
    assert model.lm_head.weight.requires_grad
    assert model.model.norm.weight.requires_grad
    expected = (
        sum(p.numel() for n, p in model.named_parameters() if ".selora_units." in n)
        + model.lm_head.weight.numel()
        + model.model.norm.weight.numel()
    )
    assert selora.trainable_parameters(model) == expected


def test_modules_to_save_that_match_nothing_raise() -> None:
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier'"):
        selora.inject(kit.TinyMLP(), SpectralAdapter(modules_to_save=["classifier"]))


def test_targets_that_match_nothing_list_the_layers_seen() -> None:
    with pytest.raises(ValueError) as info:
        selora.inject(kit.TinyMLP(), SpectralAdapter(target_modules=["attention"]))
    message = str(info.value)
    for name in ("fc1", "fc2", "head"):
        assert name in message
    assert "TinyMLP" in message


def test_unsupported_module_type_raises_naming_it() -> None:
    model = kit.TinyMLP()
    with pytest.raises(TypeError, match=r"'act' is a Tanh"):
        selora.inject(model, SpectralAdapter(target_modules=r"act|fc1"))
    assert not _wrapped(model)
    assert all(p.requires_grad for p in model.parameters())


def test_injecting_a_taken_name_raises_and_unload_allows_again() -> None:
    model = selora.inject(kit.TinyMLP(), SpectralAdapter())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        selora.inject(model, SpectralAdapter(base="dora"))
    assert model.state_dict().keys() == before.keys()
    selora.unload(model)
    selora.inject(model, SpectralAdapter(base="dora"))
    assert len(_wrapped(model)) == 3


def test_inject_returns_the_same_model_and_remembers_the_adapter() -> None:
    model = kit.TinyMLP()
    adapter = SpectralAdapter(basis="db4", base="hira", r=4)
    assert selora.inject(model, adapter) is model
    assert selora.adapters.adapter_config(model) is adapter
    layer = model.fc2
    assert isinstance(layer, SpectralLayer)
    assert layer.weight is layer.base_layer.weight
    assert (layer.in_features, layer.out_features) == (16, 16)


def test_parameter_summary_matches_peft_convention(capsys: pytest.CaptureFixture[str]) -> None:
    model = selora.inject(kit.TinyMLP(), SpectralAdapter(basis=None, r=2, target_modules=["fc1"]))
    trainable = 2 * 8 + 16 * 2
    total = sum(p.numel() for p in model.parameters())
    selora.print_trainable_parameters(model)
    out = capsys.readouterr().out.strip()
    assert out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


# ------------------------------------------------------------ a user-registered base


class ScaledLoRA(AdaptationBase):
    """W0 + gain * (alpha/r) B A, gain from base_options (default 2)."""

    @classmethod
    def validate_options(cls, options: dict[str, object]) -> None:
        unknown = set(options) - {"gain"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}")
        gain = options.setdefault("gain", 2.0)
        if not isinstance(gain, (int, float)) or gain <= 0:
            raise ValueError(f"gain must be positive; got {gain!r}")

    def _gain(self, unit: AdapterUnit) -> float:
        return float(unit.adapter.base_options["gain"])

    def forward(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        a, b = unit.factors(x.dtype)
        return base_out + self._gain(unit) * low_rank_update(unit, x, a, b)

    def update(self, unit: AdapterUnit, weight0: Tensor | None) -> tuple[None, Tensor]:
        return None, self._gain(unit) * delta_weight(unit)


def test_user_registered_base_works_like_a_builtin(registered_base_cleanup: list[str]) -> None:
    selora.register_base("scaled_lora")(ScaledLoRA)
    registered_base_cleanup.append("scaled_lora")
    assert "scaled_lora" in selora.list_adapter_bases()
    assert selora.get_adapter_base("scaled_lora") is ScaledLoRA
    with pytest.raises(ValueError, match=r"SpectralAdapter\.base_options: gain must be positive"):
        SpectralAdapter(base="scaled_lora", base_options={"gain": -1.0})
    adapter = SpectralAdapter(
        basis="haar", base="scaled_lora", r=4, alpha=8, base_options={"gain": 3.0}
    )
    assert dict(adapter.base_options) == {"gain": 3.0}

    torch.manual_seed(0)
    model = kit.TinyMLP()
    x = torch.randn(5, 8)
    before = model(x)
    selora.inject(model, adapter)
    assert torch.equal(model(x), before)
    kit.perturb(model, 0.3)
    layer = model.fc1
    assert isinstance(layer, SpectralLayer) and isinstance(layer.adapter.base, ScaledLoRA)
    a = kit.reference_factor(layer.adapter.lora_A)
    b = kit.reference_factor(layer.adapter.lora_B)
    w0 = layer.base_layer.weight.detach().double()
    expected = x.double() @ (w0 + 3.0 * 2.0 * b @ a).t() + layer.base_layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)

    adapted = model(x).detach()
    selora.merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    selora.unload(model)
    assert type(model.fc1) is nn.Linear
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


def test_registry_refuses_duplicates_and_non_bases(registered_base_cleanup: list[str]) -> None:
    with pytest.raises(ValueError, match="already registered"):
        selora.register_base("lora")(ScaledLoRA)
    with pytest.raises(TypeError, match="AdaptationBase subclasses"):
        selora.register_base("not_a_base")(nn.Linear)  # type: ignore[type-var]
    with pytest.raises(KeyError, match=re.escape("'nope'")):
        selora.unregister_base("nope")
    with pytest.raises(selora.UnknownAdapterBaseError, match="Did you mean 'dora'"):
        selora.get_adapter_base("doora")
    assert "not_a_base" not in selora.list_adapter_bases()


def test_inject_follows_the_models_eval_mode() -> None:
    import torch
    from torch import nn

    from selora import SpectralAdapter, SpectralLayer, inject

    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).eval()
    inject(net, SpectralAdapter(basis="fft", r=2, dropout=0.5, target_modules=("0", "1")))
    layers = [m for m in net.modules() if isinstance(m, SpectralLayer)]
    assert layers and all(not m.training for m in net.modules())
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        x = torch.randn(16, 8)
        assert torch.equal(net(x), net(x))  # no dropout in eval mode


def test_eval_cache_follows_replaced_locations() -> None:
    import torch
    from torch import nn

    from selora import SpectralAdapter, SpectralLayer, inject

    net = nn.Sequential(nn.Linear(8, 8))
    inject(net, SpectralAdapter(basis="dct", r=2, n_coeffs=6, target_modules=("0",)))
    layer = next(m for m in net.modules() if isinstance(m, SpectralLayer))
    with torch.no_grad():
        layer.adapter.lora_B.coefficients.add_(1.0)
    net.eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = net(x)
        spectrum = layer.adapter.lora_A
        spectrum.indices = torch.flip(spectrum.indices, dims=(0,)).clone()
        after = net(x)
    assert not torch.equal(before, after)
