"""Quantized base layers (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) through ``selora.inject``.

Oracles: the forward is the dequantized weight :math:`\\hat W_0` in float64
plus the dense update; a merge is bitsandbytes' own quantization of
:math:`\\hat W_0 + \\Delta W` (same kind and options), an unmerge that of the
dequantized merged weight minus :math:`\\Delta W`. bitsandbytes runs on the CPU.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from bnb_layers import QUANTIZERS, quantize_4bit
from torch import nn

import selora
from selora.adapters import quantized as quantized_module
from selora.adapters.quantized import read_weight

bnb = pytest.importorskip("bitsandbytes")

KINDS = tuple(QUANTIZERS)
BASES = ("lora", "dora", "hira")


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cast from torch.float32 to float16.*")
        yield


def _model(kind: str, base: str = "lora", basis: str | None = "dct", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(QUANTIZERS[kind](nn.Linear(64, 32)))
    adapter = selora.SpectralAdapter(
        basis=basis, r=4, base=base, target_modules=["0"], init_weights=False
    )
    selora.inject(model, adapter)
    return model


def _dense_weight(layer: selora.SpectralLayer, weight0: torch.Tensor) -> torch.Tensor:
    """:math:`W_0 + W_0 \\odot S + C` in float64 from the unit's merge update."""
    with torch.no_grad():
        scale, shift = layer.unit("default").update(weight0.float())
    dense = weight0.double()
    if scale is not None:
        dense = dense + weight0.double() * scale.double()
    if shift is not None:
        dense = dense + shift.double()
    return dense


