"""Checkpoint specs of bases: basis_spec proves a spec rebuilds its basis, build_basis obeys it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from basis_shapes import fit_shape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selora.spectral_bases import (
    BasisNotSavableError,
    HaarTransform,
    InverseTransform,
    UnknownBasisError,
    WaveletTransform,
    basis_spec,
    build_basis,
    get_basis,
    list_bases,
)

Register = Callable[..., type[InverseTransform]]
FIXTURE_OK = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def make_seeded(*, declare: bool) -> type[InverseTransform]:
    """A fresh class T(F) = F * W_seed (W drawn per shape from the seed), declaring it or not.

    A new class per test: register_basis sets the class' name, which outlives
    the registration.
    """

    class Seeded(InverseTransform):
        def __init__(self, seed: int = 0) -> None:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise TypeError(f"seed must be an int; got {seed!r}")
            self.seed = seed

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            m, n = spectrum.shape[-2:]
            generator = torch.Generator().manual_seed(self.seed)
            weights = 1.0 + torch.rand(m, n, generator=generator, dtype=torch.float64)
            return spectrum * weights.to(spectrum.dtype)

    if declare:

        def options(self: Seeded) -> dict[str, Any]:
            return {"seed": self.seed}

        Seeded.options = options  # type: ignore[method-assign]
    return Seeded


def make_identity() -> type[InverseTransform]:
    class Identity(InverseTransform):
        orthonormal = True

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum.clone()

    return Identity


def round_trip(basis: InverseTransform | str) -> InverseTransform:
    """basis_spec -> JSON text -> build_basis, as a checkpoint does."""
    text = json.dumps(basis_spec(basis))
    return build_basis(json.loads(text))


even = st.integers(1, 8).map(lambda h: 2 * h)


@pytest.mark.parametrize("name", [*list_bases(), "sym8"])
@settings(max_examples=10, deadline=None)
@given(m=even, n=even, seed=st.integers(0, 2**32))
def test_builtin_round_trips_bit_identically(name: str, m: int, n: int, seed: int) -> None:
    m, n = fit_shape(name, (m, n))
    original = get_basis(name)
    spec = basis_spec(original)
    assert spec == basis_spec(name)  # a name is described by the basis it builds
    assert spec["name"] == name and spec["options"] == {}
    assert spec["cls"] == f"{type(original).__module__}.{type(original).__qualname__}"
    rebuilt = round_trip(original)
    assert type(rebuilt) is type(original)
    spectrum = torch.randn(3, m, n, generator=torch.Generator().manual_seed(seed))
    for dtype in (torch.float32, torch.float64):
        x = spectrum.to(dtype)
        assert torch.equal(rebuilt(x), original(x))


def test_registered_wavelet_built_with_another_wavelet_keeps_it() -> None:
    basis = HaarTransform(wavelet="sym4")
    spec = basis_spec(basis)
    assert spec == {
        "name": "haar",
        "cls": "selora.spectral_bases.wavelet.HaarTransform",
        "options": {"wavelet": "sym4"},
    }
    rebuilt = round_trip(basis)
    assert type(rebuilt) is HaarTransform and rebuilt.wavelet == "sym4"
    x = torch.randn(8, 12, dtype=torch.float64)
    assert torch.equal(rebuilt(x), basis(x))


def test_wavelet_of_a_registered_name_built_by_hand_is_refused() -> None:
    # get_basis("haar") builds a HaarTransform: same transform, another class.
    with pytest.raises(BasisNotSavableError, match=r"builds a .*HaarTransform, not a .*Wavelet"):
        basis_spec(WaveletTransform("haar"))
    assert type(round_trip(WaveletTransform("sym8"))) is WaveletTransform


@FIXTURE_OK
@given(seed=st.integers(0, 2**62))
def test_user_basis_declaring_its_seed_round_trips(temporary_basis: Register, seed: int) -> None:
    cls = temporary_basis("test-spec-seeded", make_seeded(declare=True), override=True)
    basis = cls(seed=seed)  # type: ignore[call-arg]
    spec = basis_spec(basis)
    assert spec["name"] == "test-spec-seeded" and spec["options"] == {"seed": seed}
    rebuilt = round_trip(basis)
    assert type(rebuilt) is cls and rebuilt.seed == seed  # type: ignore[attr-defined]
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.equal(rebuilt(x), basis(x))


@FIXTURE_OK
@given(seed=st.integers(1, 2**32 - 1))  # torch's CPU generator keeps the low 32 bits
def test_user_basis_not_declaring_its_seed_is_refused(temporary_basis: Register, seed: int) -> None:
    cls = temporary_basis("test-spec-undeclared", make_seeded(declare=False), override=True)
    with pytest.raises(
        BasisNotSavableError,
        match=r"Seeded basis 'test-spec-undeclared' rebuilt from its declared options \{\} "
        r"computes a different transform.*declare the constructor arguments in options\(\)",
    ):
        basis_spec(cls(seed=seed))  # type: ignore[call-arg]
    # At its defaults the name alone does rebuild it: the check is on behaviour.
    assert basis_spec(cls())["options"] == {}


def test_nothing_is_cached(temporary_basis: Register, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = temporary_basis("test-spec-fixed", make_seeded(declare=False))
    basis = cls(seed=3)  # type: ignore[call-arg]
    with pytest.raises(BasisNotSavableError):
        basis_spec(basis)
    monkeypatch.setattr(cls, "options", lambda self: {"seed": self.seed})
    assert basis_spec(basis)["options"] == {"seed": 3}


def test_probing_leaves_the_global_rng_alone(temporary_basis: Register) -> None:
    cls = temporary_basis("test-spec-rng", make_seeded(declare=True))
    state = torch.get_rng_state()
    basis_spec(cls(seed=5))  # type: ignore[call-arg]
    basis_spec("bior")
    assert torch.equal(torch.get_rng_state(), state)


def test_unregistered_basis_is_refused() -> None:
    with pytest.raises(BasisNotSavableError, match=r"not registered.*register_basis\('Identity'\)"):
        basis_spec(make_identity()())


def test_constructor_arguments_that_are_required_but_undeclared(temporary_basis: Register) -> None:
    class Scaled(InverseTransform):
        def __init__(self, scale: float) -> None:
            self.scale = scale

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum * self.scale

    temporary_basis("test-spec-required", Scaled)
    with pytest.raises(BasisNotSavableError, match=r"cannot be rebuilt.*TypeError.*options\(\)"):
        basis_spec(Scaled(2.0))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"shape": (2, 3)}, "JSON round trip"),
        ({"scale": math.nan}, "not JSON-serialisable"),
        ({"device": torch.device("cpu")}, "not JSON-serialisable"),
        ({1: 2}, "not strings"),
        ([("seed", 1)], "not a dict"),
    ],
)
def test_options_that_are_not_json_are_refused(
    temporary_basis: Register, options: Any, problem: str
) -> None:
    cls = make_identity()
    cls.options = lambda self: options  # type: ignore[method-assign]
    temporary_basis("test-spec-json", cls)
    with pytest.raises(BasisNotSavableError, match=problem):
        basis_spec(cls())


def test_orthonormal_flag_must_rebuild(temporary_basis: Register) -> None:
    class Flagged(InverseTransform):
        def __init__(self, unit: bool = True) -> None:
            self.orthonormal = unit

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum.clone()

    temporary_basis("test-spec-flag", Flagged)
    with pytest.raises(BasisNotSavableError, match=r"orthonormal=False.*orthonormal=True"):
        basis_spec(Flagged(unit=False))


def test_basis_refusing_every_probe_shape_needs_shapes(temporary_basis: Register) -> None:
    class OddOnly(InverseTransform):
        def check_shape(self, m: int, n: int) -> None:
            if (m, n) != (3, 5):
                raise ValueError("only (3, 5)")

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return 2.0 * spectrum

    temporary_basis("test-spec-odd", OddOnly)
    with pytest.raises(BasisNotSavableError, match=r"none of the probe shapes.*shapes="):
        basis_spec(OddOnly())
    assert basis_spec(OddOnly(), shapes=[(3, 5)])["name"] == "test-spec-odd"


def test_basis_spec_refuses_non_bases() -> None:
    with pytest.raises(TypeError, match="basis name or an InverseTransform"):
        basis_spec(42)  # type: ignore[arg-type]
    with pytest.raises(UnknownBasisError):
        basis_spec("no-such-basis")


def test_class_mismatch_is_refused_at_load(temporary_basis: Register) -> None:
    seeded = temporary_basis("test-spec-swap", make_seeded(declare=True))
    spec = basis_spec(seeded(seed=1))  # type: ignore[call-arg]
    temporary_basis("test-spec-swap", make_identity(), override=True)
    with pytest.raises(
        ValueError,
        match=r"saved basis 'test-spec-swap' is a .*Seeded, but .* now builds a .*Identity",
    ):
        build_basis({**spec, "options": {}})
    with pytest.raises(ValueError, match=r"saved options \{'seed': 1\}"):
        build_basis(spec)  # Identity takes no seed


def test_unknown_name_asks_for_registration() -> None:
    with pytest.raises(UnknownBasisError, match=r"unknown basis 'nope'.*register_basis\('nope'\)"):
        build_basis({"name": "nope", "cls": "somewhere.Nope", "options": {}})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([("name", "fft")], "is a mapping"),
        ({"name": "fft", "options": {}}, r"missing 'cls'"),
        (
            {"name": "fft", "cls": "selora.spectral_bases.fourier.FourierTransform"},
            "missing 'options'",
        ),
        (
            {
                "name": "fft",
                "cls": "selora.spectral_bases.fourier.FourierTransform",
                "options": {},
                "version": 1,
            },
            "unexpected 'version'",
        ),
        ({"name": 3, "cls": "x.Y", "options": {}}, "'name' must be a non-empty string"),
        ({"name": "", "cls": "x.Y", "options": {}}, "'name' must be a non-empty string"),
        ({"name": "fft", "cls": None, "options": {}}, "'cls' must be a non-empty string"),
        ({"name": "fft", "cls": "x.Y", "options": []}, "'options' must be a dict.*not a dict"),
        ({"name": "fft", "cls": "x.Y", "options": {1: 2}}, "not strings"),
        ({"name": "fft", "cls": "x.Y", "options": {"a": (1,)}}, "JSON round trip"),
    ],
)
def test_malformed_specs_are_refused(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_basis(spec)


def test_bad_options_name_the_options(temporary_basis: Register) -> None:
    cls = temporary_basis("test-spec-opts", make_seeded(declare=True))
    spec = basis_spec(cls(seed=2))  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"saved options \{'seed': 'two'\}.*seed must be an int"):
        build_basis({**spec, "options": {"seed": "two"}})
    with pytest.raises(ValueError, match=r"saved options \{'colour': 1\}.*TypeError"):
        build_basis({**spec, "options": {"colour": 1}})
    wavelet = basis_spec("sym8")
    with pytest.raises(ValueError, match=r"saved options \{'wavelet': 'db2'\}"):
        build_basis({**wavelet, "options": {"wavelet": "db2"}})
    haar = basis_spec("haar")
    with pytest.raises(ValueError, match=r"not a PyWavelets discrete wavelet"):
        build_basis({**haar, "options": {"wavelet": "nope"}})


def test_options_the_basis_does_not_declare_back_are_refused(temporary_basis: Register) -> None:
    cls = temporary_basis("test-spec-forgetful", make_seeded(declare=False))
    spec = {"name": "test-spec-forgetful", "cls": basis_spec(cls())["cls"], "options": {"seed": 4}}
    with pytest.raises(ValueError, match=r"declares \{\}; its options\(\) does not match"):
        build_basis(spec)


def test_the_class_path_is_never_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_basis imported a module")

    # "this" prints the Zen of Python when imported: a module nothing here loads.
    assert "this" not in sys.modules
    monkeypatch.setattr(importlib, "import_module", refuse)
    with pytest.raises(ValueError, match=r"is a this\.Zen, but get_basis\('fft'\) now builds"):
        build_basis({"name": "fft", "cls": "this.Zen", "options": {}})
    assert "this" not in sys.modules
