"""Bad checkpoints through PEFT's door: AdapterCheckpointError, and the PeftModel unchanged.

``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` go through the
SELORA hooks (:mod:`selora.integrations.peft_checkpoint`), which check
everything ``selora.load_adapter`` checks before PEFT loads a tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft_reload import MLP_TARGETS, outputs, tiny_mlp
from safetensors import safe_open
from safetensors.torch import save_file
from seeded_bases import rotation_basis
from tiny_models import perturb
from torch import Tensor, nn

import selora
from selora.adapters.checkpoint_format import HASH_KEY, LOCATIONS_PREFIX, config_digest
from selora.integrations.peft import SeloraConfig
from selora.spectral_bases import register_basis, unregister_basis

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
ADAPTER = selora.SpectralAdapter(
    basis="dct",
    base="dora",
    r=4,
    alpha=8.0,
    n_coeffs=12,
    target_modules=MLP_TARGETS[:2],
    modules_to_save=["head"],
    init_weights=False,
)
A_COEFFS = "base_model.model.lin1.selora_units.lora_A.coefficients"
Config = dict[str, Any]
Tensors = dict[str, Tensor]


def peft_model(adapter: selora.SpectralAdapter = ADAPTER) -> nn.Module:
    model = get_peft_model(tiny_mlp(), SeloraConfig.from_spectral_adapter(adapter))
    perturb(model, seed=3)
    return model.eval()


def read(path: Path) -> tuple[Config, Tensors]:
    config = json.loads((path / "adapter_config.json").read_text())
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return config, tensors


def write(path: Path, config: Config, tensors: Tensors, rehash: bool) -> None:
    if rehash:
        tensors[HASH_KEY] = torch.tensor(list(config_digest(config)), dtype=torch.uint8)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def spectra(model: nn.Module) -> list[Tensor]:
    return [m.indices.clone() for m in model.modules() if isinstance(m, selora.SparseSpectrum)]


def _set(key: str, value: Any) -> Callable[[Config, Tensors], bool]:
    def tamper(c: Config, t: Tensors) -> bool:
        t[key] = value(t) if callable(value) else value
        return False

    return tamper


def _config(key: str, value: Any, rehash: bool) -> Callable[[Config, Tensors], bool]:
    def tamper(c: Config, t: Tensors) -> bool:
        if value is None:
            del c[key]
        else:
            c[key] = value
        return rehash

    return tamper


def _drop(key: str) -> Callable[[Config, Tensors], bool]:
    def tamper(c: Config, t: Tensors) -> bool:
        del t[key]
        return False

    return tamper


LOC = f"{LOCATIONS_PREFIX}4x32.12"
MISMATCH = "does not match the tensors"
# name: (tamper, message of from_pretrained, message of load_adapter into a model that
# holds the adapter; None: only the config file was edited, and load_adapter reads the
# model's own config, which matches the tensors, so it loads them)
CASES: dict[str, tuple[Callable[[Config, Tensors], bool], str, str | None]] = {
    "torn-alpha": (_config("alpha", 2.0, False), MISMATCH, None),
    "edited-seed": (_config("seed", 3, False), MISMATCH, None),
    "base-weight": (
        _set("base_model.model.lin0.base_layer.weight", torch.zeros(32, 16)),
        r"'base_model\.model\.lin0\.base_layer\.weight'.*base model weight",
        "same",
    ),
    "int-coefficients": (_set(A_COEFFS, torch.zeros(12, dtype=torch.int32)), "torch.int32", "same"),
    "bool-coefficients": (_set(A_COEFFS, torch.ones(12, dtype=torch.bool)), "torch.bool", "same"),
    "missing-tensor": (_drop(A_COEFFS), r"lora_A\.coefficients'.*missing", "same"),
    "wrong-shape": (_set(A_COEFFS, torch.zeros(11)), r"\(11,\)", "same"),
    "repeated-locations": (_set(LOC, torch.zeros(12, dtype=torch.int32)), "repeats", "same"),
    "int64-locations": (_set(LOC, lambda t: t[LOC].long()), "int32", "same"),
    "missing-locations": (_drop(LOC), "no location set", "same"),
    "orphan-locations": (
        _set(f"{LOCATIONS_PREFIX}8x8.12", torch.arange(12, dtype=torch.int32)),
        "belongs to no factor",
        "same",
    ),
    "no-hash": (_drop(HASH_KEY), "holds no 'selora.config_sha256'", "same"),
    # init_weights only says how new tensors start (not hashed): the model's own config loads
    "missing-config-key": (_config("init_weights", None, True), "no 'init_weights'", None),
    "legacy-config": (_config("selora_format_version", None, False), "no spectral locations", None),
    "unknown-basis": (_config("basis", "no-such-basis", True), "no-such-basis", MISMATCH),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_checkpoint_is_refused_by_peft(tmp_path: Path, case: str) -> None:
    saved = peft_model()
    saved.save_pretrained(str(tmp_path))
    config, tensors = read(tmp_path)
    tamper, message, into_holder = CASES[case]
    write(tmp_path, config, tensors, tamper(config, tensors))
    with pytest.raises(selora.AdapterCheckpointError, match=message):
        PeftModel.from_pretrained(tiny_mlp(), str(tmp_path))
    holder = peft_model()
    with torch.no_grad():
        for p in holder.parameters():
            if p.requires_grad:
                p.mul_(0.5)
    if into_holder is None:
        holder.load_adapter(str(tmp_path), adapter_name="default")
        assert torch.equal(outputs(holder, X), outputs(saved, X))
        return
    # refused before anything is touched
    before, locations, out = state(holder), spectra(holder), outputs(holder, X)
    with pytest.raises(
        selora.AdapterCheckpointError, match=message if into_holder == "same" else into_holder
    ):
        holder.load_adapter(str(tmp_path), adapter_name="default")
    after = state(holder)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in after)
    assert all(torch.equal(a, b) for a, b in zip(spectra(holder), locations, strict=True))
    assert torch.equal(outputs(holder, X), out)


def test_an_untampered_copy_loads_through_both_paths(tmp_path: Path) -> None:
    model = peft_model()
    model.save_pretrained(str(tmp_path))
    config, tensors = read(tmp_path)
    write(tmp_path, config, tensors, False)
    loaded = PeftModel.from_pretrained(tiny_mlp(), str(tmp_path))
    assert torch.equal(outputs(loaded, X), outputs(model, X))
    holder = peft_model(ADAPTER)
    with torch.no_grad():
        for p in holder.parameters():
            if p.requires_grad:
                p.zero_()
    holder.load_adapter(str(tmp_path), adapter_name="default")
    assert torch.equal(outputs(holder, X), outputs(model, X))


def test_loading_into_a_merged_adapter_is_refused(tmp_path: Path) -> None:
    peft_model().save_pretrained(str(tmp_path))
    holder = peft_model()
    holder.merge_adapter()
    before = state(holder)
    with pytest.raises(selora.AdapterCheckpointError, match="merged"):
        holder.load_adapter(str(tmp_path), adapter_name="default")
    assert all(torch.equal(v, before[k]) for k, v in state(holder).items())


def test_location_keys_survive_any_adapter_name(tmp_path: Path) -> None:
    """An adapter named like the last part of a location key ("12") still round-trips."""
    config = SeloraConfig.from_spectral_adapter(ADAPTER)
    model = get_peft_model(tiny_mlp(), config, adapter_name="12")
    perturb(model, seed=5)
    model.save_pretrained(str(tmp_path))
    _, tensors = read(tmp_path / "12")
    assert LOC in tensors
    loaded = PeftModel.from_pretrained(tiny_mlp(), str(tmp_path / "12"), adapter_name="12")
    assert torch.equal(outputs(loaded, X), outputs(model.eval(), X))


_Rotation = rotation_basis()


def test_a_basis_with_options_reloads_with_them_through_peft(tmp_path: Path) -> None:
    register_basis("test-peft-rotation")(_Rotation)
    try:
        adapter = selora.SpectralAdapter(
            basis=_Rotation(seed=7), r=4, target_modules=MLP_TARGETS, init_weights=False
        )
        model = peft_model(adapter)
        model.save_pretrained(str(tmp_path))
        config, _ = read(tmp_path)
        assert config["basis_options"] == {"seed": 7}
        loaded = PeftModel.from_pretrained(tiny_mlp(), str(tmp_path))
        basis = loaded.peft_config["default"].to_spectral_adapter().basis
        assert isinstance(basis, _Rotation) and basis.seed == 7
        assert torch.equal(outputs(loaded, X), outputs(model, X))
        native = selora.load_adapter(tiny_mlp(), tmp_path)  # the other door too
        assert torch.equal(outputs(native, X), outputs(model, X))
    finally:
        unregister_basis("test-peft-rotation")


def test_a_basis_name_with_options_and_no_class_builds_that_basis() -> None:
    from selora.integrations.peft import SeloraConfig

    config = SeloraConfig(basis="db4", basis_options={"levels": 2}, target_modules=["lin0"])
    assert config.basis_options == {"levels": 2}
    assert config.basis_class == "selora.spectral_bases.wavelet.Daubechies4Transform"
    assert config.to_spectral_adapter().basis.options() == {"levels": 2}  # type: ignore[union-attr]
