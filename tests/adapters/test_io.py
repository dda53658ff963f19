"""Checkpoints: save_adapter / load_adapter / read_adapter."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import tiny_transformers as tt
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import selora
from selora import SpectralAdapter, SpectralLayer, inject, trainable_parameters
from selora.adapters.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    load_adapter,
    read_adapter,
    save_adapter,
)
from selora.spectral_bases import InverseTransform, SparseSpectrum, spectral_locations

transformers = pytest.importorskip("transformers")

BASES = ["lora", "dora", "hira"]
BASISES = ["fft", "dct", "haar", "db4", "bior", "coif", None]


# --------------------------------------------------------------------------- helpers


def mlp(seed: int = 0, hidden: int = 32, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 4)
    ).to(dtype)


def llama(hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tt.llama_config(hidden_size=hidden, vocab_size=100)
    return transformers.LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tt.gpt2_config(vocab_size=100, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tt.bert_config(vocab_size=100, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def perturb(model: nn.Module, seed: int = 7) -> None:
    """Move every trainable tensor away from its init (so that B != 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)


def run(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, Tensor) else out.logits


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[tuple[str, type]], list[bool]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    return state, types, [p.requires_grad for p in model.parameters()]


def assert_untouched(model: nn.Module, before: tuple) -> None:
    state, types, flags = snapshot(model)
    assert types == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[2]
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    assert not hasattr(model, "selora_adapter")


TOKENS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("basis", BASISES)
@pytest.mark.parametrize("base", BASES)
def test_round_trip_is_bit_identical(tmp_path: Path, base: str, basis: str | None) -> None:
    adapter = SpectralAdapter(basis=basis, base=base, r=4, alpha=8.0)
    model = inject(mlp(), adapter)
    perturb(model)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    expected = run(model, x)
    save_adapter(model, tmp_path)

    fresh = mlp()
    torch.manual_seed(1234)  # the adapter of a fresh injection would differ
    assert load_adapter(fresh, tmp_path) is fresh
    assert selora.adapters.adapter_config(fresh) == adapter
    assert torch.equal(run(fresh, x), expected)


@pytest.mark.parametrize(
    ("build", "base", "basis"),
    [(llama, "lora", "fft"), (gpt2, "dora", None), (bert, "hira", "coif")],
)
def test_round_trip_transformers(tmp_path: Path, build, base: str, basis: str | None) -> None:
    adapter = SpectralAdapter(
        basis=basis,
        base=base,
        r=4,
        n_coeffs=None if basis is None else 20,
        # BERT's head is (2, 32): too small for 20 coefficients
        exclude_modules=["classifier"] if build is bert else (),
    )
    model = inject(build(), adapter)
    perturb(model)
    expected = run(model, TOKENS)
    save_adapter(model, tmp_path)
    torch.manual_seed(99)
    fresh = load_adapter(build(), tmp_path)
    assert torch.equal(run(fresh, TOKENS), expected)


def test_load_into_model_holding_the_same_adapter(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="dct", base="dora", r=4)
    model = inject(mlp(), adapter)
    perturb(model)
    x = torch.randn(3, 16)
    expected = run(model, x)
    run(model, x)  # fill the eval cache of the target as well
    save_adapter(model, tmp_path)
    torch.manual_seed(5)
    other = inject(mlp(), adapter)
    run(other, x)
    load_adapter(other, tmp_path)
    assert torch.equal(run(other, x), expected)


def test_bf16_round_trip_keeps_dtypes(tmp_path: Path) -> None:
    model = inject(mlp(), SpectralAdapter(basis="fft", base="dora", r=4)).to(torch.bfloat16)
    perturb(model)
    x = torch.randn(3, 16).to(torch.bfloat16)
    expected = run(model, x)
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    assert {t.dtype for k, t in stored.items() if not k.startswith("__")} == {torch.bfloat16}
    fresh = load_adapter(mlp(dtype=torch.bfloat16), tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in fresh.parameters())
    assert torch.equal(run(fresh, x), expected)


