"""X-LoRA through PEFT's front door, and both doors reading each other's checkpoints (issue 12)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from xlora_testkit import EXPERTS, base_model, outputs, perturb, token_batch

import selora
from selora import xlora
from selora.adapters.layer import SpectralLayer

pytest.importorskip("peft")
from peft import PeftModel, get_peft_model

from selora.xlora.peft import XLoRASeloraConfig, XLoRASeloraModel

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
TOKENS = token_batch(2, 7, seed=3)


def saved_experts(tmp_path: Path) -> dict[str, str]:
    """Three experts of different bases, each saved in selora's format."""
    base = base_model()
    paths = {}
    for i, (name, adapter) in enumerate(EXPERTS.items()):
        expert = perturb(selora.inject(copy.deepcopy(base), adapter, name=name), seed=i)
        selora.save_adapter(expert, tmp_path / name, name=name)
        paths[name] = str(tmp_path / name)
    return paths


def peft_model(tmp_path: Path, **options: object) -> nn.Module:
    config = XLoRASeloraConfig(experts=saved_experts(tmp_path), **options)  # type: ignore[arg-type]
    model = get_peft_model(base_model(), config)
    with torch.no_grad():
        for p in model.base_model.classifier.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(input_ids=TOKENS).logits
    return out


@pytest.mark.parametrize("layerwise", [False, True])
def test_peft_round_trip_is_bit_identical(tmp_path: Path, layerwise: bool) -> None:
    model = peft_model(tmp_path, layerwise=layerwise, top_k=2)
    assert isinstance(model.base_model, XLoRASeloraModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".selora_xlora_classifier." in n for n in trainable)
    expected = logits(model)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SELORA_XLORA" and config["experts"] == list(EXPERTS)
    assert set(config["expert_configs"]) == set(EXPERTS)  # self-contained: no paths needed
    for name in EXPERTS:
        for file in (tmp_path / name).iterdir():
            file.unlink()
    torch.manual_seed(7)
    fresh = PeftModel.from_pretrained(base_model(), tmp_path / "out").eval()
    assert torch.equal(logits(fresh), expected)
    with fresh.disable_adapter():
        assert torch.equal(logits(fresh), logits(base_model().eval()))


def test_each_door_reads_the_other_doors_checkpoint(tmp_path: Path) -> None:
    model = peft_model(tmp_path, top_k=2)
    expected = logits(model)
    model.save_pretrained(tmp_path / "peft")
    native = xlora.load(base_model(), tmp_path / "peft").eval()
    assert torch.equal(outputs(native, TOKENS), expected)
    native.save_pretrained(tmp_path / "native")
    back = PeftModel.from_pretrained(base_model(), tmp_path / "native").eval()
    assert torch.equal(logits(back), expected)


