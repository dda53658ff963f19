"""PEFT users' habits, through both front doors, against PEFT's own LoRA (issue 16).

Each option is given to ``peft.LoraConfig``, to ``SeloraConfig`` (PEFT's door)
and to ``SpectralAdapter`` (``selora.inject``); the three must adapt the same
modules with the same rank and scale per module, and the PEFT checkpoints must
round-trip both ways. Weighted adapters are compared with LoRA's
``add_weighted_adapter`` on identical dense factors, and with the dense float64
sum of the weighted updates.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any

import pytest
import tiny_models as tm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import ModulesToSaveWrapper, get_pattern_key
from torch import nn

import selora
import selora.integrations.peft
from selora.adapters.lora import delta_weight
from selora.adapters.patterns import layer_selected, pattern_key
from selora.integrations.peft import SeloraConfig

PREFIX = "base_model.model."

OPTIONS: list[dict[str, Any]] = [
    {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        "alpha_pattern": {"q_proj": 3.0, "nothing": 1.0},
    },
    {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "rank_pattern": {"q_proj": 2}},
    {
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": [1],
        "layers_pattern": "layers",
    },
    {"target_modules": ["q_proj", "model.layers.0.self_attn.v_proj"], "layers_to_transform": 1},
    {"target_modules": "all-linear", "rank_pattern": {".*_proj": 2}, "use_rslora": True},
]


def _lora_layers(model: nn.Module) -> dict[str, tuple[int, float]]:
    return {
        name.removeprefix(PREFIX): (m.r["default"], m.scaling["default"])
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def _selora_layers(model: nn.Module, adapter: str = "default") -> dict[str, tuple[int, float]]:
    return {
        name.removeprefix(PREFIX): (m.unit(adapter).lora_A.shape[0], m.unit(adapter).scaling)
        for name, m in model.named_modules()
        if isinstance(m, selora.SpectralLayer) and adapter in m.selora_units
    }


@pytest.mark.parametrize("options", OPTIONS)
def test_options_match_peft_lora_module_by_module(options: dict[str, Any]) -> None:
    lora = get_peft_model(tm.tiny_llama(), LoraConfig(r=4, lora_alpha=8, **options))
    want = _lora_layers(lora)
    assert want
    bridge = get_peft_model(tm.tiny_llama(), SeloraConfig(basis="dct", r=4, alpha=8, **options))
    _same(_selora_layers(bridge), want)
    native_options = dict(options)
    if isinstance(native_options["target_modules"], list):
        native_options["target_modules"] = tuple(native_options["target_modules"])
    spec = selora.SpectralAdapter(basis="dct", r=4, alpha=8, **native_options)
    expect_warning = "nothing" in str(options)
    with pytest.warns(RuntimeWarning) if expect_warning else contextlib.nullcontext():
        native = selora.inject(tm.tiny_llama(), spec)
    _same(_selora_layers(native), want)


def _same(got: dict[str, tuple[int, float]], want: dict[str, tuple[int, float]]) -> None:
    assert set(got) == set(want)
    for name, (r, scaling) in want.items():
        assert got[name][0] == r, name
        assert got[name][1] == pytest.approx(scaling, rel=1e-12), name


def test_matching_rules_agree_with_peft() -> None:
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.12.mlp.experts.3.up_proj",
        "h.1.attn.c_attn",
        "q_proj",
        "encoder.layer.0.attention.self.query",
    ]
    keys = ["q_proj", "proj", ".*proj", r"layers\.0\..*", "c_attn", "query", r"^h\.1\.attn\.c_attn"]
    for name in names:
        for key in keys:
            peft_key = get_pattern_key([key], name)
            assert (pattern_key([key], name) == key) == (peft_key == key and _matches(key, name))
        assert (pattern_key(keys, name) or name) == get_pattern_key(keys, name)
    targets = ["q_proj", "up_proj", "c_attn", "query"]
    for layers in ([0], [1, 3], 12):
        for pattern in (None, "layers", ["h", "layer"], "experts"):
            config = LoraConfig(
                target_modules=targets, layers_to_transform=layers, layers_pattern=pattern
            )
            for name in names:
                peft_says = bool(check_target_module_exists(config, name))
                suffix = any(name.endswith("." + t) for t in targets) or name in targets
                ours = suffix and (name in targets or layer_selected(name, _tuple(layers), pattern))
                assert ours == peft_says, (name, layers, pattern)


def _matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _tuple(layers: int | list[int]) -> tuple[int, ...]:
    return (layers,) if isinstance(layers, int) else tuple(layers)


def _bert(kind: str) -> nn.Module:
    from transformers import BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(0)
    config = tm.tt.bert_config(vocab_size=tm.VOCAB, max_position_embeddings=32, num_labels=3)
    cls = BertForSequenceClassification if kind == "SEQ_CLS" else BertForTokenClassification
    return cls(config).eval()


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_all_linear_with_a_task_type_trains_the_head(task: str, tmp_path: Path) -> None:
    # PEFT 0.21's TOKEN_CLS model adds the head to modules_to_save only after injecting, so
    # LoRA's "all-linear" adapts it and then fails; the oracle names the head up front.
    heads = ["classifier", "score"]
    lora_config = LoraConfig(
        r=2, target_modules="all-linear", task_type=task, modules_to_save=heads
    )
    lora = get_peft_model(_bert(task), lora_config)
    want = set(_lora_layers(lora))
    assert isinstance(lora.base_model.model.classifier, ModulesToSaveWrapper)
    bridge = get_peft_model(_bert(task), SeloraConfig(r=2, task_type=task))
    assert set(_selora_layers(bridge)) == want
    assert isinstance(bridge.base_model.model.classifier, ModulesToSaveWrapper)
    native = selora.inject(_bert(task), selora.SpectralAdapter(r=2, task_type=task))
    assert set(_selora_layers(native)) == want
    assert isinstance(native.classifier, nn.Linear)
    assert all(p.requires_grad for p in native.classifier.parameters())
    # The head travels in the checkpoint, both ways.
    tm.perturb(native)
    selora.save_adapter(native, tmp_path / "native")
    ids = tm.inputs()
    loaded = PeftModel.from_pretrained(_bert(task), tmp_path / "native")
    assert loaded.peft_config["default"].task_type == task
    torch.testing.assert_close(tm.logits(loaded, ids), tm.logits(native, ids), rtol=0, atol=0)
    tm.perturb(bridge, seed=1)
    bridge.save_pretrained(tmp_path / "peft")
    back = selora.load_adapter(_bert(task), tmp_path / "peft")
    torch.testing.assert_close(tm.logits(back, ids), tm.logits(bridge, ids), rtol=0, atol=0)


def test_new_fields_round_trip_through_peft(tmp_path: Path) -> None:
    config = SeloraConfig(
        basis="dct",
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3},
        sparse_ratio_pattern={r"layers\.1\.self_attn\.q_proj": 0.8},
        n_coeffs_pattern={"v_proj": 9},
        use_rslora=True,
        layers_to_transform=[0, 1],
        layers_pattern=["layers"],
    )
    model = get_peft_model(tm.tiny_llama(), config)
    tm.perturb(model)
    model.save_pretrained(tmp_path)
    read = SeloraConfig.from_pretrained(str(tmp_path))
    for field in ("rank_pattern", "alpha_pattern", "sparse_ratio_pattern", "n_coeffs_pattern"):
        assert getattr(read, field) == getattr(config, field), field
    assert read.use_rslora and read.layers_to_transform == [0, 1]
    ids = tm.inputs()
    again = PeftModel.from_pretrained(tm.tiny_llama(), tmp_path)
    native = selora.load_adapter(tm.tiny_llama(), tmp_path)
    want = tm.logits(model, ids)
    torch.testing.assert_close(tm.logits(again, ids), want, rtol=0, atol=0)
    torch.testing.assert_close(tm.logits(native, ids), want, rtol=0, atol=0)
    unit = native.model.layers[1].self_attn.v_proj.unit("default")
    assert (unit.lora_A.shape[0], unit.lora_A.n_coeffs) == (2, 9)
    assert unit.scaling == pytest.approx(8 / math.sqrt(2))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5)).double()


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_weighted_adapter_matches_peft_lora(kind: str) -> None:
    weights = [0.7, -1.3]
    lora = get_peft_model(
        _mlp(), LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False)
    )
    lora.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=5, target_modules=["0", "2"], init_lora_weights=False)
    )
    bridge = get_peft_model(
        _mlp(), SeloraConfig(basis=None, r=2, alpha=3, target_modules=["0", "2"])
    )
    bridge.add_adapter("b", SeloraConfig(basis=None, r=2, alpha=5, target_modules=["0", "2"]))
    with torch.no_grad():
        for name in ("0", "2"):
            source = lora.base_model.model.get_submodule(name)
            target = bridge.base_model.model.get_submodule(name)
            for adapter in ("default", "b"):
                unit = target.unit(adapter)
                unit.lora_A.weight.copy_(source.lora_A[adapter].weight)
                unit.lora_B.weight.copy_(source.lora_B[adapter].weight)
    lora.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=kind)
    bridge.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=kind)
    assert bridge.active_adapters == ["default"]
    for name in ("0", "2"):
        want = lora.base_model.model.get_submodule(name).get_delta_weight("mix")
        layer = bridge.base_model.model.get_submodule(name)
        # PEFT's "linear" rounds sqrt(|w s|) to float32 (torch.tensor of floats); "cat" does not.
        tol = {"rtol": 1e-6, "atol": 1e-7} if kind == "linear" else {"rtol": 0, "atol": 1e-13}
        torch.testing.assert_close(delta_weight(layer.unit("mix")), want, **tol)
        if kind == "cat":  # exact: the weighted sum of the updates
            total = sum(
                w * delta_weight(layer.unit(a))
                for w, a in zip(weights, ("default", "b"), strict=True)
            )
            torch.testing.assert_close(want, total, rtol=0, atol=1e-13)


def test_weighted_adapter_through_the_bridge_saves_and_reloads(tmp_path: Path) -> None:
    spec = {"target_modules": ["0", "2"], "init_weights": False, "r": 2}
    bridge = get_peft_model(_mlp(), SeloraConfig(basis="dct", alpha=2, **spec))
    bridge.add_adapter("b", SeloraConfig(basis="fft", seed=3, **spec))
    bridge.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix")
    with pytest.raises(ValueError, match="'ties' is not supported"):
        bridge.add_weighted_adapter(["default", "b"], [1, 1], "bad", combination_type="ties")
    with pytest.raises(ValueError, match="exists already"):
        bridge.add_weighted_adapter(["default", "b"], [1, 1], "mix")
    for name in ("0", "2"):
        layer = bridge.base_model.model.get_submodule(name)
        want = 0.5 * delta_weight(layer.unit("default")) + 2.0 * delta_weight(layer.unit("b"))
        torch.testing.assert_close(delta_weight(layer.unit("mix")), want, rtol=0, atol=1e-13)
    bridge.set_adapter("mix")
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        want_out = bridge(x)
    bridge.save_pretrained(tmp_path, selected_adapters=["mix"])
    native = selora.load_adapter(_mlp(), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(native(x), want_out, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"(": 1.0}}, "alpha_pattern"),
        ({"n_coeffs_pattern": {"q_proj": 2.5}}, "n_coeffs_pattern"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),  # "all-linear" targets
        ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_seloraconfig_validates_the_new_fields(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"\.{field}:"):
        SeloraConfig(**kwargs)


def test_default_targets_with_a_layer_selection_match_lora() -> None:
    options = {"target_modules": None, "layers_to_transform": [1], "layers_pattern": "layers"}
    lora = get_peft_model(tm.tiny_llama(), LoraConfig(r=4, lora_alpha=8, **options))
    bridge = get_peft_model(tm.tiny_llama(), SeloraConfig(r=4, alpha=8, **options))
    want = _lora_layers(lora)
    assert want and all(".layers.1." in name for name in want)
    _same(_selora_layers(bridge), want)
