"""QLoRA through both front doors, and the merge error against PEFT's LoRA on the same layer.

* A tiny LLaMA whose linear layers are bitsandbytes 4-bit layers (quantized on
  the CPU), a selora adapter, a few AdamW steps: the loss falls, and the
  adapter saves and reloads bit-identically (``selora.save_adapter`` /
  ``load_adapter`` and PEFT's ``save_pretrained`` / ``from_pretrained``).
* Merging into a quantized layer requantizes. The same dense update (a dense
  selora LoRA adapter's factors copied into a PEFT LoRA adapter) merged by
  both into copies of one quantized layer: selora's error against the exact
  :math:`\\hat W_0 + \\Delta W` is no worse than PEFT's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from bnb_layers import QUANTIZERS, quantize_linears
from tiny_models import VOCAB, tiny_llama
from torch import nn

import selora
from selora.adapters.quantized import read_weight
from selora.integrations.peft import SeloraConfig

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(rounding errors|cast from torch).*")
        yield


def _qlora_base(seed: int = 0) -> nn.Module:
    model = quantize_linears(tiny_llama(seed), "4bit")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    return model


def _batch(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (4, 12), generator=generator)


def _train(model: nn.Module, ids: torch.Tensor, steps: int = 8) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "selora_units" in k}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_qlora_native(tmp_path: Path) -> None:
    model = _qlora_base()
    adapter = selora.SpectralAdapter(basis="dct", r=4, target_modules=TARGETS)
    selora.inject(model, adapter)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in _layers(model))
    ids = _batch()
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(isinstance(m.base_layer.weight, bnb.nn.Params4bit) for m in _layers(model))
    selora.save_adapter(model, tmp_path)
    reloaded = selora.load_adapter(_qlora_base(), tmp_path)
    _assert_identical(_adapter_state(model), _adapter_state(reloaded))
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    assert not torch.equal(_logits(model, ids), _logits(_qlora_base(), ids))


def test_qlora_peft(tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model

    config = SeloraConfig(basis="dct", r=4, target_modules=TARGETS)
    model = get_peft_model(_qlora_base(), config)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in _layers(model))
    ids = _batch()
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.05, losses
    model.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(_qlora_base(), str(tmp_path))
    _assert_identical(_adapter_state(model), _adapter_state(reloaded))
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    # and the other door reads the same directory
    native = selora.load_adapter(_qlora_base(), tmp_path)
    assert torch.equal(_logits(model, ids), _logits(native, ids))


def _layers(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, selora.SpectralLayer)]


# --- merge error against PEFT LoRA -------------------------------------------------------------


def _merge_errors(kind: str, door: str, seed: int) -> tuple[float, float, float]:
    """Max |merged - (W0 + dW)| for selora and PEFT LoRA on copies of one layer, and max |dW|."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    holder = nn.Sequential(QUANTIZERS[kind](nn.Linear(64, 48)))
    twin = copy.deepcopy(holder)
    if door == "native":
        ours: Any = holder
        selora.inject(
            ours, selora.SpectralAdapter(basis=None, r=4, target_modules=["0"], init_weights=False)
        )
        layer = ours[0]
    else:
        config = SeloraConfig(basis=None, r=4, target_modules=["0"], init_weights=False)
        ours = get_peft_model(holder, config)
        layer = ours.base_model.model[0]
    twin.is_loaded_in_8bit = kind == "8bit"  # what PEFT reads to dispatch its bnb layers
    twin.is_loaded_in_4bit = kind == "4bit"
    theirs = get_peft_model(
        twin, LoraConfig(r=4, lora_alpha=layer.unit("default").scaling * 4, target_modules=["0"])
    )
    lora = theirs.base_model.model[0]
    assert type(lora).__module__.endswith("lora.bnb")
    unit = layer.unit("default")
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(unit.lora_A(None))
        lora.lora_B["default"].weight.copy_(unit.lora_B(None))
        weight0 = read_weight(layer.base_layer).double()
        torch.testing.assert_close(weight0, read_weight(lora.base_layer).double(), atol=0, rtol=0)
        delta = (unit.lora_B(None).double() @ unit.lora_A(None).double()) * unit.scaling
        x = torch.randn(3, 64)
        layer.train()  # bitsandbytes computes with the dequantized weight here
        lora.train()
        torch.testing.assert_close(layer(x), lora(x), atol=1e-5, rtol=1e-5)
        layer.merge()
        lora.merge()
    exact = weight0 + delta
    ours_error = float((read_weight(layer.base_layer).double() - exact).abs().max())
    peft_error = float((read_weight(lora.base_layer).double() - exact).abs().max())
    return ours_error, peft_error, float(delta.abs().max())


@pytest.mark.parametrize("door", ["native", "peft"])
@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_merge_error_is_no_worse_than_peft_lora(kind: str, door: str) -> None:
    for seed in range(3):
        ours, theirs, scale = _merge_errors(kind, door, seed)
        assert 0 < ours <= theirs * (1 + 1e-6) + 1e-7, (ours, theirs)
        assert ours < scale  # the update is there: far more than its rounding


def test_peft_bridge_refuses_an_unsupported_quantized_layer() -> None:
    from peft import get_peft_model

    model = nn.Sequential(bnb.nn.Linear4bit(16, 16))  # never moved: not quantized yet
    with pytest.raises(TypeError, match=r"'0'.*Linear4bit"):
        get_peft_model(model, SeloraConfig(basis="dct", r=2, target_modules=["0"]))
