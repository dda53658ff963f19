"""Bad checkpoints through the native door: AdapterCheckpointError naming it, model unchanged.

Each case tampers with a good checkpoint and loads it into a bare model and
into one that already holds another adapter; the error names the file, key
or module, and the model is exactly as before (state, modules, flags,
adapters, locations, hooks).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from seeded_bases import rotation_basis
from test_io import assert_untouched, mlp, read_files, run, snapshot, trained, write_files
from torch import Tensor, nn

import selora
from selora import SpectralAdapter, inject
from selora.adapters import checkpoint_read
from selora.adapters.checkpoint_format import HASH_KEY, LOCATIONS_PREFIX, PEFT_PREFIX
from selora.adapters.io import AdapterCheckpointError, load_adapter, save_adapter
from selora.spectral_bases import (
    BasisNotSavableError,
    register_basis,
    unregister_basis,
)

A_COEFFS = f"{PEFT_PREFIX}lin1.selora_units.lora_A.coefficients"
ADAPTER = SpectralAdapter(basis="fft", base="dora", r=4, alpha=8.0, n_coeffs=12)

Config = dict[str, Any]
Tensors = dict[str, Tensor]


def _alpha(c: Config, t: Tensors) -> bool:  # a torn pair: another save's config
    c["alpha"] = 2.0
    return False


def _base_weight(c: Config, t: Tensors) -> bool:
    t[f"{PEFT_PREFIX}lin0.weight"] = torch.zeros(32, 16)
    return False


def _int_coefficients(c: Config, t: Tensors) -> bool:
    t[A_COEFFS] = torch.zeros(12, dtype=torch.int64)
    return False


def _bool_coefficients(c: Config, t: Tensors) -> bool:
    t[A_COEFFS] = torch.zeros(12, dtype=torch.bool)
    return False


def _missing_key(c: Config, t: Tensors) -> bool:
    del c["scale"]
    return True


def _missing_tensor(c: Config, t: Tensors) -> bool:
    del t[A_COEFFS]
    return False


def _missing_magnitude(c: Config, t: Tensors) -> bool:
    (key,) = [k for k in t if k.startswith(f"{PEFT_PREFIX}lin1.") and "magnitude" in k]
    del t[key]
    return False


def _wrong_shape(c: Config, t: Tensors) -> bool:
    t[A_COEFFS] = torch.zeros(13)
    return False


def _huge_rank(c: Config, t: Tensors) -> bool:  # hash redone: only the sizes can catch it
    c["r"] = 10**6
    return True


def _budget_too_big(c: Config, t: Tensors) -> bool:
    c["n_coeffs"] = 10**4
    return True


def _float_locations(c: Config, t: Tensors) -> bool:
    t[f"{LOCATIONS_PREFIX}4x32.12"] = t[f"{LOCATIONS_PREFIX}4x32.12"].float()
    return False


def _short_locations(c: Config, t: Tensors) -> bool:
    t[f"{LOCATIONS_PREFIX}4x32.12"] = t[f"{LOCATIONS_PREFIX}4x32.12"][:11]
    return False


def _out_of_range_locations(c: Config, t: Tensors) -> bool:
    t[f"{LOCATIONS_PREFIX}4x32.12"] = torch.arange(12, dtype=torch.int32) + 4 * 32 - 5
    return False


def _repeated_locations(c: Config, t: Tensors) -> bool:
    t[f"{LOCATIONS_PREFIX}4x32.12"] = torch.zeros(12, dtype=torch.int32)
    return False


def _missing_locations(c: Config, t: Tensors) -> bool:
    del t[f"{LOCATIONS_PREFIX}4x32.12"]
    return False


def _orphan_locations(c: Config, t: Tensors) -> bool:
    t[f"{LOCATIONS_PREFIX}8x8.12"] = torch.arange(12, dtype=torch.int32)
    return False


def _no_hash(c: Config, t: Tensors) -> bool:
    del t[HASH_KEY]
    return False


def _bad_hash_tensor(c: Config, t: Tensors) -> bool:
    t[HASH_KEY] = t[HASH_KEY].to(torch.int32)
    return False


def _legacy_peft(c: Config, t: Tensors) -> bool:
    del c["selora_format_version"]
    return False


def _future_version(c: Config, t: Tensors) -> bool:
    c["selora_format_version"] = 3
    return True


def _not_selora(c: Config, t: Tensors) -> bool:
    c["peft_type"] = "LORA"
    return True


def _unknown_basis(c: Config, t: Tensors) -> bool:
    c["basis"] = "no-such-basis"
    return True


def _other_basis_class(c: Config, t: Tensors) -> bool:
    c["basis_class"] = "selora.spectral_bases.cosine.CosineTransform"
    return True


def _basis_options(c: Config, t: Tensors) -> bool:
    c["basis_options"] = {"norm": "ortho"}
    return True


def _bad_value(c: Config, t: Tensors) -> bool:
    c["dropout"] = 1.5
    return True


def _unadapted_layer(c: Config, t: Tensors) -> bool:
    c["target_modules"] = ["lin0"]
    return True


CASES: dict[str, tuple[Callable[[Config, Tensors], bool], str]] = {
    "torn-alpha": (_alpha, "disagree"),
    "base-weight-key": (_base_weight, r"'base_model\.model\.lin0\.weight'.*base model weight"),
    "int-coefficients": (_int_coefficients, r"lin1\.selora_units\.lora_A.*torch\.int64"),
    "bool-coefficients": (_bool_coefficients, r"lin1\.selora_units\.lora_A.*torch\.bool"),
    "missing-config-key": (_missing_key, r"no 'scale'"),
    "missing-tensor": (_missing_tensor, r"lora_A\.coefficients'.*missing"),
    "missing-magnitude": (_missing_magnitude, r"magnitude.*missing"),
    "wrong-shape": (_wrong_shape, r"lin1\.selora_units\.lora_A\.coefficients.*\(13,\)"),
    "huge-rank": (_huge_rank, r"r=1000000"),
    "budget-too-big": (_budget_too_big, r"module '\w+', lora_A.*n_coeffs"),
    "float-locations": (_float_locations, r"4x32\.12.*int32"),
    "short-locations": (_short_locations, r"4x32\.12.*int32 \(12,\)"),
    "out-of-range-locations": (_out_of_range_locations, r"4x32\.12.*\[0, 128\)"),
    "repeated-locations": (_repeated_locations, r"4x32\.12.*repeats"),
    "missing-locations": (_missing_locations, r"no location set.*4x32\.12"),
    "orphan-locations": (_orphan_locations, r"8x8\.12.*belongs to no factor"),
    "no-hash": (_no_hash, r"holds no 'selora\.config_sha256'"),
    "bad-hash-tensor": (_bad_hash_tensor, r"uint8"),
    "legacy-peft-config": (_legacy_peft, r"stores no spectral locations"),
    "future-version": (_future_version, r"selora_format_version is 3"),
    "not-selora": (_not_selora, r"peft_type is 'LORA'"),
    "unknown-basis": (_unknown_basis, r"no-such-basis"),
    "other-basis-class": (_other_basis_class, r"FourierTransform"),
    "basis-options": (_basis_options, r"norm"),
    "bad-value": (_bad_value, r"dropout"),
    "unadapted-layer": (_unadapted_layer, r"module '(lin1|head)'.*target_modules"),
}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "good"
    save_adapter(trained(ADAPTER), path)
    return path


def holding_another() -> nn.Module:
    model = inject(mlp(), SpectralAdapter(basis="dct", r=2, init_weights=False), name="other")
    model.eval()
    return model


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("build", [mlp, holding_another], ids=["bare", "holding-another"])
def test_a_bad_checkpoint_is_refused_and_changes_nothing(
    saved: Path, monkeypatch: pytest.MonkeyPatch, case: str, build: Callable[[], nn.Module]
) -> None:
    tamper, message = CASES[case]
    config, tensors, metadata = read_files(saved)
    rehash = tamper(config, tensors)
    write_files(saved, config, tensors, metadata, rehash=rehash)
    monkeypatch.setattr(checkpoint_read, "CONSISTENCY_TIMEOUT", 0.05)
    inject_calls: list[object] = []
    if case in ("huge-rank", "budget-too-big"):  # refused before any unit is built
        import selora.adapters.io as io

        monkeypatch.setattr(io, "inject", lambda *a, **k: inject_calls.append(a))
    model = build()
    before = snapshot(model)
    out = run(model)
    with pytest.raises(AdapterCheckpointError, match=message) as info:
        load_adapter(model, saved)
    assert str(saved) in str(info.value) or "module" in str(info.value)
    assert not inject_calls
    assert_untouched(model, before)
    assert torch.equal(run(model), out)


def test_an_untampered_copy_loads(saved: Path) -> None:
    """The cases above fail because of their tampering, not of the round trip."""
    config, tensors, metadata = read_files(saved)
    write_files(saved, config, tensors, metadata)
    assert torch.equal(run(load_adapter(mlp(), saved)), run(trained(ADAPTER)))


def test_a_truncated_file_is_refused(saved: Path) -> None:
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    model = mlp()
    before = snapshot(model)
    with pytest.raises(AdapterCheckpointError, match="truncated or corrupt"):
        load_adapter(model, saved)
    assert_untouched(model, before)


def test_an_edited_metadata_hash_is_refused(saved: Path) -> None:
    config, tensors, metadata = read_files(saved)
    write_files(saved, config, tensors, {**metadata, "selora_config_sha256": "00" * 32})
    with pytest.raises(AdapterCheckpointError, match="metadata"):
        load_adapter(mlp(), saved)


def test_a_v1_checkpoint_is_refused_saying_why(saved: Path) -> None:
    (saved / "adapter_config.json").write_text(
        json.dumps({"format": "selora-adapter", "format_version": 1, "adapter": {}})
    )
    with pytest.raises(AdapterCheckpointError, match=r"selora v1 checkpoint.*version 2 only"):
        load_adapter(mlp(), saved)


def test_loading_into_a_merged_adapter_is_refused(saved: Path) -> None:
    model = inject(mlp(), ADAPTER)
    selora.merge(model)
    before = snapshot(model)
    with pytest.raises(AdapterCheckpointError, match="merged"):
        load_adapter(model, saved)
    assert_untouched(model, before)


# --------------------------------------------------------------------------- bases with options


_Rotation = rotation_basis()


class _Undeclared(_Rotation):
    def options(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def rotation() -> Any:
    register_basis("test-rotation")(_Rotation)
    yield _Rotation
    unregister_basis("test-rotation")


def test_a_basis_with_options_reloads_with_them(tmp_path: Path, rotation: Any) -> None:
    adapter = SpectralAdapter(basis=rotation(seed=7), r=4, init_weights=False)
    model = trained(adapter)
    expected = run(model)
    save_adapter(model, tmp_path)
    config, _, _ = read_files(tmp_path)
    assert config["basis"] == "test-rotation" and config["basis_options"] == {"seed": 7}
    assert config["basis_class"] == f"{_Rotation.__module__}.{_Rotation.__qualname__}"
    fresh = load_adapter(mlp(), tmp_path)
    basis = selora.adapter_config(fresh).basis
    assert isinstance(basis, rotation) and basis.seed == 7  # not the default seed 0
    assert torch.equal(run(fresh), expected)


def test_a_basis_that_cannot_be_rebuilt_is_refused_at_save(tmp_path: Path) -> None:
    register_basis("test-undeclared")(_Undeclared)
    try:
        model = trained(SpectralAdapter(basis=_Undeclared(seed=7), r=4))
        with pytest.raises(BasisNotSavableError, match="options"):
            save_adapter(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        unregister_basis("test-undeclared")


def test_an_unregistered_basis_is_refused_at_load(tmp_path: Path, rotation: Any) -> None:
    save_adapter(trained(SpectralAdapter(basis=rotation(seed=7), r=4)), tmp_path)
    unregister_basis("test-rotation")
    try:
        model = mlp()
        before = snapshot(model)
        with pytest.raises(AdapterCheckpointError, match=r"test-rotation.*register"):
            load_adapter(model, tmp_path)
        assert_untouched(model, before)
    finally:
        register_basis("test-rotation")(_Rotation)
