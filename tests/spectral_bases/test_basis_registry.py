"""The basis registry: registration rules, look-up errors, filtering, user bases end to end."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from selora.spectral_bases import (
    InverseTransform,
    SparseSpectrum,
    UnknownBasisError,
    WaveletTransform,
    basis_name,
    get_basis,
    list_bases,
    register_basis,
    unregister_basis,
)


def make_identity() -> type[InverseTransform]:
    class Identity(InverseTransform):
        orthonormal = True

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum.clone()

    return Identity


@functools.cache
def orthogonal_matrix(size: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(size).standard_normal((size, size)))
    return torch.from_numpy(q * np.sign(np.diag(r)))


class RandomOrthogonal(InverseTransform):
    """T(F) = Q_m F Q_n^T with fixed random orthogonal Q_m, Q_n: orthonormal and dense."""

    orthonormal = True

    def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        qm = orthogonal_matrix(spectrum.shape[-2]).to(spectrum.dtype)
        qn = orthogonal_matrix(spectrum.shape[-1]).to(spectrum.dtype)
        return qm @ spectrum @ qn.T


def test_builtins_are_registered_and_sorted() -> None:
    names = list_bases()
    assert names == sorted(names)
    assert {"fft", "dct", "haar", "db4", "bior", "coif"} <= set(names)


def test_register_returns_the_class_named(temporary_basis) -> None:
    cls = make_identity()
    assert temporary_basis("test-identity", cls) is cls
    assert cls.name == "test-identity"
    assert "test-identity" in list_bases()
    basis = get_basis("test-identity")
    assert type(basis) is cls
    assert basis_name(basis) == "test-identity" == basis_name("test-identity")


def test_duplicate_name_is_refused(temporary_basis) -> None:
    first = temporary_basis("test-dup", make_identity())
    with pytest.raises(ValueError, match=r"already registered.*override=True"):
        register_basis("test-dup")(make_identity())
    assert type(get_basis("test-dup")) is first
    with pytest.raises(ValueError, match="already registered"):
        register_basis("fft")(make_identity())
    assert type(get_basis("fft")).__name__ == "FourierTransform"


def test_override_replaces(temporary_basis) -> None:
    temporary_basis("test-override", make_identity())
    replacement = temporary_basis("test-override", RandomOrthogonal, override=True)
    assert type(get_basis("test-override")) is replacement
    assert list_bases(include="test-override") == ["test-override"]


@pytest.mark.parametrize("bad", [object, int, lambda spectrum: spectrum, "fft", None])
def test_non_inverse_transform_is_refused(bad: object) -> None:
    before = list_bases()
    with pytest.raises(TypeError, match="InverseTransform"):
        register_basis("test-bad")(bad)  # type: ignore[arg-type]
    assert list_bases() == before


def test_an_instance_is_not_a_class() -> None:
    with pytest.raises(TypeError):
        register_basis("test-instance")(make_identity()())  # type: ignore[arg-type]
    assert "test-instance" not in list_bases()


@pytest.mark.parametrize("name", ["", None, 3, b"fft"])
def test_bad_name_is_refused(name: object) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        register_basis(name)  # type: ignore[arg-type]


def test_unregister_unknown_name() -> None:
    with pytest.raises(KeyError, match="test-never-registered"):
        unregister_basis("test-never-registered")


def test_unregister_removes(temporary_basis) -> None:
    temporary_basis("test-gone", make_identity())
    unregister_basis("test-gone")
    assert "test-gone" not in list_bases()
    with pytest.raises(UnknownBasisError):
        get_basis("test-gone")


@pytest.mark.parametrize(("typo", "closest"), [("haarr", "haar"), ("fftt", "fft"), ("dtc", "dct")])
def test_unknown_name_suggests_the_closest(typo: str, closest: str) -> None:
    with pytest.raises(UnknownBasisError) as info:
        get_basis(typo)
    error = info.value
    assert isinstance(error, KeyError) and isinstance(error, ValueError)
    message = str(error)
    assert f"Did you mean {closest!r}?" in message
    assert repr(typo) in message
    for name in list_bases():
        assert name in message


def test_unknown_name_is_caught_as_key_and_value_error() -> None:
    with pytest.raises(KeyError):
        get_basis("no-such-basis")
    with pytest.raises(ValueError):
        get_basis("no-such-basis")
    with pytest.raises(UnknownBasisError) as info:
        get_basis("qqqqqqqqqq")
    assert "Did you mean" not in str(info.value)


def test_pywavelets_names_resolve_without_registration() -> None:
    for name in ["sym8", "coif3", "bior4.4", "dmey", "db10"]:
        basis = get_basis(name)
        assert isinstance(basis, WaveletTransform)
        assert basis.wavelet == name
        assert basis_name(basis) == name
        assert name not in list_bases()
    with pytest.raises(UnknownBasisError):
        get_basis("db999")
    with pytest.raises(ValueError, match="PyWavelets"):
        WaveletTransform("morl")  # continuous, not discrete


def test_list_bases_filters(temporary_basis) -> None:
    for name in ["zz-alpha", "zz-beta", "zy-gamma"]:
        temporary_basis(name, make_identity())
    assert list_bases(include="zz-*") == ["zz-alpha", "zz-beta"]
    assert list_bases(include=["zz-a*", "zy-*"]) == ["zy-gamma", "zz-alpha"]
    assert list_bases(include=("zz-*", "zz-alpha")) == ["zz-alpha", "zz-beta"]  # no duplicates
    assert list_bases(include="z*", exclude="*beta") == ["zy-gamma", "zz-alpha"]
    assert list_bases(include="z*", exclude=["*alpha", "zy-*"]) == ["zz-beta"]
    assert list_bases(include="nothing-*") == []
    assert list_bases(include=[]) == []
    everything = list_bases()
    assert list_bases(exclude="z*") == [n for n in everything if not n.startswith("z")]
    assert list_bases(exclude=[]) == everything


def test_list_bases_builtin_patterns() -> None:
    d_names = list_bases(include="d*")
    assert d_names == sorted(d_names)
    assert {"db4", "dct"} <= set(d_names)
    assert all(name.startswith("d") for name in d_names)
    assert "fft" not in d_names
    assert "dct" not in list_bases(exclude="d*")
    assert "haar" in list_bases(exclude="d*")
    assert list_bases(include="?ct") == ["dct"]


def test_user_basis_end_to_end(temporary_basis) -> None:
    temporary_basis("test-orthogonal", RandomOrthogonal)
    shape = (6, 10)
    spectrum = SparseSpectrum(shape, "test-orthogonal", sparse_ratio=0.5, dtype=torch.float64)
    assert spectrum.basis.label() == "test-orthogonal"
    qm, qn = orthogonal_matrix(6), orthogonal_matrix(10)

    out = spectrum()
    dense = spectrum.dense_spectrum().detach()
    c = spectrum.scale_factor  # orthonormal: sqrt(mn / k)
    assert c == pytest.approx(math.sqrt(60 / spectrum.n_coeffs), rel=1e-12)
    torch.testing.assert_close(out, c * qm @ dense @ qn.T, rtol=0, atol=1e-12)

    upstream = torch.randn(shape, dtype=torch.float64)
    (out * upstream).sum().backward()
    expected = c * (qm.T @ upstream @ qn).reshape(-1)[spectrum.indices]
    torch.testing.assert_close(spectrum.coefficients.grad, expected, rtol=0, atol=1e-12)

    big = SparseSpectrum((32, 64), "test-orthogonal", sparse_ratio=0.3)
    with torch.no_grad():
        variance = big().double().var(correction=0).item()
    assert variance == pytest.approx(1.0 / (3 * 64), rel=0.05)
    # orthonormal, on LoRA's scale: calibrated coefficients have RMS ~ sqrt(1 / (3 n))
    energy = big.coefficients.double().square().sum().item()
    assert energy == pytest.approx(big.n_coeffs / (3 * 64), rel=0.05)


def test_user_basis_instance_without_registration() -> None:
    identity = make_identity()()
    spectrum = SparseSpectrum((4, 5), identity, n_coeffs=7)
    assert basis_name(spectrum.basis) == "Identity"
    c = math.sqrt(20 / 7)
    assert spectrum.scale_factor == pytest.approx(c, rel=1e-12)
    torch.testing.assert_close(spectrum(), c * spectrum.dense_spectrum())
    assert torch.count_nonzero(spectrum()) <= 7
    spectrum().sum().backward()
    assert spectrum.coefficients.grad is not None
    torch.testing.assert_close(spectrum.coefficients.grad, torch.full((7,), c))
    # calibrated: the entries' mean square is Kaiming's 1 / (3 n) = 1 / 15
    mean_square = spectrum().detach().double().square().mean().item()
    assert math.isclose(mean_square, 1 / 15, rel_tol=1e-4)


def test_user_basis_can_refuse_shapes(temporary_basis) -> None:
    class SquareOnly(InverseTransform):
        def check_shape(self, m: int, n: int) -> None:
            if m != n:
                raise ValueError(f"{self.label()} takes square matrices; got ({m}, {n})")

        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum.transpose(-1, -2).contiguous()

    temporary_basis("test-square", SquareOnly)
    with pytest.raises(ValueError, match=r"test-square takes square.*\(3, 4\)"):
        SparseSpectrum((3, 4), "test-square", n_coeffs=2)
    with pytest.raises(ValueError, match="square"):
        get_basis("test-square")(torch.zeros(3, 4))
    assert SparseSpectrum((4, 4), "test-square", n_coeffs=2)().shape == (4, 4)