def test_modules_to_save_round_trip(tmp_path: Path) -> None:
    adapter = SpectralAdapter(
        basis="haar", r=4, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    model = inject(bert(), adapter)
    assert model.classifier.weight.requires_grad
    perturb(model)
    expected = run(model, TOKENS)
    save_adapter(model, tmp_path)
    assert {"classifier.weight", "classifier.bias"} <= set(load_file(tmp_path / WEIGHTS_NAME))
    fresh = load_adapter(bert(), tmp_path)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert torch.equal(run(fresh, TOKENS), expected)


# --------------------------------------------------------------------------- file contents


def test_file_holds_only_adapter_tensors_and_each_location_set_once(tmp_path: Path) -> None:
    k = 10
    model = inject(llama(), SpectralAdapter(basis="fft", r=4, n_coeffs=k))
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    locations = {key: t for key, t in stored.items() if key.startswith("__locations__.")}
    params = {key: t for key, t in stored.items() if key not in locations}
    # Factor shapes (hidden 32, kv 16, intermediate 64, r 4): A is (4, 32) or (4, 64);
    # B is (32, 4), (16, 4) or (64, 4): five distinct sets of k locations.
    assert len(locations) == 5
    assert all(t.dtype == torch.int32 and t.shape == (k,) for t in locations.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(trainable)
    assert all(key.endswith(".coefficients") for key in params)
    assert len(params) == 2 * 7 * 2  # 2 layers x 7 linears x 2 factors
    assert not any("base_layer" in key for key in stored)
    total = sum(t.numel() for t in stored.values())
    assert total == trainable_parameters(model) + 5 * k
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    q = meta["modules"]["model.layers.0.self_attn.k_proj.adapter"]
    assert q["layer"] == "model.layers.0.self_attn.k_proj"
    assert (q["d_in"], q["d_out"]) == (32, 16)
    assert q["factors"]["lora_B"]["shape"] == [16, 4]
    assert q["factors"]["lora_B"]["n_coeffs"] == k
    assert meta["adapter"] == model.selora_adapter.to_dict()
    assert meta["selora_version"] == selora.__version__


def test_dora_dense_saves_weights_and_magnitudes(tmp_path: Path) -> None:
    model = inject(mlp(), SpectralAdapter(basis=None, base="dora", r=4))
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    names = ("lora_A.weight", "lora_B.weight", "magnitude")
    assert set(stored) == {f"{i}.adapter.{name}" for i in (0, 2, 4) for name in names}
    assert sum(t.numel() for t in stored.values()) == trainable_parameters(model)


def test_frozen_adapter_parameters_are_saved(tmp_path: Path) -> None:
    model = inject(mlp(), SpectralAdapter(basis="dct", r=4))
    model[0].adapter.lora_A.coefficients.requires_grad_(False)  # a frozen expert, say
    save_adapter(model, tmp_path)
    assert "0.adapter.lora_A.coefficients" in load_file(tmp_path / WEIGHTS_NAME)


def test_read_adapter(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="db4", base="hira", r=4, seed=3)
    model = inject(mlp(), adapter)
    save_adapter(model, tmp_path)
    config, tensors, meta = read_adapter(tmp_path)
    assert config == adapter
    assert torch.equal(
        tensors["2.adapter.lora_B.coefficients"], model[2].adapter.lora_B.coefficients
    )
    key = meta["modules"]["2.adapter"]["factors"]["lora_A"]["locations"]
    assert torch.equal(tensors[key].long(), model[2].adapter.lora_A.indices)


# --------------------------------------------------------------------------- failures


def test_mismatched_shapes_fail_and_change_nothing(tmp_path: Path) -> None:
    save_adapter(inject(llama(), SpectralAdapter(basis="fft", r=4)), tmp_path)
    other = llama(hidden=48)
    before = snapshot(other)
    rng = torch.get_rng_state()
    pattern = r"'model\.layers\.0\.self_attn\.q_proj'.*\(32, 32\).*\(48, 48\)"
    with pytest.raises(AdapterCheckpointError, match=pattern):
        load_adapter(other, tmp_path)
    assert_untouched(other, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_mismatched_modules_to_save_fail_and_change_nothing(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="dct", r=4, modules_to_save=["4"], target_modules=["0", "2"])
    save_adapter(inject(mlp(), adapter), tmp_path)
    torch.manual_seed(0)
    other = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)
    )
    before = snapshot(other)
    with pytest.raises(AdapterCheckpointError, match=r"module '4'.*\(4,\).*\(5,\)"):
        load_adapter(other, tmp_path)
    assert_untouched(other, before)


def test_truncated_file_fails_naming_it(tmp_path: Path) -> None:
    save_adapter(inject(mlp(), SpectralAdapter(basis="fft", r=4)), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    model = mlp()
    before = snapshot(model)
    with pytest.raises(AdapterCheckpointError, match=re.escape(str(weights))):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


def test_missing_checkpoint_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / CONFIG_NAME))):
        load_adapter(mlp(), tmp_path)