def test_peft_door_generates_and_refuses_merge_and_adapter_names(tmp_path: Path) -> None:
    model = peft_model(tmp_path)
    cached = model.generate(TOKENS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    uncached = model.generate(
        TOKENS, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(cached, uncached)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="adapter_names"):
        model(input_ids=TOKENS, adapter_names=["fourier", "wave"])


def test_peft_config_validates_like_the_native_one() -> None:
    with pytest.raises(ValueError, match=r"XLoRAConfig\.top_k"):
        XLoRASeloraConfig(experts=["a", "b"], top_k=3)
    with pytest.raises(ValueError, match=r"XLoRAConfig\.experts"):
        XLoRASeloraConfig()


def test_an_expert_saved_through_peft_loads_as_an_expert(tmp_path: Path) -> None:
    from selora.integrations.peft import SeloraConfig

    base = base_model()
    adapter = EXPERTS["wave"]
    peft_expert = get_peft_model(
        copy.deepcopy(base), SeloraConfig.from_spectral_adapter(adapter, init_weights=False)
    )
    peft_expert.save_pretrained(tmp_path / "peft_wave")
    native = perturb(selora.inject(copy.deepcopy(base), EXPERTS["fourier"], name="fourier"))
    selora.save_adapter(native, tmp_path / "fourier", name="fourier")
    paths = {"fourier": str(tmp_path / "fourier"), "wave": str(tmp_path / "peft_wave")}
    xmodel = xlora.wrap(copy.deepcopy(base), xlora.XLoRAConfig(experts=paths)).eval()
    alone = selora.load_adapter(copy.deepcopy(base), tmp_path / "peft_wave", name="wave").eval()
    one_hot = torch.tensor([0.0, 1.0])  # the classifier picks the PEFT-saved expert
    xmodel.classifier.forward = lambda h: one_hot.expand(*h.shape[:-1], 2)  # type: ignore[method-assign]
    torch.testing.assert_close(outputs(xmodel, TOKENS), outputs(alone, TOKENS), rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = peft_expert.eval()(input_ids=TOKENS).logits
    torch.testing.assert_close(outputs(alone, TOKENS), expected, rtol=0, atol=1e-6)


def test_disable_adapter_gives_the_base_model_bit_exactly(tmp_path: Path) -> None:
    expected = logits(base_model().eval())
    model = peft_model(tmp_path)
    mixed = logits(model)
    assert model.get_model_status().enabled is True
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
        assert model.get_model_status().enabled is False
    assert torch.equal(logits(model), mixed)
    plain = model.unload()
    assert not plain._forward_pre_hooks and not hasattr(plain, "peft_config")
    assert not any(isinstance(m, SpectralLayer) for m in plain.modules())
    assert torch.equal(logits(plain), expected)


def fingerprint(model: nn.Module) -> tuple[object, ...]:
    """Everything a failed load must leave as it was."""
    modules = [(n, type(m), m.training, dict(m._forward_hooks)) for n, m in model.named_modules()]
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    hooks = (dict(model._forward_pre_hooks), sorted(vars(model)))
    return modules, flags, hooks, {n: t.clone() for n, t in model.state_dict().items()}


def _drop_a_tensor(tensors: dict[str, Tensor]) -> None:
    del tensors[next(k for k in tensors if ".selora_units.wave." in k)]


def _misshape_a_tensor(tensors: dict[str, Tensor]) -> None:
    key = next(k for k in tensors if "selora_xlora_classifier" in k)
    tensors[key] = torch.zeros(3, 3)


def _add_a_tensor(tensors: dict[str, Tensor]) -> None:
    tensors["base_model.model.lm_head.weight"] = torch.zeros(64, 32)


def _edit_config(old: str, new: str) -> object:
    def apply(path: Path) -> None:
        file = path / "adapter_config.json"
        file.write_text(file.read_text().replace(old, new))

    return apply


def _edit_tensors(edit: object) -> object:
    from safetensors.torch import load_file, save_file

    def apply(path: Path) -> None:
        file = path / "adapter_model.safetensors"
        tensors = load_file(str(file))
        edit(tensors)  # type: ignore[operator]
        save_file(tensors, str(file), metadata={"format": "pt"})

    return apply


BAD_CHECKPOINTS = {
    "edited config": (_edit_config('"top_k": 2', '"top_k": 1'), "not saved with this X-LoRA"),
    "bad field": (_edit_config('"top_k": 2', '"top_k": 0'), r"XLoRAConfig\.top_k"),
    "other version": (
        _edit_config('"selora_format_version": 2', '"selora_format_version": 3'),
        "reads version 2",
    ),
    "foreign tensor": (_edit_tensors(_add_a_tensor), "lm_head"),
    "no weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "does not exist"),
    "truncated weights": (
        lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00"),
        "not a readable safetensors",
    ),
    "missing tensor": (_edit_tensors(_drop_a_tensor), "wave"),
    "misshapen tensor": (_edit_tensors(_misshape_a_tensor), "shape"),
    "another base model": (None, "does not adapt"),
    "an expert's name taken": (None, "already holds an adapter named 'wave'"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_failed_peft_from_pretrained_leaves_the_model_as_it_was(
    tmp_path: Path, case: str
) -> None:
    from xlora_testkit import tiny_gpt2

    model = peft_model(tmp_path, top_k=2)
    model.save_pretrained(tmp_path / "out")
    edit, match = BAD_CHECKPOINTS[case]
    if edit is not None:
        edit(tmp_path / "out")  # type: ignore[operator]
    base = base_model(tiny_gpt2) if case == "another base model" else base_model()
    if case == "an expert's name taken":  # refused while the tuner injects the experts
        selora.inject(base, EXPERTS["wave"], name="wave")
    before = fingerprint(base)
    with pytest.raises((ValueError, OSError, TypeError), match=match):
        PeftModel.from_pretrained(base, tmp_path / "out")
    after = fingerprint(base)
    assert after[:3] == before[:3]
    assert after[3].keys() == before[3].keys()  # type: ignore[attr-defined]
    assert all(torch.equal(after[3][k], v) for k, v in before[3].items())  # type: ignore[index]
    held = {n for m in base.modules() if isinstance(m, SpectralLayer) for n in m.selora_units}
    assert held == ({"wave"} if case == "an expert's name taken" else set())
