"""The three formulas against dense float64 references built from design.md.

lora: W0 + (alpha/r) B A; dora: m * V / ||V||_row with V = W0 + (alpha/r) B A;
hira: W0 + W0 * (B A). The references form A~ and B~ with numpy / scipy / pywt
from the scattered coefficients, never through the module.
"""

from __future__ import annotations

import copy

import adapters_testkit as kit
import pytest
import torch
from basis_shapes import accepts
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

import selora
from selora import SpectralAdapter, SpectralLayer


def adapted_layer(
    base: str,
    basis: str | None,
    *,
    d_in: int = 8,
    d_out: int = 6,
    r: int = 4,
    alpha: float | None = 8.0,
    conv1d: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **budget: object,
) -> tuple[nn.Sequential, SpectralLayer]:
    torch.manual_seed(seed)
    layer: nn.Module = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    if conv1d:
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias, std=0.1)
    model = nn.Sequential(layer).to(dtype)
    adapter = SpectralAdapter(basis=basis, base=base, r=r, alpha=alpha, seed=seed, **budget)  # type: ignore[arg-type]
    selora.inject(model, adapter)
    wrapped = model[0]
    assert isinstance(wrapped, SpectralLayer)
    return model, wrapped


def reference_weight(layer: SpectralLayer) -> Tensor:
    """The adapted weight (d_out, d_in) in float64, straight from the formulas."""
    unit = layer.adapter
    w0 = layer.base_layer.weight.detach().double()
    if isinstance(layer.base_layer, Conv1D):
        w0 = w0.t()
    a = kit.reference_factor(unit.lora_A)
    b = kit.reference_factor(unit.lora_B)
    assert a.shape == (unit.adapter.r, layer.in_features)
    assert b.shape == (layer.out_features, unit.adapter.r)
    scale = 1.0 if unit.adapter.alpha is None else unit.adapter.alpha / unit.adapter.r
    base = unit.adapter.base
    if base == "lora":
        return w0 + scale * (b @ a)
    if base == "dora":
        v = w0 + scale * (b @ a)
        magnitude = unit.magnitude.detach().double()
        return magnitude[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)
    if base == "hira":
        return w0 + w0 * (b @ a)
    raise AssertionError(base)


def reference_output(layer: SpectralLayer, x: Tensor) -> Tensor:
    bias = layer.base_layer.bias.detach().double()
    return x.double() @ reference_weight(layer).t() + bias


# --------------------------------------------------------------------- init is exact


