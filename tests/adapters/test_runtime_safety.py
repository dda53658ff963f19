"""Run-time safety (issue 14): no silent wrong result from caches, merges or bad inputs.

* the eval factor cache follows the parameters whatever route changed them
  (``.data``, ``vector_to_parameters``, an EMA swap, ``load_state_dict``) and is
  safe to share between threads;
* ``merge(safe=True)`` checks every layer before writing any, and refuses NaN,
  inf and deltas so large that unmerge could not restore the frozen weight;
* loading adapter tensors into a merged model is refused, and unmerge restores
  the frozen weight even if the adapter changed while merged;
* DoRA on a layer with an all-zero row stays finite and exact at init;
* a rank above ``min(d_in, d_out)`` warns with the numbers;
* quantized base layers selora does not adapt are refused at inject, naming the
  class (bitsandbytes' quantized Linear4bit / Linear8bitLt are adapted: see
  test_quantized.py);
* ``check_finite`` / ``set_finite_checks`` find non-finite adapter tensors.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import adapters_testkit as kit
import pytest
import torch
from torch import nn

import selora
from selora.adapters import AdapterUnit, DenseFactor
from selora.spectral_bases import SparseSpectrum


def _model(basis: str | None = "dct", base: str = "lora", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = kit.TinyMLP()
    selora.inject(model, selora.SpectralAdapter(basis=basis, base=base, r=4, alpha=8))
    kit.perturb(model, scale=0.3, seed=seed)
    return model


def _x(rows: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed))


def _fresh_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output with every factor formed anew (``train()`` drops the cache)."""
    model.train()
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def _adapter_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.weight.detach().clone() for n, layer in selora.adapter_layers(model)}


# --- 1. the eval cache follows the parameters -------------------------------------------------


def _scale_data(model: nn.Module) -> None:
    for p in _adapter_params(model):
        p.data.mul_(1.5)


def _assign_data(model: nn.Module) -> None:
    for p in _adapter_params(model):
        p.data = p.data * 1.5


def _vector_to_parameters(model: nn.Module) -> None:
    params = _adapter_params(model)
    vec = torch.nn.utils.parameters_to_vector(params)
    torch.nn.utils.vector_to_parameters(vec * 1.5, params)


def _ema_swap(model: nn.Module) -> None:
    # The usual EMA evaluation: copy the shadow weights in through .data.
    shadow = [p.detach() * 1.5 for p in _adapter_params(model)]
    for p, s in zip(_adapter_params(model), shadow, strict=True):
        p.data.copy_(s)


def _load_into_data(model: nn.Module) -> None:
    state = {k: v * 1.5 for k, v in model.state_dict().items() if "selora_units." in k}
    own = dict(model.named_parameters())
    for key, value in state.items():
        own[key].data.copy_(value)


def _load_state_dict(model: nn.Module) -> None:
    state = {k: v * 1.5 for k, v in model.state_dict().items() if "selora_units." in k}
    model.load_state_dict(state, strict=False)


def _load_state_dict_assign(model: nn.Module) -> None:
    state = {k: v * 1.5 for k, v in model.state_dict().items() if "selora_units." in k}
    model.load_state_dict(state, strict=False, assign=True)


