"""One checkpoint format, two front doors: saved through one, loaded through the other elsewhere.

Every basis of ``list_bases()`` (and dense factors) x lora / dora / hira, on a
tiny MLP, a tiny LLaMA and GPT-2 (Conv1D): an adapter saved by
``selora.save_adapter`` loads with ``PeftModel.from_pretrained``, and one saved
by ``PeftModel.save_pretrained`` loads with ``selora.load_adapter``, in a new
process (``peft_reload.py``, all cases in one), with bit-identical outputs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model
from peft_reload import BUILDERS, MLP_TARGETS, outputs
from safetensors import safe_open
from tiny_models import inputs, perturb, subprocess_env
from torch import Tensor, nn

import selora
from selora.adapters.checkpoint_format import HASH_KEY, LOCATIONS_PREFIX, PEFT_PREFIX
from selora.integrations.peft import SeloraConfig

# PeftModel reads transformers' deprecated is_gradient_checkpointing
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

BASISES: list[str | None] = [*selora.list_bases(), None]
BASES = ["lora", "dora", "hira"]
KINDS = ["mlp", "llama", "gpt2"]
DOORS = {"native": "peft", "peft": "native"}  # saved through -> loaded through


def adapter_for(kind: str, basis: str | None, base: str, seed: int) -> selora.SpectralAdapter:
    return selora.SpectralAdapter(
        basis=basis,
        base=base,
        r=4,
        alpha=8.0,
        n_coeffs=None if basis is None or seed % 2 else 24,  # both budgets
        target_modules=MLP_TARGETS if kind == "mlp" else "all-linear",
        seed=seed % 5,
        init_weights=False,  # B != 0 from the start
    )


def model_inputs(kind: str, seed: int) -> Tensor:
    if kind == "mlp":
        return torch.randn(3, 16, generator=torch.Generator().manual_seed(seed))
    return inputs(seed=seed)


def saved_model(door: str, kind: str, adapter: selora.SpectralAdapter, seed: int) -> nn.Module:
    """An adapted model with moved coefficients, through ``door``."""
    if door == "native":
        model = selora.inject(BUILDERS[kind](seed), adapter)
    else:
        model = get_peft_model(BUILDERS[kind](seed), SeloraConfig.from_spectral_adapter(adapter))
    perturb(model, seed=seed + 1)
    return model


CASES = [
    (door, kind, basis, base)
    for door in DOORS
    for kind in KINDS
    for basis in BASISES
    for base in BASES
]


def case_name(door: str, kind: str, basis: str | None, base: str) -> str:
    return f"{door}-{kind}-{basis or 'dense'}-{base}"


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Save every case through its door, reload all through the other in one new process."""
    root = tmp_path_factory.mktemp("cross_door")
    request, local = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the summation order must not differ
    try:
        with torch.random.fork_rng():
            for seed, (door, kind, basis, base) in enumerate(CASES):
                name = case_name(door, kind, basis, base)
                adapter = adapter_for(kind, basis, base, seed)
                model = saved_model(door, kind, adapter, seed)
                x = model_inputs(kind, seed)
                path = root / name
                if door == "native":
                    selora.save_adapter(model, path)
                else:
                    model.save_pretrained(str(path))
                local[name] = {
                    "path": path,
                    "outputs": outputs(model, x),
                    "base_outputs": outputs(BUILDERS[kind](seed), x),
                    "adapter": adapter,
                }
                request.append(
                    {
                        "name": name,
                        "kind": kind,
                        "seed": seed,
                        "path": str(path),
                        "door": DOORS[door],
                        "inputs": x,
                    }
                )
    finally:
        torch.set_num_threads(threads)
    torch.save(request, root / "request.pt")
    script = Path(__file__).with_name("peft_reload.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(root / "request.pt"), str(root / "report.pt")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"local": local, "report": torch.load(root / "report.pt")}


def test_peft_refuses_a_selora_checkpoint_before_the_bridge_is_imported(
    reloaded: dict[str, Any],
) -> None:
    message = reloaded["report"]["unregistered"]
    assert message != "loaded"
    assert "SELORA" in message


@pytest.mark.parametrize(
    ("door", "kind", "basis", "base"), CASES, ids=[case_name(*c) for c in CASES]
)
def test_the_other_door_loads_bit_identical_outputs(
    reloaded: dict[str, Any], door: str, kind: str, basis: str | None, base: str
) -> None:
    name = case_name(door, kind, basis, base)
    local, remote = reloaded["local"][name], reloaded["report"][name]
    assert "error" not in remote, remote.get("error")
    assert not torch.allclose(local["outputs"], local["base_outputs"])  # the adapter matters
    assert torch.equal(remote["outputs"], local["outputs"])
    # the adapter is the one saved (targets resolved to names by PEFT)
    original = local["adapter"].to_dict()
    for key, value in remote["spectral"].items():
        if key != "target_modules":
            assert value == original[key], key
    assert remote["layers"]
    if DOORS[door] == "peft":
        assert remote["config_class"] == "selora.integrations.peft.SeloraConfig"
        assert remote["peft_type_value"] == "SELORA"
        assert set(remote["layers"].values()) == {"selora.integrations.peft_layer.SeloraLinear"}
    else:
        assert set(remote["layers"].values()) == {"selora.adapters.layer.SpectralLayer"}


@pytest.mark.parametrize("door", list(DOORS))
def test_both_doors_write_the_same_layout(reloaded: dict[str, Any], door: str) -> None:
    """Adapter tensors under base_model.model., no adapter name, each location set once."""
    path: Path = reloaded["local"][case_name(door, "llama", "dct", "dora")]["path"]
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        tensors = {k: handle.get_tensor(k) for k in keys}
    assert tensors[HASH_KEY].dtype == torch.uint8 and tensors[HASH_KEY].shape == (32,)
    locations = {k: t for k, t in tensors.items() if k.startswith(LOCATIONS_PREFIX)}
    assert locations and all(t.dtype == torch.int32 for t in locations.values())
    # (m, n, k) of every factor: A is (4, d_in), B (d_out, 4); LLaMA's projections share shapes
    shapes = {(4, 32), (32, 4), (16, 4), (4, 64), (64, 4)}
    assert {tuple(map(int, k.split(".")[2].split("x"))) for k in locations} == shapes
    units = [k for k in keys if ".selora_units." in k]
    assert units and all(k.startswith(PEFT_PREFIX) for k in units)
    assert not any(".default." in k or "base_layer" in k for k in keys)
    assert set(keys) == set(units) | set(locations) | {HASH_KEY}


def test_an_edited_seed_is_refused(tmp_path: Path) -> None:
    """The bridge stores locations: a config edited after saving no longer matches its tensors."""
    import json

    from peft import PeftModel

    model = saved_model("peft", "llama", adapter_for("llama", "fft", "lora", 1), 1)
    model.save_pretrained(str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["seed"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(selora.AdapterCheckpointError, match="does not match the tensors"):
        PeftModel.from_pretrained(BUILDERS["llama"](1), str(tmp_path))
    with pytest.raises(selora.AdapterCheckpointError, match="disagree"):
        selora.load_adapter(BUILDERS["llama"](1), tmp_path)


@pytest.mark.parametrize("door", ["peft", "native"])
def test_stored_locations_win_over_the_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, door: str
) -> None:
    """A checkpoint loads identically where NumPy's generator would give other locations."""
    from peft import PeftModel

    from selora.spectral_bases import spectrum

    adapter = adapter_for("gpt2", "coif", "dora", 2)
    model = saved_model("peft", "gpt2", adapter, 2)
    model.save_pretrained(str(tmp_path))
    x = model_inputs("gpt2", 2)
    expected = outputs(model, x)

    def other_locations(shape: tuple[int, int], k: int, seed: int = 0) -> Tensor:
        m, n = shape
        return torch.arange(m * n - k, m * n, dtype=torch.int64)  # not what NumPy draws

    monkeypatch.setattr(spectrum, "spectral_locations", other_locations)
    base = BUILDERS["gpt2"](2)
    if door == "peft":
        loaded: nn.Module = PeftModel.from_pretrained(base, str(tmp_path))
    else:
        loaded = selora.load_adapter(base, tmp_path)
    spectra = [m for m in loaded.modules() if isinstance(m, selora.SparseSpectrum)]
    assert spectra and not any(
        torch.equal(s.indices.cpu(), other_locations(s.shape, s.n_coeffs)) for s in spectra
    )
    assert torch.equal(outputs(loaded, x), expected)


@pytest.mark.parametrize("door", list(DOORS))
def test_modules_to_save_cross_the_doors(tmp_path: Path, door: str) -> None:
    """A task head saved by one door is PEFT's ModulesToSaveWrapper copy or the model's own."""
    from peft import PeftModel

    adapter = selora.SpectralAdapter(
        basis="haar",
        r=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_weights=False,
    )
    ids = inputs(seed=4)
    if door == "native":
        model = selora.inject(BUILDERS["bert"](4), adapter)
        perturb(model, seed=5)
        selora.save_adapter(model, tmp_path)
        loaded: nn.Module = PeftModel.from_pretrained(BUILDERS["bert"](4), str(tmp_path))
    else:  # PEFT adds "score" to a sequence-classification config; nothing matches it here
        config = SeloraConfig.from_spectral_adapter(adapter, task_type="SEQ_CLS")
        model = get_peft_model(BUILDERS["bert"](4), config)
        perturb(model, seed=5)
        model.save_pretrained(str(tmp_path))
        assert "score" in model.peft_config["default"].modules_to_save
        loaded = selora.load_adapter(BUILDERS["bert"](4), tmp_path)
        assert loaded.classifier.weight.requires_grad
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        assert f"{PEFT_PREFIX}classifier.weight" in set(handle.keys())
    assert not torch.equal(outputs(model, ids), outputs(BUILDERS["bert"](4), ids))
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))
