"""selora.add_weighted_adapter: "cat" against the dense float64 sum, "linear" against PEFT's.

"cat" must reproduce sum_i w_i s_i B_i A_i (LoRA) or W0 * sum_i w_i B_i A_i (HiRA)
to float64 rounding, for sources of any bases, ranks and locations. "linear"
must give PEFT's factor-wise combination exactly (computed here from the
formed factors); its update equals the weighted update for one source only.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import selora


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.Linear(4, 4)).double()


def _updates(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for layer_name, layer in selora.adapter_layers(model):
        if name in layer.selora_units:
            unit = layer.unit(name)
            a, b = unit.lora_A(None).double(), unit.lora_B(None).double()
            out[layer_name] = b @ a * (unit.scaling if unit.adapter.base == "lora" else 1.0)
    return out


@pytest.mark.parametrize("base", ["lora", "hira"])
def test_cat_is_the_weighted_sum_of_updates(base: str) -> None:
    model = _net()
    specs = {
        "a": selora.SpectralAdapter(
            basis="dct", base=base, r=2, alpha=3.0, target_modules=("0", "2"), init_weights=False
        ),
        "b": selora.SpectralAdapter(
            basis="fft",
            base=base,
            r=3,
            alpha=2.0,
            use_rslora=True,
            rank_pattern={"3": 2},
            target_modules=("0", "3"),
            init_weights=False,
            seed=4,
        ),
        "c": selora.SpectralAdapter(
            basis=None, base=base, r=1, target_modules=("2",), init_weights=False
        ),
    }
    for name, spec in specs.items():
        selora.inject(model, spec, name)
    weights = {"a": 0.7, "b": -1.3, "c": 2.0}
    updates = {n: _updates(model, n) for n in specs}
    x = torch.randn(5, 8, dtype=torch.float64)
    with selora.disable_adapters(model):
        base_out = model(x)
    selora.add_weighted_adapter(model, list(specs), list(weights.values()), "mix")
    assert selora.active_adapters(model) == ["a"]  # added inactive, as PEFT does
    mixed = selora.adapter_config(model, "mix")
    assert mixed.basis is None and mixed.r == 2 + 3 + 1 and mixed.scaling == 1.0
    got = _updates(model, "mix")
    assert set(got) == {"0", "2", "3"}
    for layer_name, update in got.items():
        want = sum(weights[n] * updates[n][layer_name] for n in specs if layer_name in updates[n])
        torch.testing.assert_close(update, want, rtol=0, atol=1e-13)
    # The merged forward equals the unmerged one, and differs from the base model.
    selora.set_adapter(model, "mix")
    with torch.no_grad():
        unmerged = model(x)
        selora.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-12)
    assert not torch.allclose(unmerged, base_out)


def test_cat_merge_matches_the_dense_oracle() -> None:
    model = _net()
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    for name, seed in (("a", 0), ("b", 1)):
        spec = selora.SpectralAdapter(
            basis="coif", r=2, alpha=4.0, target_modules=("0", "2"), init_weights=False, seed=seed
        )
        selora.inject(model, spec, name)
    ups = {n: _updates(model, n) for n in ("a", "b")}
    selora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.25], "mix", combination_type="cat")
    selora.merge(model, ["mix"])
    for n, weight in w0.items():
        want = weight + 0.5 * ups["a"][n] + 0.25 * ups["b"][n]
        got = model.get_submodule(n).base_layer.weight
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_linear_is_peft_s_formula_in_coefficient_space() -> None:
    model = _net()
    for name, alpha in (("a", 3.0), ("b", 5.0)):
        spec = selora.SpectralAdapter(
            basis="dct", r=2, alpha=alpha, target_modules=("0", "2"), init_weights=False
        )
        selora.inject(model, spec, name)
    weights = (0.7, -1.3)
    selora.add_weighted_adapter(model, ["a", "b"], list(weights), "mix", "linear")
    assert selora.adapter_config(model, "mix").basis == "dct"
    for _, layer in selora.adapter_layers(model):
        units = [layer.unit(n) for n in ("a", "b")]
        signed = [w * u.scaling for w, u in zip(weights, units, strict=True)]
        roots = [math.sqrt(abs(s)) for s in signed]
        a = sum(
            math.copysign(r, s) * u.lora_A(None)
            for r, s, u in zip(roots, signed, units, strict=True)
        )
        b = sum(r * u.lora_B(None) for r, u in zip(roots, units, strict=True))
        new = layer.unit("mix")
        assert new.lora_A.n_coeffs == units[0].lora_A.n_coeffs  # still sparse, same budget
        torch.testing.assert_close(new.lora_A(None), a, rtol=0, atol=1e-13)
        torch.testing.assert_close(new.lora_B(None), b, rtol=0, atol=1e-13)
        assert new.scaling == 1.0


def test_linear_with_one_adapter_is_exact_for_the_update() -> None:
    model = _net()
    spec = selora.SpectralAdapter(basis="fft", r=2, alpha=3.0, target_modules=("0",))
    selora.inject(model, spec, "a")
    torch.nn.init.normal_(model[0].unit("a").lora_B.coefficients)
    before = _updates(model, "a")["0"]
    selora.add_weighted_adapter(model, ["a"], [-0.4], "neg", combination_type="cat")
    torch.testing.assert_close(_updates(model, "neg")["0"], -0.4 * before, rtol=0, atol=1e-13)


def test_refusals() -> None:
    model = _net()
    selora.inject(model, selora.SpectralAdapter(basis="dct", r=2, target_modules=("0",)), "a")
    selora.inject(model, selora.SpectralAdapter(basis="fft", r=2, target_modules=("0",)), "b")
    with pytest.raises(ValueError, match=r"'svd' is not supported.*'cat'"):
        selora.add_weighted_adapter(model, ["a", "b"], [1, 1], "m", combination_type="svd")
    with pytest.raises(ValueError, match="must be one of"):
        selora.add_weighted_adapter(model, ["a", "b"], [1, 1], "m", combination_type="mean")
    with pytest.raises(ValueError, match=r"differ in \['basis'\]"):
        selora.add_weighted_adapter(model, ["a", "b"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match="2 weights"):
        selora.add_weighted_adapter(model, ["a"], [1, 1], "m")
    with pytest.raises(ValueError, match="already holds"):
        selora.add_weighted_adapter(model, ["a", "b"], [1, 1], "b")
    selora.inject(model, selora.SpectralAdapter(base="dora", r=2, target_modules=("0",)), "d")
    with pytest.raises(ValueError, match="'dora'"):
        selora.add_weighted_adapter(model, ["a", "d"], [1, 1], "m")
    assert next(iter(selora.adapter_layers(model)))[1].selora_units.keys() == {"a", "b", "d"}
