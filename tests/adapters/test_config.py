"""SpectralAdapter validation: every bad field raises ValueError naming the field."""

from __future__ import annotations

import math
import re

import pytest
import torch
from adapters_testkit import ADAPTATION_BASES, BASES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import selora
from selora import SpectralAdapter
from selora.adapters import DEFAULT_SPARSE_RATIO

BAD_FIELDS = [
    ("r", {"r": 0}),
    ("r", {"r": -3}),
    ("r", {"r": 2.5}),
    ("r", {"r": True}),
    ("alpha", {"alpha": -1}),
    ("alpha", {"alpha": 0}),
    ("alpha", {"alpha": math.inf}),
    ("alpha", {"alpha": math.nan}),
    ("dropout", {"dropout": 1.0}),
    ("dropout", {"dropout": -0.1}),
    ("dropout", {"dropout": math.nan}),
    ("basis", {"basis": "nope"}),
    ("basis", {"basis": 3}),
    ("base", {"base": "lorax"}),
    ("base", {"base": None}),
    ("sparse_ratio", {"basis": None, "sparse_ratio": 0.5}),
    ("n_coeffs", {"basis": None, "n_coeffs": 10}),
    ("n_coeffs", {"sparse_ratio": 0.5, "n_coeffs": 10}),
    ("sparse_ratio", {"sparse_ratio": 1.0}),
    ("sparse_ratio", {"sparse_ratio": -0.1}),
    ("sparse_ratio", {"sparse_ratio": "0.5"}),
    ("n_coeffs", {"n_coeffs": 0}),
    ("n_coeffs", {"n_coeffs": 2.0}),
    ("target_modules", {"target_modules": "(unclosed"}),
    ("target_modules", {"target_modules": ""}),
    ("target_modules", {"target_modules": []}),
    ("target_modules", {"target_modules": ["q_proj", ""]}),
    ("exclude_modules", {"exclude_modules": [3]}),
    ("modules_to_save", {"modules_to_save": [None]}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 1.5}),
    ("base_options", {"base_options": {"experts": 2}}),
    ("base_options", {"base_options": [("a", 1)]}),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD_FIELDS, ids=[f"{f}-{k}" for f, k in BAD_FIELDS])
def test_bad_field_raises_value_error_naming_it(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=rf"SpectralAdapter\.{field}\b"):
        SpectralAdapter(**kwargs)  # type: ignore[arg-type]


def test_unknown_basis_suggests_the_closest_name() -> None:
    with pytest.raises(ValueError, match=r"Did you mean 'haar'\?"):
        SpectralAdapter(basis="haarr")
    with pytest.raises(ValueError, match=r"Did you mean 'lora'\?"):
        SpectralAdapter(base="lorax")


def test_unknown_basis_error_lists_registered_names() -> None:
    with pytest.raises(ValueError) as info:
        SpectralAdapter(basis="nope")
    for name in selora.list_bases():
        assert name in str(info.value)


def test_any_pywavelets_name_is_a_valid_basis() -> None:
    adapter = SpectralAdapter(basis="sym8")
    assert adapter.basis_label == "sym8"


def test_defaults() -> None:
    adapter = SpectralAdapter()
    assert adapter.sparse_ratio == DEFAULT_SPARSE_RATIO
    assert adapter.n_coeffs is None
    assert adapter.scaling == 1.0
    assert adapter.target_modules == "all-linear"
    dense = SpectralAdapter(basis=None)
    assert dense.sparse_ratio is None and dense.n_coeffs is None


def test_fora_budget_leaves_sparse_ratio_unset() -> None:
    adapter = SpectralAdapter(n_coeffs=100)
    assert adapter.sparse_ratio is None and adapter.n_coeffs == 100


def test_config_is_frozen() -> None:
    adapter = SpectralAdapter()
    with pytest.raises(AttributeError):
        adapter.r = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        adapter.base_options["x"] = 1  # type: ignore[index]


