"""The PEFT bridge in one process: equality with selora.inject, merge, disable, adapters, counts."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from tiny_models import (
    adapted_pair,
    copy_selora_into_peft,
    inputs,
    logits,
    perturb,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

import selora
from selora.adapters import AdapterUnit
from selora.integrations.peft import PEFT_TYPE, SeloraConfig, SeloraLinear, SeloraModel, register

# PeftModel reads transformers' deprecated is_gradient_checkpointing
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

BUILTIN_BASES = ["fft", "dct", "haar", "db4", "bior", "coif"]
ADAPTATIONS = ["lora", "dora", "hira"]


def test_builtin_bases_registered() -> None:
    assert set(BUILTIN_BASES) <= set(selora.list_bases())
    assert set(ADAPTATIONS) <= set(selora.list_adapter_bases())


def test_registered_with_peft() -> None:
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils.peft_types import PeftType

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] is SeloraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] is SeloraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] == SeloraModel.prefix == "selora_"
    # the key is a plain string, as PEFT reads peft_type back from JSON
    assert PEFT_TYPE not in PeftType.__members__ or PeftType[PEFT_TYPE] == PEFT_TYPE
    register()  # idempotent


@pytest.mark.parametrize("base", ADAPTATIONS)
@pytest.mark.parametrize("basis", [None, *BUILTIN_BASES])
def test_peft_path_equals_inject(basis: str | None, base: str) -> None:
    adapter = selora.SpectralAdapter(basis=basis, base=base, r=4, alpha=8, seed=3)
    injected, peft_model = adapted_pair("llama", adapter)
    ids = inputs()
    expected = logits(injected, ids)
    assert torch.equal(logits(peft_model, ids), expected)
    # the adapter matters: the base model gives something else
    assert not torch.allclose(logits(tiny_llama(), ids), expected, atol=1e-4)
    layers = [m for m in peft_model.modules() if isinstance(m, SeloraLinear)]
    assert len(layers) == len(list(selora.adapter_layers(injected))) == 14


@pytest.mark.parametrize(
    ("kind", "adapter"),
    [
        (
            "bert",
            selora.SpectralAdapter(
                basis="haar",
                base="dora",
                r=4,
                n_coeffs=40,
                target_modules=["query", "value"],
                modules_to_save=["classifier"],
            ),
        ),
        ("gpt2", selora.SpectralAdapter(basis="db4", base="lora", r=4, target_modules=["c_attn"])),
        ("gpt2", selora.SpectralAdapter(basis="dct", base="hira", r=2, target_modules=["c_fc"])),
        (
            "llama",
            selora.SpectralAdapter(basis="fft", base="lora", target_modules=r".*\.(q|v)_proj"),
        ),
    ],
)
def test_peft_path_equals_inject_other_models(kind: str, adapter: selora.SpectralAdapter) -> None:
    injected, peft_model = adapted_pair(kind, adapter)
    ids = inputs()
    assert torch.equal(logits(peft_model, ids), logits(injected, ids))


def test_gradients_equal_inject() -> None:
    adapter = selora.SpectralAdapter(basis="dct", base="dora", r=4, seed=1)
    injected, peft_model = adapted_pair("llama", adapter)
    ids = inputs()
    injected.train()
    peft_model.train()
    injected(input_ids=ids, labels=ids).loss.backward()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in injected.named_parameters() if p.requires_grad}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.")
            assert p.grad is not None
            torch.testing.assert_close(p.grad, grads[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base", ADAPTATIONS)
def test_trainable_count_equals_selora(base: str, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = selora.SpectralAdapter(basis="coif", base=base, r=4, sparse_ratio=0.3)
    injected, peft_model = adapted_pair("llama", adapter)
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    printed = capsys.readouterr().out
    match = re.search(r"trainable params: ([\d,]+)", printed)
    assert match is not None, printed
    count = int(match.group(1).replace(",", ""))
    assert (
        count
        == selora.trainable_parameters(injected)
        == peft_model.get_nb_trainable_parameters()[0]
    )
    assert count > 0


def test_trainable_count_with_modules_to_save() -> None:
    adapter = selora.SpectralAdapter(
        basis="dct", target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    injected, peft_model = adapted_pair("bert", adapter)
    expected = selora.trainable_parameters(injected)
    assert peft_model.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("base", ADAPTATIONS)
def test_merge_and_unload_equals_merged(base: str) -> None:
    adapter = selora.SpectralAdapter(basis="bior", base=base, r=4, seed=2)
    injected, peft_model = adapted_pair("llama", adapter)
    ids = inputs()
    adapted = logits(peft_model, ids)
    selora.merge(injected)
    merged_selora = logits(injected, ids)
    # merge_adapter / unmerge_adapter keep the layers and restore W0
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, ids), adapted, rtol=0, atol=1e-5)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(logits(peft_model, ids), adapted, rtol=0, atol=1e-5)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, SeloraLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    out = logits(merged, ids)
    torch.testing.assert_close(out, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, merged_selora, rtol=0, atol=1e-5)


def test_unload_restores_base() -> None:
    adapter = selora.SpectralAdapter(basis="dct", base="dora", r=4)
    _, peft_model = adapted_pair("llama", adapter)
    ids = inputs()
    restored = peft_model.unload()
    assert torch.equal(logits(restored, ids), logits(tiny_llama(), ids))


@pytest.mark.parametrize("base", ADAPTATIONS)
def test_disable_adapter_gives_base_output(base: str) -> None:
    adapter = selora.SpectralAdapter(basis="dct", base=base, r=4)
    _, peft_model = adapted_pair("llama", adapter)
    ids = inputs()
    adapted = logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, ids), logits(tiny_llama(), ids))
        assert not any(p.requires_grad for p in peft_model.parameters())
    assert torch.equal(logits(peft_model, ids), adapted)


def test_disable_adapter_when_merged() -> None:
    adapter = selora.SpectralAdapter(basis="fft", base="lora", r=4)
    _, peft_model = adapted_pair("llama", adapter)
    ids = inputs()
    peft_model.merge_adapter()
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, ids), logits(tiny_llama(), ids))


def test_two_named_adapters_switch_outputs() -> None:
    first = selora.SpectralAdapter(basis="dct", base="lora", r=4, seed=1)
    second = selora.SpectralAdapter(
        basis="haar", base="dora", r=2, seed=9, target_modules=["v_proj"]
    )
    injected_a = selora.inject(tiny_llama(), first)
    injected_b = selora.inject(tiny_llama(), second)
    perturb(injected_a, seed=10)
    perturb(injected_b, seed=20)
    model = get_peft_model(
        tiny_llama(), SeloraConfig.from_spectral_adapter(first), adapter_name="first"
    )
    model.add_adapter("second", SeloraConfig.from_spectral_adapter(second))
    copy_selora_into_peft(injected_a, model, "first")
    copy_selora_into_peft(injected_b, model, "second")
    ids = inputs()
    out_a, out_b = logits(injected_a, ids), logits(injected_b, ids)
    assert not torch.allclose(out_a, out_b)

    assert model.active_adapter == "first"
    assert torch.equal(logits(model, ids), out_a)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".selora_units.first." in n for n in trainable)

    model.set_adapter("second")
    assert torch.equal(logits(model, ids), out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".selora_units.second." in n for n in trainable)

    model.set_adapter("first")
    assert torch.equal(logits(model, ids), out_a)
    keys = model.state_dict().keys()
    assert any(".selora_units.first.lora_A.coefficients" in k for k in keys)
    assert any(".selora_units.second.magnitude" in k for k in keys)

    model.delete_adapter("second")
    assert not any(".selora_units.second." in k for k in model.state_dict())
    assert torch.equal(logits(model, ids), out_a)


def test_state_dict_keys_and_set_state_dict() -> None:
    adapter = selora.SpectralAdapter(basis="coif", base="dora", r=4, target_modules=["q_proj"])
    _, peft_model = adapted_pair("llama", adapter)
    model_keys = [k for k in peft_model.state_dict() if "selora_units" in k]
    assert model_keys and all(".selora_units.default." in k for k in model_keys)
    assert not any(k.endswith("indices") for k in peft_model.state_dict())  # not persistent

    saved = get_peft_model_state_dict(peft_model)
    extras = {k for k in saved if k.startswith("selora.")}  # location sets and the config hash
    assert "selora.config_sha256" in extras
    assert all(k.startswith("selora.locations.") for k in extras - {"selora.config_sha256"})
    assert sorted(set(saved) - extras) == sorted(
        k.replace(".selora_units.default.", ".selora_units.") for k in model_keys
    )
    assert not any("base_layer" in k or "default" in k for k in saved)

    fresh = get_peft_model(tiny_llama(), SeloraConfig.from_spectral_adapter(adapter))
    result = set_peft_model_state_dict(fresh, saved)
    assert not [k for k in result.missing_keys if "selora_" in k]
    assert not result.unexpected_keys
    ids = inputs()
    assert torch.equal(logits(fresh, ids), logits(peft_model, ids))


def test_load_under_another_name_and_low_cpu_mem(tmp_path: Path) -> None:
    path = tmp_path
    adapter = selora.SpectralAdapter(basis="db4", base="hira", r=4, n_coeffs=30, seed=4)
    _, peft_model = adapted_pair("llama", adapter)
    ids = inputs()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(path))

    loaded = PeftModel.from_pretrained(tiny_llama(), str(path), low_cpu_mem_usage=True)
    assert torch.equal(logits(loaded, ids), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode by default
    trainable = PeftModel.from_pretrained(tiny_llama(), str(path), is_trainable=True)
    count = trainable.get_nb_trainable_parameters()[0]
    assert count == peft_model.get_nb_trainable_parameters()[0] > 0

    other = get_peft_model(
        tiny_llama(), SeloraConfig(basis="fft", r=2, target_modules=["k_proj"]), adapter_name="x"
    )
    other.load_adapter(str(path), adapter_name="y")
    other.set_adapter("y")
    assert torch.equal(logits(other, ids), expected)


def test_layers_are_selora_not_lora() -> None:
    adapter = selora.SpectralAdapter(basis="dct", r=4)
    _, peft_model = adapted_pair("llama", adapter)
    assert not any(isinstance(m, LoraLayer) for m in peft_model.modules())
    layers = [m for m in peft_model.modules() if isinstance(m, SeloraLinear)]
    assert layers
    assert all(isinstance(u, AdapterUnit) for layer in layers for u in layer.selora_units.values())
    assert repr(layers[0]).startswith("selora.SeloraLinear")


def test_config_fields_and_conversion() -> None:
    adapter = selora.SpectralAdapter(
        basis="coif",
        base="dora",
        r=4,
        alpha=16.0,
        n_coeffs=33,
        target_modules=("q_proj", "v_proj"),
        exclude_modules=("model.layers.0.self_attn.q_proj",),
        modules_to_save=("lm_head",),
        dropout=0.1,
        seed=42,
    )
    config = SeloraConfig.from_spectral_adapter(adapter)
    assert config.peft_type == PEFT_TYPE
    assert config.to_spectral_adapter() == adapter
    assert set(config.spectral_fields()) == set(selora.SpectralAdapter.__dataclass_fields__)
    # the default budget is written explicitly
    assert SeloraConfig(basis="dct").sparse_ratio == selora.adapters.DEFAULT_SPARSE_RATIO
    assert SeloraConfig(basis=None).sparse_ratio is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"basis": "nope"}, "basis"),
        ({"base": "nope"}, "base"),
        ({"r": 0}, "r"),
        ({"alpha": -1.0}, "alpha"),
        ({"sparse_ratio": 1.5}, "sparse_ratio"),
        ({"sparse_ratio": 0.5, "n_coeffs": 3}, "n_coeffs"),
        ({"basis": None, "n_coeffs": 3}, "n_coeffs"),
        ({"dropout": 1.0}, "dropout"),
        ({"seed": -1}, "seed"),
        ({"exclude_modules": "q_(.*"}, "exclude_modules"),
    ],
)
def test_config_rejects_bad_fields(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field if field != "basis" else "basis|nope"):
        SeloraConfig(**kwargs)


def test_unsupported_target_raises() -> None:
    with pytest.raises(TypeError, match=r"is a LlamaRMSNorm.*nn\.Linear"):
        get_peft_model(tiny_llama(), SeloraConfig(target_modules=["input_layernorm"]))


def test_budget_too_big_for_layer_raises() -> None:
    with pytest.raises(ValueError, match="n_coeffs"):
        get_peft_model(tiny_llama(), SeloraConfig(n_coeffs=10_000, r=2, target_modules=["q_proj"]))


def test_bert_and_gpt2_build() -> None:
    # smoke: the builders give the layer types the tests rely on
    assert type(tiny_bert().classifier) is nn.Linear
    assert type(tiny_gpt2().transformer.h[0].attn.c_attn).__name__ == "Conv1D"


@pytest.mark.parametrize("base", ADAPTATIONS)
def test_dense_factors_equal_peft_own_method(base: str) -> None:
    """basis=None through the bridge computes what PEFT's own LoRA / DoRA / HiRA compute."""
    from peft import HiraConfig, LoraConfig

    targets = ["q_proj", "v_proj", "down_proj"]
    if base == "hira":
        theirs = get_peft_model(tiny_llama(), HiraConfig(r=4, target_modules=targets))
        names = {"hira_A": "lora_A.weight", "hira_B": "lora_B.weight"}
    else:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=base == "dora")
        theirs = get_peft_model(tiny_llama(), lora)
        names = {
            "lora_A": "lora_A.weight",
            "lora_B": "lora_B.weight",
            "lora_magnitude_vector": "magnitude",
        }
    ours = get_peft_model(
        tiny_llama(), SeloraConfig(basis=None, base=base, r=4, alpha=8, target_modules=targets)
    )
    perturb(theirs, seed=5)
    own = dict(ours.named_parameters())
    with torch.no_grad():
        copied = 0
        for name, p in theirs.named_parameters():
            if not p.requires_grad:
                continue
            layer, attr = next((name.split(f".{a}.", 1)[0], a) for a in names if f".{a}." in name)
            target = own[f"{layer}.selora_units.default.{names[attr]}"]
            target.copy_(p.reshape(target.shape))
            copied += 1
    assert copied == sum(p.requires_grad for p in ours.parameters())
    ids = inputs()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_half_precision_base_keeps_float32_coefficients(
    tmp_path: Path, low_cpu_mem_usage: bool
) -> None:
    adapter = selora.SpectralAdapter(basis="dct", base="dora", r=4, seed=5)
    injected = selora.inject(tiny_llama().to(torch.bfloat16), adapter)
    perturb(injected, seed=1)
    model = get_peft_model(
        tiny_llama().to(torch.bfloat16), SeloraConfig.from_spectral_adapter(adapter)
    )
    copy_selora_into_peft(injected, model, "default")
    ids = inputs()
    expected = logits(injected, ids)
    assert expected.dtype == torch.bfloat16
    assert torch.equal(logits(model, ids), expected)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(
        tiny_llama().to(torch.bfloat16), str(tmp_path), low_cpu_mem_usage=low_cpu_mem_usage
    )
    dtypes = {p.dtype for n, p in loaded.named_parameters() if ".selora_units." in n}
    assert dtypes == {torch.float32}
    assert torch.equal(logits(loaded, ids), expected)


