"""Native checkpoints: save_adapter / load_adapter / read_adapter in selora's one format.

Also the helpers of the other ``test_checkpoint_*`` files (a tiny MLP, an
untouched-model check, tampering with a saved checkpoint).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import tiny_transformers as tt
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import selora
from selora import SpectralAdapter, inject
from selora.adapters import checkpoint_read
from selora.adapters.checkpoint_format import (
    FORMAT_VERSION,
    HASH_KEY,
    LOCATIONS_PREFIX,
    PEFT_PREFIX,
    SPECTRAL_FIELDS,
    config_digest,
    digest_tensor,
)
from selora.adapters.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    load_adapter,
    read_adapter,
    save_adapter,
)
from selora.spectral_bases import SparseSpectrum

transformers = pytest.importorskip("transformers")

BASES = ["lora", "dora", "hira"]
BASISES: list[str | None] = [*selora.list_bases(), None]


# --------------------------------------------------------------------------- helpers


class MLP(nn.Module):
    """Three named linear layers and a head (sizes even: every wavelet basis fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tt.llama_config(vocab_size=100)).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(tt.gpt2_config(vocab_size=100, n_positions=16)).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tt.bert_config(vocab_size=100, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def run(model: nn.Module, x: Tensor = X) -> Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, Tensor) else out.logits


def trained(adapter: SpectralAdapter, build: Any = mlp, seed: int = 7) -> nn.Module:
    model = inject(build(), adapter)
    perturb(model, seed)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "adapters": dict(model.__dict__.get("selora_adapters") or {}),
        "active": list(model.__dict__.get("selora_active_adapters") or []),
        "spectra": [
            (n, m.indices.clone(), m.scale_factor)
            for n, m in model.named_modules()
            if isinstance(m, SparseSpectrum)
        ],
        "hooks": [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()],
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in after["state"].items():
        assert torch.equal(value, before["state"][key]), key
    assert after["flags"] == before["flags"]
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert len(after["spectra"]) == len(before["spectra"])
    for (n, idx, c), (n0, idx0, c0) in zip(after["spectra"], before["spectra"], strict=True):
        assert n == n0 and torch.equal(idx, idx0) and c == c0, n
    assert after["hooks"] == before["hooks"]