@pytest.mark.parametrize("basis", kit.BASES, ids=str)
@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_init_output_equals_base_model_exactly(base: str, basis: str | None) -> None:
    torch.manual_seed(0)
    model = kit.TinyMLP()
    reference = copy.deepcopy(model)
    selora.inject(model, SpectralAdapter(basis=basis, base=base, r=4, alpha=16))
    assert len(list(selora.adapter_layers(model))) == 3
    x = torch.randn(5, 8)
    assert torch.equal(model(x), reference(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("basis", [None, "fft", "haar"], ids=str)
@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_init_exact_on_gpt2_conv1d(base: str, basis: str | None) -> None:
    torch.manual_seed(0)
    model = kit.tiny_gpt2()
    reference = copy.deepcopy(model)
    selora.inject(model, SpectralAdapter(basis=basis, base=base, r=4, target_modules="all-linear"))
    ids = kit.token_batch()
    assert torch.equal(model(ids).logits, reference(ids).logits)


# ------------------------------------------------------------ dense float64 references


@settings(max_examples=40, deadline=None)
@given(
    base=st.sampled_from(kit.ADAPTATION_BASES),
    basis=st.sampled_from(kit.BASES),
    d_in=st.integers(2, 6).map(lambda k: 2 * k),
    d_out=st.integers(2, 6).map(lambda k: 2 * k),
    r=st.integers(1, 3).map(lambda k: 2 * k),
    alpha=st.none() | st.floats(0.5, 32.0),
    ratio=st.floats(0.0, 0.6),
    conv1d=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_forward_and_merge_match_dense_float64_reference(
    base: str,
    basis: str | None,
    d_in: int,
    d_out: int,
    r: int,
    alpha: float | None,
    ratio: float,
    conv1d: bool,
    seed: int,
) -> None:
    # a basis with a shape rule (db4-l2: 4 divides both sides; db2-boundary: sides >= 4)
    assume(basis is None or (accepts(basis, r, d_in) and accepts(basis, d_out, r)))
    budget = {} if basis is None else {"sparse_ratio": ratio}
    model, layer = adapted_layer(
        base, basis, d_in=d_in, d_out=d_out, r=r, alpha=alpha, conv1d=conv1d, seed=seed, **budget
    )
    kit.perturb(model, scale=0.5, seed=seed)
    assert layer.adapter.lora_B(None).abs().max() > 0
    x = torch.randn(7, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = reference_output(layer, x)
    expected_weight = reference_weight(layer)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)
    selora.merge(model)
    merged = layer.base_layer.weight.double()
    torch.testing.assert_close(
        merged.t() if conv1d else merged, expected_weight, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("basis", kit.SPECTRAL_BASES)
def test_sparse_coefficients_sit_at_the_shared_locations(basis: str) -> None:
    _, layer = adapted_layer("lora", basis, d_out=8, sparse_ratio=0.5)  # db4-l2: 4 | d_out
    a = layer.adapter.lora_A
    assert isinstance(a, selora.SparseSpectrum)
    assert a.n_coeffs == 16  # floor((1 - 0.5) * 4 * 8)
    expected = selora.spectral_bases.spectral_locations((4, 8), 16, seed=0)
    assert torch.equal(a.indices.cpu(), expected)
    dense = a.dense_spectrum().detach()
    mask = torch.zeros(32, dtype=torch.bool)
    mask[expected] = True
    assert torch.all(dense.flatten()[~mask] == 0)


# ----------------------------------------------------------------------- gradients


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("basis", [None, "fft", "dct", "db4"], ids=str)
@pytest.mark.parametrize("base", ["lora", "hira"])
def test_gradients_match_finite_differences(base: str, basis: str | None) -> None:
    model, _ = adapted_layer(base, basis, sparse_ratio=0.5) if basis else adapted_layer(base, None)
    kit.perturb(model, 0.5)
    params = _trainable(model)
    names = list(params)
    assert len(names) == 2  # lora_A and lora_B coefficients (or dense weights)
    x = torch.randn(3, 8, dtype=torch.float64)

    def f(*values: Tensor) -> Tensor:
        out: Tensor = functional_call(model, dict(zip(names, values, strict=True)), (x,))
        return out

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params.values())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("basis", [None, "fft", "coif"], ids=str)
def test_dora_gradients(basis: str | None) -> None:
    """DoRA: magnitude by finite differences; coefficients against the detached-norm reference.

    The paper (Liu et al. 2024, sec. 4.3) treats ||V||_row as a constant in the
    backward pass, so finite differences over the coefficients must *disagree*
    with autograd, while the reference with a detached norm agrees to 1e-10.
    """
    budget = {"sparse_ratio": 0.5} if basis else {}
    model, layer = adapted_layer("dora", basis, **budget)
    kit.perturb(model, 0.5)
    unit = layer.adapter
    x = torch.randn(3, 8, dtype=torch.float64)
    params = _trainable(model)
    mag_name = next(n for n in params if n.endswith("magnitude"))

    def by_magnitude(magnitude: Tensor) -> Tensor:
        out: Tensor = functional_call(model, {mag_name: magnitude}, (x,))
        return out

    magnitude = unit.magnitude.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(by_magnitude, (magnitude,), eps=1e-6, atol=1e-7)

    # Coefficients: autograd of the module vs autograd of the float64 reference.
    upstream = torch.randn(3, 6, dtype=torch.float64)
    (model(x) * upstream).sum().backward()
    got_a, got_b = _coefficient_grads(unit)

    w0 = layer.base_layer.weight.detach().double()
    scale = 8.0 / 4
    ca, cb, map_a, map_b = _differentiable_factors(unit)
    a = (map_a @ ca).reshape(4, 8)
    b = (map_b @ cb).reshape(6, 4)
    v = w0 + scale * b @ a
    norm = torch.linalg.norm(v, dim=1, keepdim=True).detach()
    y = x @ (unit.magnitude.detach().double()[:, None] * v / norm).t() + layer.base_layer.bias
    ref_a, ref_b = torch.autograd.grad((y * upstream).sum(), (ca, cb))
    torch.testing.assert_close(got_a, ref_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_b, ref_b, rtol=1e-10, atol=1e-12)

    names = [n for n in params if n != mag_name]

    def by_coefficients(*values: Tensor) -> Tensor:
        out: Tensor = functional_call(model, dict(zip(names, values, strict=True)), (x,))
        return out

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    full = torch.autograd.gradcheck(
        by_coefficients, inputs, eps=1e-6, atol=1e-7, raise_exception=False
    )
    assert not full, "the DoRA norm should be detached (no gradient through ||V||)"


def _coefficient_grads(unit: nn.Module) -> tuple[Tensor, Tensor]:
    grads = []
    for factor in (unit.lora_A, unit.lora_B):
        p = factor.coefficients if isinstance(factor, selora.SparseSpectrum) else factor.weight
        assert p.grad is not None
        grads.append(p.grad.flatten())
    return grads[0], grads[1]


def _differentiable_factors(unit: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Leaf copies of the coefficients and the oracle maps coefficients -> flattened factor."""
    out = []
    maps = []
    for factor in (unit.lora_A, unit.lora_B):
        if isinstance(factor, selora.SparseSpectrum):
            coeffs = factor.coefficients.detach().double().clone()
            matrix = kit.basis_matrix(factor.basis.label(), factor.shape, factor.indices)
            maps.append(factor.scale_factor * matrix)  # M = c T(F)
        else:
            coeffs = factor.weight.detach().double().flatten().clone()
            maps.append(torch.eye(coeffs.numel(), dtype=torch.float64))
        out.append(coeffs.requires_grad_(True))
    return out[0], out[1], maps[0], maps[1]


@pytest.mark.parametrize("basis", kit.SPECTRAL_BASES)
def test_lora_coefficient_gradients_equal_the_adjoint_transform(basis: str) -> None:
    """dL/ds = T*(dL/dM) read on Omega, checked through the oracle's matrix."""
    model, layer = adapted_layer("lora", basis, d_out=8, sparse_ratio=0.5)  # db4-l2: 4 | d_out
    kit.perturb(model, 0.5)
    unit = layer.adapter
    x = torch.randn(3, 8, dtype=torch.float64)
    upstream = torch.randn(3, 8, dtype=torch.float64)
    (model(x) * upstream).sum().backward()
    got_a, got_b = _coefficient_grads(unit)
    ca, cb, map_a, map_b = _differentiable_factors(unit)
    a = (map_a @ ca).reshape(4, 8)
    b = (map_b @ cb).reshape(8, 4)
    y = x @ (layer.base_layer.weight.detach() + 2.0 * b @ a).t()
    ref_a, ref_b = torch.autograd.grad((y * upstream).sum(), (ca, cb))
    torch.testing.assert_close(got_a, ref_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_b, ref_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_dropout_acts_on_the_input_of_the_update_only(base: str) -> None:
    """lora: W0 x + s B A drop(x); dora: g * (W0 x + s B A drop(x)); hira: W0 x + (W0*BA) drop(x).

    (PEFT's DoRA also feeds drop(x) to the (g - 1) W0 x term; the two agree
    without dropout and in eval mode, see test_peft_parity.py.)
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    selora.inject(model, SpectralAdapter(basis="fft", base=base, r=4, alpha=8, dropout=0.4))
    kit.perturb(model, 0.5)
    layer = model[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.manual_seed(123)
    y = model(x)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, 0.4, training=True)
    assert not torch.equal(dropped, x)
    w0 = layer.base_layer.weight.detach()
    bias = layer.base_layer.bias.detach()
    a = kit.reference_factor(layer.adapter.lora_A)
    b = kit.reference_factor(layer.adapter.lora_B)
    if base == "lora":
        expected = x @ w0.t() + bias + 2.0 * dropped @ (b @ a).t()
    elif base == "dora":
        v = w0 + 2.0 * b @ a
        gain = layer.adapter.magnitude.detach() / torch.linalg.norm(v, dim=1)
        expected = gain * (x @ w0.t() + 2.0 * dropped @ (b @ a).t()) + bias
    else:
        expected = x @ w0.t() + bias + dropped @ (w0 * (b @ a)).t()
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    model.eval()
    torch.testing.assert_close(model(x), reference_output(layer, x), rtol=1e-10, atol=1e-12)
