"""PEFT's per-module habits through selora.inject: patterns, layer selection, rsLoRA, task heads.

The oracles: hand-computed ranks / scales / budgets per module (PEFT's matching
rules are compared with PEFT's own code in tests/integrations/test_peft_habits.py),
a dense float64 forward for the rank-stabilised scale, and a save / load round
trip that must reproduce every field and every output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import adapters_testkit as kit
import pytest
import torch
from torch import nn

import selora
from selora.adapters.checkpoint_format import (
    SPECTRAL_FIELDS,
    AdapterCheckpointError,
    config_digest,
    spectral_config,
)
from selora.adapters.patterns import layer_selected, pattern_key, resolve_for_module

Q = "model.layers.{}.self_attn.q_proj"
V = "model.layers.{}.self_attn.v_proj"


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return kit.tiny_llama()


def _units(model: nn.Module) -> dict[str, selora.adapters.AdapterUnit]:
    return {name: layer.unit("default") for name, layer in selora.adapter_layers(model)}


def test_rank_alpha_and_budget_patterns_per_module() -> None:
    model = kit.tiny_llama()
    adapter = selora.SpectralAdapter(
        basis="dct",
        r=4,
        alpha=8.0,
        target_modules=("q_proj", "v_proj"),
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 6},
        alpha_pattern={"q_proj": 3.0},
        n_coeffs_pattern={r"layers\.0\.self_attn\.v_proj": 20},
        sparse_ratio_pattern={r"model\.layers\.1\.self_attn\.v_proj": 0.9},
    )
    units = _units(selora.inject(model, adapter))
    d, kv = 32, 16  # hidden, key/value width (2 of 4 heads)
    expect = {  # name: (r, scaling, k of A, k of B)
        Q.format(0): (4, 3.0 / 4, int(0.4 * 4 * d), int(0.4 * d * 4)),
        Q.format(1): (2, 3.0 / 2, int(0.4 * 2 * d), int(0.4 * d * 2)),
        V.format(0): (6, 8.0 / 6, 20, 20),
        V.format(1): (6, 8.0 / 6, math.floor(0.1 * 6 * d), math.floor(0.1 * kv * 6)),
    }
    assert set(units) == set(expect)
    for name, (r, scaling, k_a, k_b) in expect.items():
        unit = units[name]
        assert unit.lora_A.shape[0] == r and unit.lora_B.shape[1] == r, name
        assert unit.scaling == pytest.approx(scaling), name
        assert (unit.lora_A.n_coeffs, unit.lora_B.n_coeffs) == (k_a, k_b), name
        assert not unit.adapter.rank_pattern and not unit.adapter.n_coeffs_pattern
    assert selora.adapter_config(model).rank_pattern == adapter.rank_pattern


def test_pattern_rules_are_peft_s() -> None:
    name = "model.layers.1.self_attn.q_proj"
    assert pattern_key(["proj"], name) is None  # a whole dot-separated suffix, not a substring
    assert pattern_key([".*proj"], name) == ".*proj"
    assert pattern_key(["k_proj", "q_proj", name], name) == "q_proj"  # the first match wins
    assert pattern_key([r"^model\.layers\.1\.self_attn\.q_proj"], name) is not None


def test_both_budget_patterns_on_one_module_are_refused() -> None:
    adapter = selora.SpectralAdapter(
        target_modules=("q_proj",), sparse_ratio_pattern={"q_proj": 0.5}, n_coeffs_pattern={".*": 3}
    )
    with pytest.raises(ValueError, match=r"q_proj.*sparse_ratio_pattern.*n_coeffs_pattern"):
        selora.inject(kit.tiny_llama(), adapter)


def test_unmatched_pattern_key_warns() -> None:
    adapter = selora.SpectralAdapter(target_modules=("q_proj",), rank_pattern={"nothing": 2})
    with pytest.warns(RuntimeWarning, match="nothing"):
        selora.inject(kit.tiny_llama(), adapter)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"rank_pattern": {"q": 2.5}}, "rank_pattern"),
        ({"rank_pattern": {"(": 2}}, "rank_pattern"),
        ({"rank_pattern": ["q"]}, "rank_pattern"),
        ({"alpha_pattern": {"q": -1.0}}, "alpha_pattern"),
        ({"alpha_pattern": {"": 1.0}}, "alpha_pattern"),
        ({"sparse_ratio_pattern": {"q": 1.0}}, "sparse_ratio_pattern"),
        ({"n_coeffs_pattern": {"q": 0}}, "n_coeffs_pattern"),
        ({"basis": None, "n_coeffs_pattern": {"q": 4}}, "n_coeffs_pattern"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"target_modules": ("q",), "layers_to_transform": [-1]}, "layers_to_transform"),
        ({"target_modules": ("q",), "layers_to_transform": ["0"]}, "layers_to_transform"),
        ({"target_modules": "all-linear", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ".*q", "layers_to_transform": 0}, "layers_to_transform"),
        ({"target_modules": ("q",), "layers_pattern": "layers"}, "layers_pattern"),
        (
            {"target_modules": ("q",), "layers_to_transform": 0, "layers_pattern": [""]},
            "layers_pattern",
        ),
        ({"task_type": "CLASSIFY"}, "task_type"),
    ],
)
def test_invalid_options_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"SpectralAdapter\.{field}:"):
        selora.SpectralAdapter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_rslora_scale_against_dense_float64(alpha: float | None) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 10).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    r = 4
    adapter = selora.SpectralAdapter(
        basis="dct", r=r, alpha=alpha, use_rslora=True, target_modules=("0",), init_weights=False
    )
    model = selora.inject(nn.Sequential(linear), adapter)
    unit = model[0].unit("default")
    a, b = unit.lora_A(None).double(), unit.lora_B(None).double()
    scale = (r if alpha is None else alpha) / math.sqrt(r)
    want = x @ linear.weight.T + linear.bias + scale * (x @ a.T @ b.T)
    assert unit.scaling == pytest.approx(scale)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)
    assert selora.SpectralAdapter(r=r, alpha=alpha).scaling != pytest.approx(scale)


def test_hira_ignores_rslora() -> None:
    x = torch.randn(3, 12, dtype=torch.float64)
    outs = []
    for flag in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 10).double())
        spec = selora.SpectralAdapter(
            base="hira", r=4, alpha=3.0, use_rslora=flag, target_modules=("0",), init_weights=False
        )
        outs.append(selora.inject(net, spec)(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_layers_to_transform_selects_layers() -> None:
    spec = selora.SpectralAdapter(
        target_modules=("q_proj", "v_proj"), layers_to_transform=1, layers_pattern="layers"
    )
    assert spec.layers_to_transform == (1,) and spec.layers_pattern == ("layers",)
    assert set(_units(selora.inject(kit.tiny_llama(), spec))) == {Q.format(1), V.format(1)}
    # No layers_pattern: the first number after a name; an exact full name bypasses the filter.
    spec = selora.SpectralAdapter(target_modules=("q_proj", V.format(1)), layers_to_transform=[0])
    assert set(_units(selora.inject(kit.tiny_llama(), spec))) == {Q.format(0), V.format(1)}


def test_layer_filter_takes_the_first_index() -> None:
    name = "model.layers.1.mlp.experts.0.up_proj"
    assert layer_selected(name, (1,), None) and not layer_selected(name, (0,), None)
    assert layer_selected(name, (0,), ("experts",))
    assert not layer_selected("up_proj", (0,), None)  # no index: not selected
    assert layer_selected("up_proj", None, None)


def test_task_type_trains_the_head_instead_of_adapting_it() -> None:
    def classifier() -> nn.Module:
        from transformers import BertForSequenceClassification

        torch.manual_seed(0)
        config = kit.tt.bert_config(vocab_size=64, max_position_embeddings=64, num_labels=3)
        return BertForSequenceClassification(config)

    plain = selora.inject(classifier(), selora.SpectralAdapter(r=2))
    assert isinstance(plain.classifier, selora.SpectralLayer)  # without a task type: adapted
    spec = selora.SpectralAdapter(r=2, task_type="SEQ_CLS")
    assert spec.modules_to_save == ("classifier", "score")
    model = selora.inject(classifier(), spec)
    assert isinstance(model.classifier, nn.Linear)
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert isinstance(model.bert.pooler.dense, selora.SpectralLayer)
    with pytest.raises(ValueError, match=r"task_type='TOKEN_CLS'.*classifier"):
        selora.inject(kit.TinyMLP(), selora.SpectralAdapter(task_type="TOKEN_CLS"))


def test_new_fields_round_trip_and_are_required(tmp_path: Path) -> None:
    spec = selora.SpectralAdapter(
        basis="dct",
        r=4,
        alpha=2.0,
        target_modules=("q_proj", "v_proj"),
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 5.0},
        n_coeffs_pattern={"q_proj": 17},
        use_rslora=True,
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        task_type="CAUSAL_LM",
        init_weights=False,
    )
    model = kit.perturb(selora.inject(_llama(), spec))
    selora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 2}
    assert config["use_rslora"] is True and config["layers_to_transform"] == [0, 1]
    assert config["task_type"] == "CAUSAL_LM"
    ids = kit.token_batch()
    fresh = selora.load_adapter(_llama(), tmp_path)
    assert selora.adapter_config(fresh) == spec
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    for field in ("rank_pattern", "use_rslora", "layers_to_transform", "task_type"):
        broken = dict(config)
        del broken[field]
        (tmp_path / "adapter_config.json").write_text(json.dumps(broken))
        with pytest.raises(AdapterCheckpointError, match=field):
            selora.load_adapter(kit.tiny_llama(), tmp_path)


def test_hash_covers_computation_not_placement() -> None:
    base = selora.SpectralAdapter(target_modules=("q_proj",))
    digest = config_digest(spectral_config(base))
    for changed in (
        {"rank_pattern": {"q": 2}},
        {"use_rslora": True},
        {"alpha_pattern": {"q": 1.0}},
    ):
        other = selora.SpectralAdapter(target_modules=("q_proj",), **changed)  # type: ignore[arg-type]
        assert config_digest(spectral_config(other)) != digest, changed
    for same in ({"layers_to_transform": 1}, {"task_type": "CAUSAL_LM"}):
        other = selora.SpectralAdapter(target_modules=("q_proj",), **same)  # type: ignore[arg-type]
        assert config_digest(spectral_config(other)) == digest, same
    assert set(selora.SpectralAdapter().to_dict()) == set(SPECTRAL_FIELDS)


def test_resolve_for_module_clears_patterns() -> None:
    spec = selora.SpectralAdapter(rank_pattern={"q": 3}, sparse_ratio_pattern={"q": 0.2})
    resolved = resolve_for_module(spec, "a.q")
    assert (resolved.r, resolved.sparse_ratio, resolved.rank_pattern) == (3, 0.2, {})
    assert resolve_for_module(spec, "a.k").r == 8
    assert resolve_for_module(selora.SpectralAdapter(), "a.q") == selora.SpectralAdapter()