def read_files(path: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    config = json.loads((path / CONFIG_NAME).read_text())
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return config, tensors, metadata


def write_files(
    path: Path,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    metadata: dict[str, str] | None = None,
    *,
    rehash: bool = False,
) -> None:
    """Write a (tampered) checkpoint; ``rehash`` makes its hashes match the new config."""
    metadata = dict(metadata or {"format": "pt"})
    if rehash:
        digest = config_digest(config)
        tensors = {**tensors, HASH_KEY: digest_tensor(digest)}
        if "selora_config_sha256" in metadata:
            metadata["selora_config_sha256"] = digest.hex()
    (path / CONFIG_NAME).write_text(json.dumps(config))
    save_file(tensors, str(path / WEIGHTS_NAME), metadata=metadata)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("basis", BASISES)
@pytest.mark.parametrize("base", BASES)
def test_round_trip_is_bit_identical(tmp_path: Path, base: str, basis: str | None) -> None:
    adapter = SpectralAdapter(basis=basis, base=base, r=4, alpha=8.0, init_weights=False)
    model = trained(adapter)
    expected = run(model)
    assert not torch.allclose(expected, run(mlp()))
    save_adapter(model, tmp_path)

    torch.manual_seed(1234)
    after_seed = torch.random.get_rng_state()
    fresh = mlp()
    torch.random.set_rng_state(after_seed)
    assert load_adapter(fresh, tmp_path) is fresh
    assert torch.equal(torch.random.get_rng_state(), after_seed)  # torch's RNG not advanced
    assert selora.adapter_config(fresh) == adapter
    assert torch.equal(run(fresh), expected)


@pytest.mark.parametrize(
    ("build", "base", "basis"),
    [(llama, "lora", "fft"), (gpt2, "dora", None), (bert, "hira", "coif")],
    ids=["llama", "gpt2-conv1d", "bert-modules-to-save"],
)
def test_round_trip_transformers(tmp_path: Path, build: Any, base: str, basis: str | None) -> None:
    adapter = SpectralAdapter(
        basis=basis,
        base=base,
        r=4,
        n_coeffs=None if basis is None else 20,
        exclude_modules=["classifier"] if build is bert else (),
        modules_to_save=["classifier"] if build is bert else (),
    )
    model = trained(adapter, build)
    expected = run(model, TOKENS)
    save_adapter(model, tmp_path)
    fresh = load_adapter(build(), tmp_path)
    assert torch.equal(run(fresh, TOKENS), expected)
    if build is bert:
        tensors = load_file(str(tmp_path / WEIGHTS_NAME))
        assert f"{PEFT_PREFIX}classifier.weight" in tensors
        assert fresh.classifier.weight.requires_grad  # modules_to_save: trainable again


def test_a_second_adapter_by_name(tmp_path: Path) -> None:
    model = inject(mlp(), SpectralAdapter(basis="dct", r=4, init_weights=False), name="a")
    inject(model, SpectralAdapter(basis="haar", base="dora", r=2, alpha=4.0), name="b")
    perturb(model)
    for name in ("a", "b"):
        selora.set_adapter(model, name)
        perturb(model, seed=len(name))
    outs = {}
    for name in ("a", "b"):
        selora.set_adapter(model, name)
        outs[name] = run(model)
        save_adapter(model, tmp_path / name, name=name)
    fresh = load_adapter(mlp(), tmp_path / "b", name="second")
    load_adapter(fresh, tmp_path / "a", name="first")
    assert list(fresh.selora_adapters) == ["second", "first"]
    assert torch.equal(run(fresh), outs["b"])  # the first loaded stays active
    selora.set_adapter(fresh, "first")
    assert torch.equal(run(fresh), outs["a"])
    with pytest.raises(ValueError, match="no selora adapter 'c'"):
        save_adapter(model, tmp_path / "c", name="c")


def test_load_into_a_model_holding_the_same_adapter(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="dct", base="dora", r=4)
    saved = trained(adapter)
    save_adapter(saved, tmp_path)
    model = inject(mlp(), adapter)
    assert load_adapter(model, tmp_path) is model
    assert torch.equal(run(model), run(saved))
    other = inject(mlp(), SpectralAdapter(basis="dct", base="dora", r=4, alpha=2.0))
    before = snapshot(other)
    with pytest.raises(AdapterCheckpointError, match=r"differs in \['alpha'\]"):
        load_adapter(other, tmp_path)
    assert_untouched(other, before)


# --------------------------------------------------------------------------- the format


def test_config_is_what_peft_writes(tmp_path: Path) -> None:
    adapter = SpectralAdapter(
        basis="coif", base="dora", r=4, alpha=8.0, n_coeffs=12, seed=3, dropout=0.1
    )
    save_adapter(trained(adapter), tmp_path)
    config, _, _ = read_files(tmp_path)
    assert config["peft_type"] == "SELORA" and config["selora_format_version"] == FORMAT_VERSION
    assert config["basis_class"] == "selora.spectral_bases.wavelet.CoifletTransform"
    assert config["basis_options"] == {}
    for key in SPECTRAL_FIELDS:
        value = adapter.to_dict()[key]
        assert config[key] == (value or None if key.endswith(("_modules", "_save")) else value), key
    pytest.importorskip("peft")
    from peft import PeftConfig

    from selora.integrations.peft import SeloraConfig

    peft_side = SeloraConfig.from_spectral_adapter(adapter).to_dict()
    assert set(config) == set(peft_side)
    differ = {k for k in config if config[k] != peft_side[k]}
    assert differ <= {"inference_mode", "peft_version"}  # PEFT's save sets inference_mode
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, SeloraConfig)
    assert loaded.to_spectral_adapter() == adapter


def test_tensor_layout(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="fft", r=4, n_coeffs=12)
    model = trained(adapter)
    save_adapter(model, tmp_path)
    _, tensors, metadata = read_files(tmp_path)
    units = sorted(k for k in tensors if ".selora_units." in k)
    assert units == [
        f"{PEFT_PREFIX}{layer}.selora_units.{factor}.coefficients"
        for layer in ("head", "lin0", "lin1")
        for factor in ("lora_A", "lora_B")
    ]
    locations = sorted(k for k in tensors if k.startswith(LOCATIONS_PREFIX))
    # A: (4, 16), (4, 32), (4, 16); B: (32, 4), (16, 4), (4, 4): each distinct set once
    assert locations == [
        f"{LOCATIONS_PREFIX}{s}.12" for s in ("16x4", "32x4", "4x16", "4x32", "4x4")
    ]
    assert all(tensors[k].dtype == torch.int32 for k in locations)
    assert set(tensors) == set(units) | set(locations) | {HASH_KEY}
    digest = bytes(tensors[HASH_KEY].tolist())
    assert metadata == {
        "format": "pt",
        "selora_format_version": str(FORMAT_VERSION),
        "selora_config_sha256": digest.hex(),
    }
    config, _, _ = read_files(tmp_path)
    assert digest == config_digest(config)