def test_model_with_another_adapter_is_refused(tmp_path: Path) -> None:
    save_adapter(inject(mlp(), SpectralAdapter(basis="fft", r=4)), tmp_path)
    model = inject(mlp(), SpectralAdapter(basis="dct", r=4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterCheckpointError, match=r"another adapter.*basis"):
        load_adapter(model, tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_merged_model_is_refused(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="fft", r=4)
    save_adapter(inject(mlp(), adapter), tmp_path)
    model = selora.merge(inject(mlp(), adapter))
    with pytest.raises(AdapterCheckpointError, match="unmerge"):
        load_adapter(model, tmp_path)


def test_save_needs_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no selora adapter"):
        save_adapter(mlp(), tmp_path)


def test_load_keeps_eval_mode_and_global_rng(tmp_path: Path) -> None:
    save_adapter(inject(mlp(), SpectralAdapter(basis="fft", r=4, dropout=0.1)), tmp_path)
    model = mlp().eval()
    rng = torch.get_rng_state()
    load_adapter(model, tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m.training for m in model.modules())


# --------------------------------------------------------------------------- locations


def test_stored_locations_override_regenerated_ones(tmp_path: Path) -> None:
    adapter = SpectralAdapter(basis="fft", r=4, n_coeffs=12)
    model = inject(mlp(), adapter)
    perturb(model)
    save_adapter(model, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    stored = load_file(weights)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    key = meta["modules"]["0.adapter"]["factors"]["lora_A"]["locations"]  # shape (4, 16)
    regenerated = spectral_locations((4, 16), 12, 0)
    edited = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:12].sort().values
    assert not torch.equal(edited, regenerated)
    stored[key] = edited.to(torch.int32)
    save_file(stored, str(weights), metadata={"format": "pt"})

    fresh = load_adapter(mlp(), tmp_path)
    users = [m for m in fresh.modules() if isinstance(m, SparseSpectrum) and m.shape == (4, 16)]
    assert users and all(torch.equal(m.indices, edited) for m in users)
    assert all(m.indices.dtype == torch.int64 for m in users)
    assert torch.equal(spectral_locations((4, 16), 12, 0), regenerated)  # cache untouched
    # The loaded model computes what the original computes on the edited locations.
    for m in model.modules():
        if isinstance(m, SparseSpectrum) and m.shape == (4, 16):
            m.indices = edited.clone()
    x = torch.randn(3, 16)
    assert torch.equal(run(fresh, x), run(model, x))
    save_adapter(fresh, tmp_path / "again")
    assert torch.equal(load_file(tmp_path / "again" / WEIGHTS_NAME)[key], stored[key])


def test_bad_locations_are_rejected(tmp_path: Path) -> None:
    save_adapter(inject(mlp(), SpectralAdapter(basis="fft", r=4, n_coeffs=12)), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    stored = load_file(weights)
    key = next(k for k in stored if k.startswith("__locations__."))
    stored[key] = torch.zeros(12, dtype=torch.int32)  # repeated indices
    save_file(stored, str(weights))
    model = mlp()
    before = snapshot(model)
    with pytest.raises(AdapterCheckpointError, match="repeated"):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


# --------------------------------------------------------------------------- custom bases


def test_unregistered_basis_needs_registration(tmp_path: Path) -> None:
    class Identity(InverseTransform):
        orthonormal = True

        def inverse(self, spectrum: Tensor) -> Tensor:
            return spectrum.clone()

    model = inject(mlp(), SpectralAdapter(basis=Identity(), r=4))
    perturb(model)
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["adapter"]["basis"] == "Identity"
    assert meta["basis_class"].endswith("Identity")

    fresh = mlp()
    before = snapshot(fresh)
    with pytest.raises(AdapterCheckpointError, match=r"'Identity'.*not registered"):
        load_adapter(fresh, tmp_path)
    assert_untouched(fresh, before)

    selora.register_basis("Identity")(Identity)
    try:
        x = torch.randn(3, 16)
        assert torch.equal(run(load_adapter(fresh, tmp_path), x), run(model, x))
    finally:
        selora.unregister_basis("Identity")


def test_budget_is_checked_independently(tmp_path: Path) -> None:
    model = inject(mlp(), SpectralAdapter(basis="dct", r=4, sparse_ratio=0.5))
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    factor = meta["modules"]["2.adapter"]["factors"]["lora_A"]
    assert factor["shape"] == [4, 32]
    assert factor["n_coeffs"] == math.floor(0.5 * 4 * 32)


# --------------------------------------------------------------------------- generic saving


def test_xlora_frozen_experts_and_classifier_round_trip(tmp_path: Path) -> None:
    if "xlora" not in selora.list_adapter_bases():
        pytest.skip("X-LoRA is not available")
    options = {"n_experts": 2, "freeze_experts": True}
    model = inject(llama(), SpectralAdapter(basis="fft", base="xlora", r=4, base_options=options))
    for name, p in model.named_parameters():  # perturb every adapter tensor, then freeze all
        p.requires_grad_("experts" in name or "selora_" in name)
    perturb(model)
    model.requires_grad_(False)  # frozen experts and classifier must still be saved
    expected = run(model, TOKENS)
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    adapter_keys = {n for n, _ in model.named_parameters() if "experts" in n or "selora_" in n}
    assert {k for k in stored if not k.startswith("__locations__.")} == adapter_keys
    torch.manual_seed(11)
    fresh = load_adapter(llama(), tmp_path)
    assert torch.equal(run(fresh, TOKENS), expected)


def test_failed_injection_changes_nothing(tmp_path: Path) -> None:
    save_adapter(inject(mlp(), SpectralAdapter(basis="haar", r=4)), tmp_path)
    torch.manual_seed(0)  # the last layer's B factor would be (3, 4): odd, no wavelet fits it
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    before = snapshot(model)
    with pytest.raises(ValueError, match="even"):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)