ROUTES: dict[str, Callable[[nn.Module], None]] = {
    "data.mul_": _scale_data,
    "data=": _assign_data,
    "vector_to_parameters": _vector_to_parameters,
    "ema_swap": _ema_swap,
    "load_into_data": _load_into_data,
    "load_state_dict": _load_state_dict,
    "load_state_dict_assign": _load_state_dict_assign,
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("basis", ["dct", "fft", "haar", None])
def test_eval_cache_follows_every_route(route: str, basis: str | None) -> None:
    model = _model(basis)
    x = _x()
    model.eval()
    with torch.no_grad():
        before = model(x)
        ROUTES[route](model)
        after = model(x)
    expected = _fresh_output(model, x)
    assert not torch.allclose(before, expected), "the route changed nothing: a useless test"
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


@pytest.mark.parametrize("basis", ["dct", "coif"])
def test_eval_cache_follows_locations_changed_in_place(basis: str) -> None:
    model = _model(basis)
    x = _x()
    model.eval()
    with torch.no_grad():
        model(x)
        for module in model.modules():
            if isinstance(module, SparseSpectrum):
                module.indices = module.indices.clone()  # a private copy
        before = model(x)
        for module in model.modules():
            if isinstance(module, SparseSpectrum):
                module.indices.copy_(module.indices.flip(0))
        after = model(x)
    expected = _fresh_output(model, x)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_eval_cache_follows_dtype_and_inference_mode() -> None:
    model = _model("dct")
    x = _x()
    model.eval()
    with torch.inference_mode():
        first = model(x)
    with torch.no_grad():
        _scale_data(model)
        second = model(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, _fresh_output(model, x), rtol=0, atol=0)


def test_eval_cache_is_used() -> None:
    """The cache still saves the transforms: a second no-grad call forms no factor."""
    model = _model("dct")
    model.eval()
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    for module in model.modules():
        if isinstance(module, SparseSpectrum):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(_x())
        first = calls
        model(_x())
    assert first > 0 and calls == first


def test_eval_cache_follows_data_through_the_peft_bridge() -> None:
    pytest.importorskip("peft")
    from peft import get_peft_model

    from selora.integrations.peft import SeloraConfig

    torch.manual_seed(0)
    model = get_peft_model(
        kit.TinyMLP(), SeloraConfig(basis="dct", r=4, target_modules=["fc1", "fc2"])
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = _x()
    model.eval()
    with torch.no_grad():
        before = model(x)
        for p in model.parameters():
            if p.requires_grad:
                p.data.mul_(1.5)
        after = model(x)
    expected = _fresh_output(model, x)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


@pytest.fixture
def fast_thread_switches() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.usefixtures("fast_thread_switches")
def test_cache_shared_by_grad_and_no_grad_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Widen the race: let other threads run right after every write of the cache
    # (the old cache failed here every time; without this, in about 2 of 3 runs).
    def setattr_then_yield(self: nn.Module, name: str, value: object) -> None:
        nn.Module.__setattr__(self, name, value)
        if name == "_cache":
            time.sleep(1e-4)

    monkeypatch.setattr(AdapterUnit, "__setattr__", setattr_then_yield)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    selora.inject(model, selora.SpectralAdapter(basis="dct", r=2, target_modules="all-linear"))
    kit.perturb(model, scale=0.3)
    model.eval()
    x = _x()
    with torch.no_grad():
        reference = model(x)
    errors: list[BaseException] = []
    mismatches: list[float] = []

    def work(grad: bool) -> None:
        try:
            for _ in range(200):
                with torch.set_grad_enabled(grad):
                    out = model(x)
                diff = float((out.detach() - reference).abs().max())
                if diff > 1e-6:
                    mismatches.append(diff)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} threads failed, first: {errors[0]!r}"
    assert not mismatches, f"{len(mismatches)} outputs differ, up to {max(mismatches)}"


# --- 2. merges that destroy weights -----------------------------------------------------------


def _poison(model: nn.Module, layer_name: str, value: float) -> None:
    layer = dict(selora.adapter_layers(model))[layer_name]
    with torch.no_grad():
        factor = layer.adapter.lora_B
        tensor = factor.weight if isinstance(factor, DenseFactor) else factor.coefficients
        tensor.fill_(value)


POISONS = {"nan": float("nan"), "inf": float("inf"), "1e30": 1e30}


@pytest.mark.parametrize("basis", ["dct", None])
@pytest.mark.parametrize("base", ["lora", "dora", "hira"])
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_safe_merge_changes_nothing_on_a_bad_delta(poison: str, base: str, basis: str) -> None:
    model = _model(basis, base)
    _poison(model, "fc2", POISONS[poison])
    before = _base_weights(model)
    if (poison, base) == ("1e30", "hira"):
        # W0 * (1 + BA) keeps W0's digits (relative rounding): the merge is reversible,
        # so the safe merge goes ahead, and unmerge must give W0 back.
        selora.merge(model, safe=True)
        selora.unmerge(model)
        for name, layer in selora.adapter_layers(model):
            torch.testing.assert_close(layer.weight, before[name], rtol=1e-5, atol=1e-6)
        return
    with pytest.raises(ValueError, match="fc2"):
        selora.merge(model, safe=True)
    for name, layer in selora.adapter_layers(model):
        assert not layer.merged, name
        assert torch.equal(layer.weight, before[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("base", ["lora", "dora", "hira"])
def test_safe_merge_merges_a_good_adapter(base: str, dtype: torch.dtype) -> None:
    """No false alarm: a trained-looking adapter merges safely, also in bfloat16."""
    model = _model("dct", base).to(dtype)
    for _, layer in selora.adapter_layers(model):
        layer.adapter.float()  # adapter parameters stay float32 (compute_dtype)
    before = _base_weights(model)
    x = _x().to(dtype)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        selora.merge(model, safe=True)
        assert all(layer.merged for _, layer in selora.adapter_layers(model))
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(model(x), expected, rtol=tol, atol=tol)
        selora.unmerge(model)
    for name, layer in selora.adapter_layers(model):
        torch.testing.assert_close(layer.weight, before[name], rtol=tol, atol=tol)


def test_unsafe_merge_of_a_huge_delta_loses_the_base_weight() -> None:
    """Documented behaviour: without ``safe``, a 1e30 delta destroys W0 for good.

    Merging rounds W0 away (W0 + 1e30 == 1e30 in float32), so unmerge cannot
    bring it back. This is why ``merge(safe=True)`` exists.
    """
    model = _model("dct")
    _poison(model, "fc2", 1e30)
    before = _base_weights(model)
    selora.merge(model)
    selora.unmerge(model)
    layer = dict(selora.adapter_layers(model))["fc2"]
    assert not torch.allclose(layer.weight, before["fc2"], atol=1e-3)


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_peft_safe_merge_changes_nothing(poison: str) -> None:
    pytest.importorskip("peft")
    from peft import get_peft_model

    from selora.integrations.peft import SeloraConfig

    torch.manual_seed(0)
    model = get_peft_model(
        kit.TinyMLP(), SeloraConfig(basis="dct", r=4, target_modules=["fc1", "fc2"])
    )
    model.add_adapter("other", SeloraConfig(basis="dct", r=4, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "selora_units" in name:
                p.add_(0.3 * torch.randn_like(p))
        for name, p in model.named_parameters():
            if "fc2" in name and "selora_units.other.lora_B" in name:
                p.fill_(POISONS[poison])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError):
        model.merge_adapter(["default", "other"], safe_merge=True)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError):
        model.merge_and_unload(safe_merge=True, adapter_names=["default", "other"])
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, before[n]), n


# --- 3. replacing adapter tensors while merged -------------------------------------------------


def test_load_state_dict_into_a_merged_model_is_refused() -> None:
    model = _model("dct")
    before = _base_weights(model)
    state = {k: v * 1.5 for k, v in model.state_dict().items() if "selora_units." in k}
    selora.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.load_state_dict(state, strict=False)
    selora.unmerge(model)
    for name, layer in selora.adapter_layers(model):
        torch.testing.assert_close(layer.weight, before[name], rtol=0, atol=1e-6)
    model.load_state_dict(state, strict=False)  # fine once unmerged


def test_load_adapter_into_a_merged_model_is_refused(tmp_path: object) -> None:
    model = _model("dct")
    selora.save_adapter(model, tmp_path)  # type: ignore[arg-type]
    selora.merge(model)
    with pytest.raises(selora.AdapterCheckpointError, match="unmerge"):
        selora.load_adapter(model, tmp_path)  # type: ignore[arg-type]


def test_peft_load_state_dict_into_a_merged_adapter_is_refused() -> None:
    pytest.importorskip("peft")
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from selora.integrations.peft import SeloraConfig

    torch.manual_seed(0)
    model = get_peft_model(
        kit.TinyMLP(), SeloraConfig(basis="dct", r=4, target_modules=["fc1", "fc2"])
    )
    state = {
        k: v * 1.5 + 0.1 if v.is_floating_point() else v
        for k, v in get_peft_model_state_dict(model).items()
    }
    model.merge_adapter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(selora.AdapterCheckpointError, match="unmerge"):
        set_peft_model_state_dict(model, state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("base", ["lora", "dora", "hira"])
def test_unmerge_restores_the_base_after_the_adapter_changed(base: str) -> None:
    """An optimizer step (or any change) on a merged model must not shift W0."""
    model = _model("dct", base)
    before = _base_weights(model)
    selora.merge(model)
    opt = torch.optim.AdamW(_adapter_params(model), lr=1e-2, weight_decay=0.1)
    for p in _adapter_params(model):
        p.grad = torch.ones_like(p)
    opt.step()
    selora.unmerge(model)
    for name, layer in selora.adapter_layers(model):
        torch.testing.assert_close(layer.weight, before[name], rtol=0, atol=1e-6)


# --- 4. DoRA on a layer with an all-zero row ----------------------------------------------------


def _zero_row_model(basis: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = kit.TinyMLP()
    with torch.no_grad():
        model.fc2.weight[3].zero_()
    return model


@pytest.mark.parametrize("basis", ["dct", None])
def test_dora_zero_row_is_finite_and_exact_at_init(basis: str | None) -> None:
    model = _zero_row_model(basis)
    base = copy.deepcopy(model)
    selora.inject(model, selora.SpectralAdapter(basis=basis, base="dora", r=4))
    x = _x()
    out = model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base(x), rtol=0, atol=0)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    selora.merge(model)
    assert all(torch.isfinite(layer.weight).all() for _, layer in selora.adapter_layers(model))
    selora.unmerge(model)
    for name, layer in selora.adapter_layers(model):
        torch.testing.assert_close(layer.weight, base.get_submodule(name).weight)


def test_dora_nonzero_rows_unchanged() -> None:
    """The guard changes nothing on rows with a non-zero norm: the dense formula holds."""
    model = _model("dct", "dora")
    layer = dict(selora.adapter_layers(model))["fc2"]
    unit = layer.adapter
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w0 = layer.base_layer.weight.double()
        v = w0 + unit.scaling * unit.lora_B().double() @ unit.lora_A().double()
        w = unit.magnitude.double().unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
        expected = x.double() @ w.T + layer.base_layer.bias.double()
        got = layer(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# --- 5. r larger than the layer -----------------------------------------------------------------


def test_rank_above_the_layer_warns_with_the_numbers() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.warns(UserWarning, match=r"r=64.*d_in=16.*d_out=8"):
        selora.inject(model, selora.SpectralAdapter(basis=None, r=64, target_modules=["0"]))


def test_rank_within_the_layer_does_not_warn() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selora.inject(model, selora.SpectralAdapter(basis=None, r=8, target_modules=["0"]))


# --- 6. quantized base layers ------------------------------------------------------------------


class Linear8bitLt(nn.Linear):
    """A stand-in for ``bitsandbytes.nn.Linear8bitLt`` (an ``nn.Linear`` subclass)."""


Linear8bitLt.__module__ = "bitsandbytes.nn.modules"


class QuantizedHolder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.q_proj = Linear8bitLt(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.q_proj(self.fc(x))
        return out


@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"])
def test_inject_refuses_a_quantized_layer(targets: list[str] | str) -> None:
    model = QuantizedHolder()
    with pytest.raises(TypeError, match=r"q_proj.*Linear8bitLt"):
        selora.inject(model, selora.SpectralAdapter(basis="dct", r=2, target_modules=targets))
    assert not any(isinstance(m, selora.SpectralLayer) for m in model.modules())


def test_inject_refuses_an_integer_weight() -> None:
    model = QuantizedHolder()
    model.fc.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"fc"):
        selora.inject(model, selora.SpectralAdapter(basis="dct", r=2, target_modules=["fc"]))


def test_peft_bridge_refuses_a_quantized_layer() -> None:
    pytest.importorskip("peft")
    from peft import get_peft_model

    from selora.integrations.peft import SeloraConfig

    with pytest.raises(TypeError, match=r"q_proj.*Linear8bitLt"):
        get_peft_model(QuantizedHolder(), SeloraConfig(basis="dct", r=2, target_modules=["q_proj"]))


def test_bitsandbytes_layers_not_quantized_yet_are_refused() -> None:
    # bitsandbytes quantizes a weight when the layer moves to a device; before that the
    # layer cannot compute (4-bit) or holds float weights it would quantize later (8-bit).
    bnb = pytest.importorskip("bitsandbytes")

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q4 = bnb.nn.Linear4bit(16, 16)
            self.q8 = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)

    for name, cls in (("q4", "Linear4bit"), ("q8", "Linear8bitLt")):
        with pytest.raises(TypeError, match=rf"{name}.*{cls}"):
            selora.inject(Holder(), selora.SpectralAdapter(basis="dct", r=2, target_modules=[name]))


# --- 7. non-finite coefficients ----------------------------------------------------------------


def test_check_finite_names_the_tensor() -> None:
    model = _model("dct")
    selora.check_finite(model)  # all finite: no error
    _poison(model, "fc2", float("nan"))
    with pytest.raises(ValueError, match=r"fc2\.selora_units\.default\.lora_B\.coefficients"):
        selora.check_finite(model)


def test_finite_checks_fail_fast_in_forward() -> None:
    model = _model("dct")
    x = _x()
    model(x)
    selora.set_finite_checks(model, True)
    model(x)  # finite: fine
    _poison(model, "fc1", float("inf"))
    with pytest.raises(ValueError, match="fc1"):
        model(x)
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="fc1"):
        model(x)
    selora.set_finite_checks(model, False)
    assert not torch.isfinite(model(x)).all()  # off by default: propagates silently