def _requantized(layer: Any, target: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own quantize / dequantize of ``target`` with the layer's options."""
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        data, state = bnb.functional.quantize_4bit(
            target.float().contiguous(),
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
        )
        out: torch.Tensor = bnb.functional.dequantize_4bit(data, state)
        return out
    codes, stats, _ = bnb.functional.int8_vectorwise_quant(target.to(torch.float16))
    out = bnb.functional.int8_vectorwise_dequant(codes, stats)
    return out


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_dequantized_weight_plus_the_update(kind: str, base: str) -> None:
    model = _model(kind, base)
    layer = model[0]
    assert isinstance(layer, selora.SpectralLayer) and layer.quantized
    weight0 = read_weight(layer.base_layer)
    assert weight0.shape == (32, 64) and weight0.is_floating_point()
    x = torch.randn(5, 64)
    expected = x.double() @ _dense_weight(layer, weight0).t() + layer.bias.double()
    out = model(x)  # training mode: bitsandbytes computes with the dequantized weight
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    out.square().sum().backward()
    grads = [p.grad for p in layer.unit("default").parameters()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_forward_adds_the_update_to_the_quantized_output(kind: str, base: str) -> None:
    """In eval, bitsandbytes uses its own kernels (4-bit: a CPU layout); the update is exact."""
    model = _model(kind, base).eval()
    layer = model[0]
    weight0 = read_weight(layer.base_layer)
    x = torch.randn(5, 64)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        out = model(x)
    # On an AVX512-BF16 CPU the weight is now in bitsandbytes' CPU layout, whose block
    # scales are bfloat16: it still dequantizes to W0, up to bfloat16's rounding.
    torch.testing.assert_close(read_weight(layer.base_layer), weight0, atol=1e-6, rtol=2**-8)
    weight0 = read_weight(layer.base_layer)
    dense = _dense_weight(layer, weight0)
    expected = base_out.double() + x.double() @ (dense - weight0.double()).t()
    if base == "dora":
        # DoRA rescales the frozen output by g = 1 + S, bitsandbytes' own rounding of W0 x too
        scale = layer.unit("default").update(weight0.float())[0]
        assert scale is not None
        rounding = base_out.double() - layer.bias.double() - x.double() @ weight0.double().t()
        expected = expected + scale.double().t() * rounding
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(out, base_out, atol=1e-3)  # the update is there


def test_lora_forward_dequantizes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = quantized_module._dequantize_4bit

    def counting(module: nn.Module) -> torch.Tensor:
        calls.append(1)
        return real(module)

    monkeypatch.setattr(quantized_module, "_dequantize_4bit", counting)
    model = _model("4bit", "lora")
    calls.clear()
    model(torch.randn(3, 64))
    assert calls == []
    selora.inject(
        model, selora.SpectralAdapter(basis="dct", r=2, base="hira", target_modules=["0"]), "h"
    )
    model[0].set_adapter(["default", "h"])
    calls.clear()
    model(torch.randn(3, 64))
    assert calls == [1]  # once per call, for all the units that read W0


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_unmerge_restores(kind: str, base: str) -> None:
    model = _model(kind, base)  # training mode: no CPU layout (see the test after this one)
    layer = model[0]
    weight_type = type(layer.base_layer.weight)
    weight0 = read_weight(layer.base_layer)
    dense = _dense_weight(layer, weight0)
    x = torch.randn(5, 64)
    with torch.no_grad():
        unmerged = model(x)
        layer.merge(safe_merge=True)
        merged = model(x)
    stored = layer.base_layer.weight
    assert type(stored) is weight_type and stored.dtype in (torch.uint8, torch.int8)
    assert layer.merged_adapters == ["default"]
    if kind == "4bit":
        assert stored.quant_type == "nf4" and stored.blocksize == 64
    merged_weight = read_weight(layer.base_layer)
    # exactly bitsandbytes' quantization of the float merged weight
    torch.testing.assert_close(merged_weight, _requantized(layer.base_layer, dense), **_tight())
    step = _step(kind, dense)
    assert float((merged_weight.double() - dense).abs().max()) <= step
    assert float((merged - unmerged).abs().max()) <= step * x.abs().sum(dim=1).max()
    with torch.no_grad():
        layer.unmerge()
    assert layer.merged_adapters == [] and type(layer.base_layer.weight) is weight_type
    restored = read_weight(layer.base_layer)
    # W0 from the merged weight (LoRA: minus dW; DoRA / HiRA: the inverse affine map)
    scale, shift = layer.unit("default").merged_update()
    w0_float = merged_weight.double()
    if shift is not None:
        w0_float = w0_float - shift.double()
    if scale is not None:
        w0_float = w0_float / (1 + scale.double())
    torch.testing.assert_close(restored, _requantized(layer.base_layer, w0_float), **_tight())
    assert float((restored - weight0).abs().max()) <= 2 * step


def test_merge_after_an_eval_forward_keeps_the_dtype() -> None:
    """bitsandbytes' CPU layout (AVX512-BF16) holds bfloat16 scales; the merge keeps float32."""
    model = _model("4bit", "lora").eval()
    layer = model[0]
    x = torch.randn(5, 64)
    with torch.no_grad():
        model(x)
        weight0 = read_weight(layer.base_layer)
        assert weight0.dtype == torch.float32
        dense = _dense_weight(layer, weight0)
        layer.merge()
        merged_weight = read_weight(layer.base_layer)
        assert merged_weight.dtype == torch.float32
        torch.testing.assert_close(merged_weight, _requantized(layer.base_layer, dense), **_tight())
        model(x)  # packs again
        layer.unmerge()
    assert float((read_weight(layer.base_layer) - weight0).abs().max()) <= 2 * _step("4bit", dense)


def _tight() -> dict[str, float]:
    # float32 rounding of the sum may move an entry across a quantization boundary rarely
    return {"atol": 1e-6, "rtol": 0.0}


def _step(kind: str, dense: torch.Tensor) -> float:
    """An upper bound of one rounding: half the widest gap of the code, times the scale."""
    dense = dense.detach()
    if kind == "8bit":  # row-wise absmax / 127, after a float16 cast
        return float(dense.abs().max()) / 127 * 0.5 + float(dense.abs().max()) * 1e-3
    return float(dense.abs().max()) * 0.15  # NF4: widest gap 0.277 of the block's absmax


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_nan_and_writes_nothing(kind: str) -> None:
    model = _model(kind)
    layer = model[0]
    before = layer.base_layer.weight
    with torch.no_grad():
        layer.unit("default").lora_B.coefficients.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert layer.base_layer.weight is before and not layer.merged_adapters


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_on_a_quantized_layer(kind: str) -> None:
    model = _model(kind, "lora").eval()
    selora.inject(
        model,
        selora.SpectralAdapter(basis="dct", r=2, base="dora", target_modules=["0"]),
        "other",
    )
    x = torch.randn(4, 64)
    names = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        mixed = model[0](x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                alone = model[0].base_layer(x[i : i + 1])
            else:
                model[0].set_adapter(name)
                alone = model[0](x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


class _Fake4bit(nn.Linear):
    """Stands in for a quantized class selora does not know (an ``nn.Linear`` subclass)."""


_Fake4bit.__module__ = "hqq.core.quantize"


def test_unsupported_quantized_layers_are_refused_by_name() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hqq = _Fake4bit(16, 16)
            self.fresh = bnb.nn.Linear4bit(16, 16)  # not quantized yet (never moved)

    for name, cls in (("hqq", "_Fake4bit"), ("fresh", "Linear4bit")):
        with pytest.raises(TypeError, match=rf"{name}.*{cls}"):
            selora.inject(Holder(), selora.SpectralAdapter(basis="dct", r=2, target_modules=[name]))


def test_fp4_and_bfloat16_4bit_layers() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    model = nn.Sequential(quantize_4bit(linear, "fp4", compute_dtype=torch.bfloat16))
    selora.inject(
        model, selora.SpectralAdapter(basis="dct", r=4, target_modules=["0"], init_weights=False)
    )
    layer = model[0]
    weight0 = read_weight(layer.base_layer)
    assert weight0.dtype == torch.bfloat16
    with torch.no_grad():
        layer.merge()
    assert layer.base_layer.weight.quant_type == "fp4"
    assert read_weight(layer.base_layer).dtype == torch.bfloat16