def test_a_factor_with_its_own_locations_gets_an_override(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="dct", r=4, n_coeffs=10)
    model = trained(adapter)
    spectrum = model.lin0.selora_units["default"].lora_A  # (4, 16), like head's A
    spectrum.set_locations(torch.arange(10) * 3)
    expected = run(model)
    save_adapter(model, tmp_path)
    _, tensors, _ = read_files(tmp_path)
    mine = torch.arange(10, dtype=torch.int32) * 3
    theirs = model.head.selora_units["default"].lora_A.indices.to(torch.int32)
    shared = tensors[f"{LOCATIONS_PREFIX}4x16.10"]
    overrides = {
        layer: tensors[key]
        for layer in ("lin0", "head")
        if (key := f"{PEFT_PREFIX}{layer}.selora_units.lora_A.locations") in tensors
    }
    assert len(overrides) == 1  # a tie: one of the two sets is the shared one
    (layer, override), *_ = overrides.items()
    assert torch.equal(override, mine if layer == "lin0" else theirs)
    assert torch.equal(shared, theirs if layer == "lin0" else mine)
    assert torch.equal(run(load_adapter(mlp(), tmp_path)), expected)


def test_stored_locations_are_used_not_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selora.spectral_bases import spectrum

    model = trained(SpectralAdapter(basis="bior", base="hira", r=4, init_weights=False))
    expected = run(model)
    save_adapter(model, tmp_path)

    def other_locations(shape: tuple[int, int], k: int, seed: int = 0) -> Tensor:
        return torch.arange(k, dtype=torch.int64)  # what another NumPy might draw

    monkeypatch.setattr(spectrum, "spectral_locations", other_locations)
    assert torch.equal(run(load_adapter(mlp(), tmp_path)), expected)


def test_read_adapter_touches_no_model(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="haar", r=4)
    save_adapter(trained(adapter), tmp_path)
    read, tensors, config = read_adapter(tmp_path)
    assert read == adapter
    assert HASH_KEY in tensors and config["basis"] == "haar"


# --------------------------------------------------------------------------- safe to write


def test_files_are_written_through_exclusive_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    real = tempfile.mkstemp

    def spy(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / CONFIG_NAME).symlink_to(outside)  # a planted link is replaced, never followed
    save_adapter(trained(SpectralAdapter(basis="fft", r=4)), target)
    assert [Path(n).parent for n in made] == [target, target]
    assert outside.read_text() == "precious"
    assert not (target / CONFIG_NAME).is_symlink()
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert oct((target / WEIGHTS_NAME).stat().st_mode & 0o777) == oct(0o644)


def test_an_unsavable_basis_writes_nothing(tmp_path: Path) -> None:
    class Unregistered(selora.InverseTransform):
        orthonormal = True

        def inverse(self, spectrum: Tensor) -> Tensor:
            return spectrum

    model = trained(SpectralAdapter(basis=Unregistered(), r=4))
    with pytest.raises(ValueError, match="not registered"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_reader_racing_a_writer_gets_one_of_the_saved_adapters(tmp_path: Path) -> None:
    """Writer re-saves two adapters of equal shapes (alpha and coefficients differ)."""
    versions = []
    for alpha, seed in ((2.0, 1), (16.0, 2)):
        model = trained(SpectralAdapter(basis="fft", r=4, alpha=alpha), seed=seed)
        versions.append((model, run(model)))
    save_adapter(versions[0][0], tmp_path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                save_adapter(versions[i % 2][0], tmp_path)
        except BaseException as exc:  # reported by the reader's thread
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        for _ in range(60):
            out = run(load_adapter(mlp(), tmp_path))
            match = [i for i, (_, ref) in enumerate(versions) if torch.equal(out, ref)]
            assert len(match) == 1, "a load mixed the two saves"
            seen.add(match[0])
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert seen == {0, 1}
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary left


def test_a_torn_pair_waits_then_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_adapter(trained(SpectralAdapter(basis="fft", r=4, alpha=2.0)), tmp_path / "a")
    save_adapter(trained(SpectralAdapter(basis="fft", r=4, alpha=4.0)), tmp_path / "b")
    (tmp_path / "b" / CONFIG_NAME).replace(tmp_path / "a" / CONFIG_NAME)
    monkeypatch.setattr(checkpoint_read, "CONSISTENCY_TIMEOUT", 0.1)
    model = mlp()
    before = snapshot(model)
    with pytest.raises(AdapterCheckpointError, match="disagree"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model, before)


def test_the_native_door_never_imports_peft(tmp_path: Path) -> None:
    """PEFT is optional: save_adapter writes PEFT's JSON, load_adapter reads it, without it."""
    import subprocess
    import sys

    script = f"""
import sys, torch
from torch import nn
import selora
torch.manual_seed(0)
adapter = selora.SpectralAdapter(r=2, init_weights=False)
model = selora.inject(nn.Sequential(nn.Linear(8, 8)), adapter)
selora.save_adapter(model, {str(tmp_path)!r})
torch.manual_seed(0)
fresh = selora.load_adapter(nn.Sequential(nn.Linear(8, 8)), {str(tmp_path)!r})
x = torch.ones(1, 8)
assert torch.equal(fresh(x), model(x))
assert "peft" not in sys.modules, "peft was imported"
"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SELORA"
