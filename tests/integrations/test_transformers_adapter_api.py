"""transformers' own adapter API (``PreTrainedModel.load_adapter`` / ``add_adapter``) on SELORA.

transformers reads ``peft_config.peft_type.value``; selora's ``peft_type`` used
to be a plain string, so these failed with ``AttributeError: ... 'value'``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import inputs, logits, perturb, tiny_gpt2, tiny_llama
from torch import nn

from selora.integrations.peft import PEFT_TYPE, SeloraConfig, SeloraPeftType


def config(basis: str | None = "fft", base: str = "lora") -> SeloraConfig:
    return SeloraConfig(basis=basis, base=base, r=4, target_modules=["q_proj", "v_proj", "c_attn"])


def test_peft_type_answers_like_peft_s_enum() -> None:
    assert isinstance(PEFT_TYPE, str) and isinstance(PEFT_TYPE, SeloraPeftType)
    assert PEFT_TYPE == "SELORA" and PEFT_TYPE.value == "SELORA" and PEFT_TYPE.name == "SELORA"
    assert hash(PEFT_TYPE) == hash("SELORA")
    assert json.loads(json.dumps({"peft_type": PEFT_TYPE})) == {"peft_type": "SELORA"}
    restored = SeloraConfig.from_peft_type(**config().to_dict())
    assert type(restored.peft_type) is SeloraPeftType


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize(("basis", "base"), [("fft", "lora"), ("coif", "dora"), ("dct", "hira")])
def test_transformers_load_adapter_equals_peft_from_pretrained(
    tmp_path: Path, build: type[nn.Module], basis: str, base: str
) -> None:
    trained = get_peft_model(build(), config(basis, base))
    perturb(trained)  # B != 0, so the adapter changes the output
    trained.save_pretrained(tmp_path)
    ids = inputs()
    peft_reloaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    native = build()
    base_out = logits(native, ids)
    native.load_adapter(str(tmp_path))  # transformers' API: read peft_type.value
    native.eval()
    out = logits(native, ids)
    assert torch.equal(out, logits(peft_reloaded, ids))
    assert not torch.allclose(out, base_out)


def test_transformers_add_adapter_reaches_peft_s_version_check_only() -> None:
    """transformers 5.24's ``add_adapter`` wants PEFT >= 0.22, which is not released.

    With a PEFT it accepts, the adapter is added and B = 0 leaves the output
    unchanged; with an older PEFT, transformers' own version check refuses it.
    Either way the old ``AttributeError`` on ``peft_type.value`` is gone.
    """
    model = tiny_llama()
    ids = inputs()
    before = logits(model, ids)
    try:
        model.add_adapter(config())
    except ValueError as exc:
        assert "version of PEFT" in str(exc), exc
        return
    assert torch.equal(logits(model, ids), before)


def test_peft_hotswap_refuses_selora_saying_so(tmp_path: Path) -> None:
    """PEFT's ``hotswap_adapter`` supports LoRA only; on SELORA it must refuse, naming it.

    It used to fail with ``AttributeError: 'str' object has no attribute 'value'``.
    """
    from peft.utils.hotswap import hotswap_adapter

    other = get_peft_model(tiny_llama(), config())
    perturb(other)
    other.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    before = logits(model, inputs())
    with pytest.raises(ValueError, match="SELORA"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default")
    assert torch.equal(logits(model, inputs()), before)  # refused before changing anything


def _edit_file(path: Path, edit: object) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)  # type: ignore[operator]
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("door", ["transformers", "peft"])
def test_every_loader_applies_the_stored_locations(tmp_path: Path, door: str) -> None:
    """Locations come from the file, never from the seed: a set no generator gives loads."""
    trained = get_peft_model(tiny_llama(), config("dct", "lora"))
    perturb(trained)
    spectra = [m for m in trained.modules() if type(m).__name__ == "SparseSpectrum"]
    with torch.no_grad():  # stored sets that the seed does not regenerate
        for spectrum in spectra:
            spectrum.set_locations(spectrum.indices.flip(0).roll(3))
    trained.eval()
    ids = inputs()
    expected = logits(trained, ids)
    trained.save_pretrained(tmp_path)
    if door == "peft":
        model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    else:
        model = tiny_llama()
        model.load_adapter(str(tmp_path))
        model.eval()
    assert torch.equal(logits(model, ids), expected)


def test_transformers_load_adapter_refuses_a_base_weight_and_changes_nothing(
    tmp_path: Path,
) -> None:
    from selora import AdapterCheckpointError, SpectralLayer

    trained = get_peft_model(tiny_llama(), config())
    trained.save_pretrained(tmp_path)
    _edit_file(
        tmp_path,
        lambda t: t.__setitem__(
            "base_model.model.model.embed_tokens.weight", torch.full((100, 32), 7.0)
        ),
    )
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterCheckpointError, match="embed_tokens"):
        model.load_adapter(str(tmp_path))
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
