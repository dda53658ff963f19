"""PEFT checkpoints of the bridge: saved here, loaded with PeftModel.from_pretrained elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from tiny_models import adapted_pair, inputs, logits, subprocess_env

import selora

# PeftModel reads transformers' deprecated is_gradient_checkpointing
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CASES: dict[str, tuple[str, selora.SpectralAdapter]] = {
    "llama-dct-dora": (
        "llama",
        selora.SpectralAdapter(
            basis="dct", base="dora", r=4, alpha=8.0, sparse_ratio=0.5, dropout=0.1, seed=5
        ),
    ),
    "llama-coif-hira": (
        "llama",
        selora.SpectralAdapter(
            basis="coif",
            base="hira",
            r=4,
            n_coeffs=40,
            target_modules=["q_proj", "v_proj", "down_proj"],
            exclude_modules=["model.layers.1.mlp.down_proj"],
            seed=7,
        ),
    ),
    "llama-dense-lora": ("llama", selora.SpectralAdapter(basis=None, base="lora", r=2, alpha=4)),
    "llama-fft-regex": (
        "llama",
        selora.SpectralAdapter(basis="fft", base="lora", r=4, target_modules=r".*\.(q|k)_proj"),
    ),
    "bert-haar-lora": (
        "bert",
        selora.SpectralAdapter(
            basis="haar",
            base="lora",
            r=4,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            seed=1,
        ),
    ),
    "gpt2-db4-dora": (
        "gpt2",
        selora.SpectralAdapter(basis="db4", base="dora", r=4, target_modules=["c_attn", "c_proj"]),
    ),
}


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Save every case through PEFT, reload all of them in one new process."""
    root = tmp_path_factory.mktemp("peft_checkpoints")
    request, local = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the summation order must not differ
    with torch.random.fork_rng():
        for name, (kind, adapter) in CASES.items():
            injected, peft_model = adapted_pair(kind, adapter, seed=len(request))
            ids = inputs(seed=len(request))
            path = root / name
            peft_model.save_pretrained(str(path))
            local[name] = {
                "path": path,
                "logits": logits(peft_model, ids),
                "injected_logits": logits(injected, ids),
                "config": peft_model.peft_config["default"],
                "layers": {
                    n: type(m)
                    for n, m in peft_model.named_modules()
                    if isinstance(m, BaseTunerLayer)
                },
                "adapter": adapter,
            }
            seed = len(request)
            request.append(
                {"name": name, "kind": kind, "seed": seed, "path": str(path), "ids": ids}
            )
    torch.set_num_threads(threads)
    torch.save(request, root / "request.pt")
    script = Path(__file__).with_name("peft_reload.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(root / "request.pt"), str(root / "report.pt")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"local": local, "report": torch.load(root / "report.pt")}


def test_unregistered_checkpoint_is_refused(reloaded: dict[str, Any]) -> None:
    message = reloaded["report"]["unregistered"]
    assert message != "loaded"
    assert "SELORA" in message


@pytest.mark.parametrize("name", CASES)
def test_new_process_outputs_bit_identical(reloaded: dict[str, Any], name: str) -> None:
    local, remote = reloaded["local"][name], reloaded["report"][name]
    assert torch.equal(remote["logits"], local["logits"])
    assert torch.equal(local["logits"], local["injected_logits"])


@pytest.mark.parametrize("name", CASES)
def test_every_spectral_field_round_trips(reloaded: dict[str, Any], name: str) -> None:
    local, remote = reloaded["local"][name], reloaded["report"][name]
    config = local["config"]
    assert remote["config_class"] == "selora.integrations.peft.SeloraConfig"
    saved, loaded = config.to_dict(), dict(remote["config"])
    for key in ("inference_mode", "auto_mapping"):  # set by save_pretrained / from_pretrained
        saved.pop(key)
        loaded.pop(key)
    # PeftModelForSequenceClassification appends "classifier" and "score" to
    # modules_to_save on every construction (LoRA's config grows the same way)
    for data in (saved, loaded):
        data["modules_to_save"] = sorted(set(data["modules_to_save"] or []))
    assert loaded == saved
    assert remote["peft_type_value"] == "SELORA"  # answers .value as PEFT's enum members do
    assert remote["spectral"] == config.to_spectral_adapter().to_dict()
    # and the adapter is the one selora.inject was given (targets resolved to names by PEFT)
    original = local["adapter"].to_dict()
    for key, value in remote["spectral"].items():
        if key == "modules_to_save":
            assert set(original[key]) <= set(value) <= set(original[key]) | {"classifier", "score"}
        elif key != "target_modules":
            assert value == original[key], key


@pytest.mark.parametrize("name", CASES)
def test_loaded_layers_are_selora(reloaded: dict[str, Any], name: str) -> None:
    local, remote = reloaded["local"][name], reloaded["report"][name]
    assert remote["layers"]
    assert set(remote["layers"]) == set(local["layers"])
    assert set(remote["layers"].values()) == {"selora.integrations.peft_layer.SeloraLinear"}
    assert remote["units"] == ["selora.adapters.layer.AdapterUnit"]


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_holds_only_adapter_tensors(reloaded: dict[str, Any], name: str) -> None:
    local = reloaded["local"][name]
    path: Path = local["path"]
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(str(path / "adapter_model.safetensors"))
    saved_to_save = local["adapter"].modules_to_save
    for key in tensors:
        assert ".selora_units." in key or any(f".{m}." in key for m in saved_to_save), key
        assert "base_layer" not in key and not key.endswith("indices") and "default" not in key
    n_saved = sum(t.numel() for t in tensors.values())
    _, peft_model = adapted_pair(CASES[name][0], CASES[name][1])
    assert n_saved == peft_model.get_nb_trainable_parameters()[0]
