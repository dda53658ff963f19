"""The ``scale`` option: validated, saved in checkpoints, and never given a default at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import selora
from selora import SparseSpectrum, SpectralAdapter, inject
from selora.adapters.io import CONFIG_NAME, load_adapter, read_adapter, save_adapter


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _trained(adapter: SpectralAdapter) -> nn.Module:
    model = inject(_mlp(), adapter)
    with torch.no_grad():
        for spectrum in model.modules():
            if isinstance(spectrum, SparseSpectrum):
                spectrum.coefficients.normal_(0.0, 0.05)
    return model.eval()


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def test_scale_is_a_validated_field_that_defaults_to_lora() -> None:
    assert SpectralAdapter().scale == "lora"
    assert SpectralAdapter(scale="paper").to_dict()["scale"] == "paper"
    assert SpectralAdapter.from_dict(SpectralAdapter(scale="paper").to_dict()).scale == "paper"
    for bad in ("Paper", "none", None, 1):
        with pytest.raises(ValueError, match=r"SpectralAdapter\.scale: must be one of"):
            SpectralAdapter(scale=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", ["lora", "paper"])
def test_every_factor_takes_the_adapter_scale(scale: str) -> None:
    model = inject(_mlp(), SpectralAdapter(basis="fft", r=4, scale=scale))  # type: ignore[arg-type]
    spectra = [m for m in model.modules() if isinstance(m, SparseSpectrum)]
    assert spectra and all(s.scale == scale for s in spectra)
    assert all((s.scale_factor == 1.0) == (scale == "paper") for s in spectra)


def test_both_scales_give_the_same_model_at_init() -> None:
    x = torch.randn(4, 16)
    outs = []
    for scale in ("lora", "paper"):
        model = inject(_mlp(), SpectralAdapter(basis="bior", r=4, scale=scale))  # type: ignore[arg-type]
        a = model[0].adapter.lora_A
        a.reset_parameters(torch.Generator().manual_seed(3))
        outs.append((a().detach(), _out(model, x)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)  # B = 0: the base model


@pytest.mark.parametrize("scale", ["lora", "paper"])
def test_a_checkpoint_records_its_scale_and_reloads_it(tmp_path: Path, scale: str) -> None:
    model = _trained(SpectralAdapter(basis="fft", r=4, scale=scale))  # type: ignore[arg-type]
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["scale"] == scale
    fresh = load_adapter(_mlp(), tmp_path)
    assert selora.adapter_config(fresh).scale == scale
    x = torch.randn(4, 16)
    assert torch.equal(_out(fresh.eval(), x), _out(model, x))


def test_a_checkpoint_without_scale_is_refused(tmp_path: Path) -> None:
    # Before the option existed a checkpoint computed "paper"; a missing field is never
    # given a default at load (a default that changes what a checkpoint computes).
    model = _trained(SpectralAdapter(basis="fft", r=4, scale="paper"))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["scale"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(selora.AdapterCheckpointError, match="no 'scale'"):
        read_adapter(tmp_path)
    fresh = _mlp()
    with pytest.raises(selora.AdapterCheckpointError, match="no 'scale'"):
        load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, selora.SpectralLayer) for m in fresh.modules())


def test_a_checkpoint_of_another_scale_is_another_adapter(tmp_path: Path) -> None:
    save_adapter(_trained(SpectralAdapter(basis="fft", r=4, scale="paper")), tmp_path)
    x = torch.randn(4, 16)
    same = inject(_mlp(), SpectralAdapter(basis="fft", r=4, scale="paper"))
    expected = _out(_trained(SpectralAdapter(basis="fft", r=4, scale="paper")), x)
    assert torch.equal(_out(load_adapter(same, tmp_path).eval(), x), expected)
    other = inject(_mlp(), SpectralAdapter(basis="fft", r=4))
    with pytest.raises(selora.AdapterCheckpointError, match=r"differs in \['scale'\]"):
        load_adapter(other, tmp_path)


def test_peft_config_carries_the_scale(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from selora.integrations.peft import SeloraConfig

    assert SeloraConfig(basis="fft").scale == "lora"
    assert SeloraConfig(basis="fft", scale="paper").to_spectral_adapter().scale == "paper"
    adapter = SpectralAdapter(basis="dct", r=4, scale="paper", target_modules=("q",))
    assert SeloraConfig.from_spectral_adapter(adapter).to_spectral_adapter() == adapter
    with pytest.raises(ValueError, match=r"SpectralAdapter\.scale"):
        SeloraConfig(basis="fft", scale="bogus")

    SeloraConfig(basis="fft", scale="lora").save_pretrained(str(tmp_path / "new"))
    assert SeloraConfig.from_pretrained(str(tmp_path / "new")).scale == "lora"
    SeloraConfig(basis="fft", scale="paper").save_pretrained(str(tmp_path / "old"))
    path = tmp_path / "old" / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["scale"] == "paper"
    assert SeloraConfig.from_pretrained(str(tmp_path / "old")).scale == "paper"
    del saved["scale"]  # never given a default at load
    path.write_text(json.dumps(saved))
    with pytest.raises(selora.AdapterCheckpointError, match="no 'scale'"):
        SeloraConfig.from_pretrained(str(tmp_path / "old"))