@pytest.mark.parametrize(
    ("targets", "exclude"),
    [
        ("all-linear", r".*layers\.1\..*_proj"),
        ("all-linear", r".*\.(q|k)_proj"),
        (["down_proj", "q_proj", "v_proj"], r"model\.layers\.0\..*"),
        (["q_proj", "v_proj"], ["layers.1.self_attn.v_proj"]),
        (r".*\.(q|v|o)_proj", "q_proj"),  # a regex is a full match: "q_proj" alone excludes nothing
    ],
)
def test_exclude_modules_match_peft_lora(
    targets: str | list[str], exclude: str | list[str]
) -> None:
    """PEFT's LoRA is the oracle for which modules a target/exclude pair selects."""
    from peft import LoraConfig

    with warnings.catch_warnings(record=True) as peft_warned:
        warnings.simplefilter("always")
        lora = get_peft_model(
            tiny_llama(), LoraConfig(r=2, target_modules=targets, exclude_modules=exclude)
        )
    expected = sorted(
        name.removeprefix("base_model.model.")
        for name, m in lora.named_modules()
        if isinstance(m, LoraLayer)
    )
    assert expected  # the oracle selects something, so the comparison means something
    adapter = selora.SpectralAdapter(
        r=2, target_modules=targets if isinstance(targets, str) else tuple(targets),
        exclude_modules=exclude,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as selora_warned:
        warnings.simplefilter("always")
        injected = selora.inject(tiny_llama(), adapter)
    assert sorted(name for name, _ in selora.adapter_layers(injected)) == expected
    # both warn, or neither, when the exclusion matches no module
    excluded_nothing = [
        any("exclude" in str(w.message) for w in log) for log in (peft_warned, selora_warned)
    ]
    assert excluded_nothing[0] == excluded_nothing[1]
    assert excluded_nothing[1] == (exclude == "q_proj")
    config = SeloraConfig.from_spectral_adapter(adapter)
    assert config.exclude_modules == exclude
    assert config.to_spectral_adapter() == adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own warning, checked above
        bridged = get_peft_model(tiny_llama(), config)
    got = sorted(
        name.removeprefix("base_model.model.")
        for name, m in bridged.named_modules()
        if isinstance(m, SeloraLinear)
    )
    assert got == expected