def test_sequence_targets_become_a_tuple() -> None:
    adapter = SpectralAdapter(target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"])
    assert adapter.target_modules == ("q_proj", "v_proj")
    assert adapter.exclude_modules == ("lm_head",)


def test_string_exclude_is_a_regex_and_round_trips() -> None:
    adapter = SpectralAdapter(exclude_modules=r".*\.layers\.0\..*")
    assert adapter.exclude_modules == r".*\.layers\.0\..*"
    assert SpectralAdapter.from_dict(adapter.to_dict()) == adapter
    listed = SpectralAdapter(exclude_modules=["a", "b"])
    assert SpectralAdapter.from_dict(listed.to_dict()) == listed
    with pytest.raises(ValueError, match=r"exclude_modules.*regular expression"):
        SpectralAdapter(exclude_modules="q_(")


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown SpectralAdapter fields"):
        SpectralAdapter.from_dict({"rank": 4})


@settings(max_examples=60, deadline=None)
@given(
    basis=st.sampled_from(BASES),
    base=st.sampled_from(ADAPTATION_BASES),
    r=st.integers(1, 64),
    alpha=st.none() | st.floats(1e-3, 1e3),
    budget=st.sampled_from(["ratio", "count", "none"]),
    ratio=st.floats(0.0, 0.99),
    count=st.integers(1, 10_000),
    dropout=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31),
    targets=st.sampled_from(["all-linear", r".*\.q_proj", ("q_proj", "v_proj")]),
)
def test_valid_configs_round_trip_through_dict(
    basis: str | None,
    base: str,
    r: int,
    alpha: float | None,
    budget: str,
    ratio: float,
    count: int,
    dropout: float,
    seed: int,
    targets: str | tuple[str, ...],
) -> None:
    kwargs: dict[str, object] = {}
    if basis is not None and budget == "ratio":
        kwargs["sparse_ratio"] = ratio
    elif basis is not None and budget == "count":
        kwargs["n_coeffs"] = count
    adapter = SpectralAdapter(
        basis=basis,
        base=base,
        r=r,
        alpha=alpha,
        dropout=dropout,
        seed=seed,
        target_modules=targets,
        **kwargs,  # type: ignore[arg-type]
    )
    assert adapter.scaling == pytest.approx(1.0 if alpha is None else alpha / r)
    assert SpectralAdapter.from_dict(adapter.to_dict()) == adapter


@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_sparse_ratio_outside_unit_interval_always_raises(value: float) -> None:
    if 0.0 <= value < 1.0:
        assert SpectralAdapter(sparse_ratio=value).sparse_ratio == value
    else:
        with pytest.raises(ValueError, match=r"SpectralAdapter\.sparse_ratio"):
            SpectralAdapter(sparse_ratio=value)


@settings(max_examples=40, deadline=None)
@given(value=st.integers(-(2**40), 0))
def test_non_positive_rank_always_raises(value: int) -> None:
    with pytest.raises(ValueError, match=r"SpectralAdapter\.r\b"):
        SpectralAdapter(r=value)


@pytest.mark.parametrize("basis", ["fft", "haar"])
def test_n_coeffs_larger_than_a_factor_raises_at_inject_naming_the_module(basis: str) -> None:
    model = nn.Sequential()
    model.add_module("big", nn.Linear(64, 64))
    model.add_module("small", nn.Linear(8, 6))
    # r * d_in = 4 * 8 = 32 < 100: the factors of "small" cannot hold 100 coefficients.
    # "big" comes first and is fine: a failed inject must leave no trace of it either.
    adapter = SpectralAdapter(basis=basis, r=4, n_coeffs=100, target_modules=["small", "big"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"small") as info:
        selora.inject(model, adapter)
    assert "n_coeffs" in str(info.value)
    assert not any(isinstance(m, selora.SpectralLayer) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_odd_shape_for_a_wavelet_raises_at_inject_naming_the_module() -> None:
    model = nn.Sequential()
    model.add_module("odd", nn.Linear(8, 7))
    with pytest.raises(ValueError, match=re.escape("odd")) as info:
        selora.inject(model, SpectralAdapter(basis="haar", r=4))
    assert "even" in str(info.value)
