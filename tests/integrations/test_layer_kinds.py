"""``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d`` layers, through both front doors.

The oracle is dense and float64: the merged weight (LoRA: :math:`W_0 +
\\tfrac{\\alpha}{r} BA`; DoRA: its rows rescaled to :math:`m`; HiRA:
:math:`W_0 \\odot (1 + BA)`), reshaped to the embedding table or the kernel and
applied with ``torch.nn.functional``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selora
from selora import SpectralAdapter
from selora.adapters import lora as lora_module
from selora.adapters.layer_kinds import EmbeddingKind
from selora.integrations.peft import SeloraConfig

peft = pytest.importorskip("peft")

DOORS = ("native", "peft")
BASES = ("lora", "dora", "hira")
KINDS = ("emb", "c1", "c2", "c2r")


class Kinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 6, 3, stride=2, padding=1, dilation=2)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=1)
        self.c2r = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.emb(ids))
        return out


def _model() -> Kinds:
    torch.manual_seed(0)
    return Kinds().double()


def _input(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "emb":
        return torch.randint(0, 20, (2, 5), generator=gen)
    shape = {"c1": (2, 8, 11), "c2": (2, 3, 7, 6), "c2r": (2, 3, 6, 5)}[kind]
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _adapt(model: nn.Module, door: str, adapter: SpectralAdapter) -> nn.Module:
    if door == "native":
        return selora.inject(model, adapter)
    return peft.get_peft_model(model, SeloraConfig.from_spectral_adapter(adapter))


def _layer(model: nn.Module, kind: str) -> selora.SpectralLayer:
    found = [
        m
        for n, m in model.named_modules()
        if isinstance(m, selora.SpectralLayer) and n.endswith(kind)
    ]
    assert len(found) == 1
    return found[0]


def _adapter(base: str, basis: str | None = "dct") -> SpectralAdapter:
    return SpectralAdapter(
        basis=basis, base=base, r=3, alpha=6, target_modules=list(KINDS), init_weights=False
    )


@torch.no_grad()
def _perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, selora.SpectralLayer):
            for p in m.selora_units.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1)


def _merged_weight(layer: selora.SpectralLayer, w0: torch.Tensor, base: str) -> torch.Tensor:
    """The dense float64 merged weight, ``(d_out, d_in)``."""
    unit = layer.adapter
    a = unit.lora_A(None).detach().double()
    b = unit.lora_B(None).detach().double()
    flat = w0.reshape(w0.shape[0], -1) if w0.ndim > 2 else w0.t()  # embedding: table^T
    if base == "lora":
        return flat + unit.scaling * (b @ a)
    if base == "dora":
        v = flat + unit.scaling * (b @ a)
        magnitude = unit.magnitude.detach().double()
        return (magnitude / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v
    return flat * (1 + b @ a)


def _apply(module: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a dense ``(d_out, d_in)`` weight the way ``module`` applies its own."""
    if isinstance(module, nn.Embedding):
        return F.embedding(x, flat.t(), padding_idx=module.padding_idx)
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    weight = flat.reshape(module.weight.shape)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * len(module.kernel_size)
    return conv(x, weight, module.bias, module.stride, padding, module.dilation)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("basis", [None, "dct", "fft"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_forward_equals_the_dense_float64_reference(
    door: str, base: str, basis: str | None, kind: str
) -> None:
    plain = _model()
    model = _adapt(copy.deepcopy(plain), door, _adapter(base, basis))
    _perturb(model)
    layer = _layer(model, kind)
    x = _input(kind)
    original = getattr(plain, kind)
    reference = _apply(original, _merged_weight(layer, original.weight.detach(), base), x)
    out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, original(x))  # the adapter changes the output


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_matches_the_reference_and_restores_w0(
    door: str, base: str, kind: str
) -> None:
    plain = _model()
    model = _adapt(copy.deepcopy(plain), door, _adapter(base))
    _perturb(model)
    layer = _layer(model, kind)
    original = getattr(plain, kind)
    x = _input(kind)
    before = layer(x)
    expected = _merged_weight(layer, original.weight.detach(), base)
    layer.merge(safe_merge=True)
    stored = layer.weight.t() if kind == "emb" else layer.weight.reshape(expected.shape)
    torch.testing.assert_close(stored, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original.weight, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("base", BASES)
def test_a_checkpoint_reloads_bit_identically(door: str, base: str, tmp_path: Path) -> None:
    model = _adapt(_model(), door, _adapter(base))
    _perturb(model)
    if door == "native":
        selora.save_adapter(model, tmp_path)
        loaded = selora.load_adapter(_model(), tmp_path)
    else:
        model.save_pretrained(str(tmp_path))
        loaded = peft.PeftModel.from_pretrained(_model(), str(tmp_path))
    for kind in KINDS:
        saved, back = _layer(model, kind), _layer(loaded, kind)
        want = dict(saved.selora_units.state_dict())
        got = dict(back.selora_units.state_dict())
        assert want.keys() == got.keys()
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), key
        x = _input(kind)
        assert torch.equal(back.eval()(x), saved.eval()(x))


def test_the_embedding_lookup_forms_no_dense_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    model = selora.inject(_model(), _adapter("lora", None))
    layer = _layer(model, "emb")

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the dense update was formed")

    monkeypatch.setattr(lora_module, "delta_weight", refuse)
    monkeypatch.setattr(EmbeddingKind, "dense", refuse)
    ids = torch.tensor([[0, 3, 3, 7]])
    layer(ids).sum().backward()
    grad = layer.adapter.lora_A.weight.grad
    assert grad is not None
    used = grad.abs().sum(dim=0) != 0
    # a gather: only the ids' columns of A get a gradient, and not padding_idx's (as PEFT)
    assert used.nonzero().flatten().tolist() == [3, 7]


@pytest.mark.parametrize("door", DOORS)
def test_grouped_convolutions_are_refused_naming_the_layer(door: str) -> None:
    model = nn.Sequential()
    model.add_module("grouped", nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match=r"'grouped'.*groups=2"):
        _adapt(model, door, SpectralAdapter(target_modules=["grouped"]))
    assert not isinstance(model.grouped, selora.SpectralLayer)


@pytest.mark.parametrize("door", DOORS)
def test_an_embedding_with_max_norm_is_refused_naming_it(door: str) -> None:
    model = nn.Sequential()
    model.add_module("table", nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(TypeError, match=r"'table'.*max_norm"):
        _adapt(model, door, SpectralAdapter(target_modules=["table"]))


@pytest.mark.parametrize("door", DOORS)
def test_all_linear_adapts_no_embedding_or_convolution(door: str) -> None:
    model = _adapt(_model(), door, SpectralAdapter(target_modules="all-linear"))
    adapted = [n for n, m in model.named_modules() if isinstance(m, selora.SpectralLayer)]
    assert [n.rpartition(".")[2] for n in adapted] == ["fc"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_mixed_batch_equals_each_row_alone(kind: str) -> None:
    model = selora.inject(_model(), _adapter("lora"), name="a")
    selora.inject(model, _adapter("dora"), name="b")
    _perturb(model)
    model.eval()
    layer = _layer(model, kind)
    x = _input(kind)
    names = ["a", "b"]
    mixed = layer(x, adapter_names=names)
    for i, name in enumerate(names):
        layer.set_adapter(name)
        torch.testing.assert_close(mixed[i : i + 1], layer(x[i : i + 1]), rtol=0, atol=1e-13)


def test_conv_dropout_and_training_step_run() -> None:
    adapter = SpectralAdapter(basis="dct", r=2, target_modules=["c2"], dropout=0.5)
    model = selora.inject(_model(), adapter)
    layer = _layer(model, "c2")
    x = _input("c2")
    loss = layer(x).square().mean()
    loss.backward()
    grads = [p.grad for p in layer.selora_units.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_peft_saved_embed_tokens_table_reloads_as_peft_lora_does(tmp_path: Path) -> None:
    from tiny_models import tiny_llama

    config = SeloraConfig(target_modules=["embed_tokens", "q_proj"], init_weights=False)
    model = peft.get_peft_model(tiny_llama(), config)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(loaded(input_ids=ids).logits, out)
    with pytest.raises(selora.AdapterCheckpointError, match=r"base_layer\.weight"):
        selora.load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("kind", ["emb", "c2"])
def test_dense_factors_equal_peft_lora_on_the_same_factors(kind: str) -> None:
    # Not c1 / c2r: PEFT 0.21's LoRA applies A without the layer's dilation and
    # padding_mode, so its forward differs from its own merged weight there;
    # selora's equals the merged weight (the float64 oracle above).
    adapter = SpectralAdapter(basis=None, r=3, alpha=6, target_modules=[kind], init_weights=False)
    ours = _layer(selora.inject(_model(), adapter), kind)
    lora_config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=[kind])
    theirs = getattr(peft.get_peft_model(_model(), lora_config).base_model.model, kind)
    a = ours.adapter.lora_A(None).detach()
    b = ours.adapter.lora_B(None).detach()
    with torch.no_grad():
        if kind == "emb":
            theirs.lora_embedding_A["default"].copy_(a)
            theirs.lora_embedding_B["default"].copy_(b)
        else:
            theirs.lora_A["default"].weight.copy_(a.reshape(theirs.lora_A["default"].weight.shape))
            theirs.lora_B["default"].weight.copy_(b.reshape(theirs.lora_B["default"].weight.shape))
    x = _input(kind)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
