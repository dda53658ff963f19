"""Spectra after meta-device init, user bases that break the contract, and a zero B factor.

Issue 14: ``inject`` on the meta device, then ``to_empty`` and ``reset_parameters``,
left the locations as uninitialised memory; a user basis with a wrong output
failed deep inside torch; and B was calibrated before being zeroed, so a
constant-valued B (``n_coeffs=1``, fft, a one-output head) failed at inject.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import selora
from selora import SparseSpectrum, SpectralAdapter
from selora.spectral_bases import InverseTransform


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _spectra(model: nn.Module) -> list[tuple[str, SparseSpectrum]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseSpectrum)]


def _reset(model: nn.Module) -> None:
    """Re-initialise every spectrum with its own seeded generator, as a materialiser would."""
    for i, (_, spectrum) in enumerate(_spectra(model)):
        spectrum.reset_parameters(torch.Generator().manual_seed(i))


# --------------------------------------------------------------------------- meta device


@pytest.mark.parametrize("basis", ["fft", "bior", "dct"])
@pytest.mark.parametrize("scale", ["lora", "paper"])
def test_meta_init_then_to_empty_and_reset_gives_exact_locations(basis: str, scale: str) -> None:
    adapter = SpectralAdapter(basis=basis, r=4, sparse_ratio=0.5, scale=scale)  # type: ignore[arg-type]
    torch.manual_seed(0)
    normal = selora.inject(_mlp(), adapter)
    with torch.device("meta"):  # as accelerate / FSDP2 users build a large model
        lazy = selora.inject(_mlp(), adapter)
    assert all(s.coefficients.is_meta for _, s in _spectra(lazy))

    lazy.to_empty(device="cpu")
    # to_empty alone: the locations are exact, not uninitialised memory
    for (name, mine), (_, theirs) in zip(_spectra(lazy), _spectra(normal), strict=True):
        assert mine.indices.device.type == "cpu" and mine.indices.dtype == torch.int64
        assert torch.equal(mine.indices, theirs.indices), name
        assert mine.scale_factor == theirs.scale_factor

    # then reset: A calibrated, B at zero again; the same function as the normal model
    _reset(lazy)
    _reset(normal)
    for name, spectrum in _spectra(lazy):
        if name.endswith("lora_B"):
            assert torch.count_nonzero(spectrum.coefficients) == 0, name
    with torch.no_grad():
        for key, value in normal.state_dict().items():
            if "base_layer" in key:
                lazy.state_dict()[key].copy_(value)
        x = torch.randn(5, 16)
        assert torch.equal(lazy(x), normal(x))
        for _, spectrum in _spectra(normal):
            spectrum.coefficients.normal_()
        lazy.load_state_dict(normal.state_dict())
        assert torch.equal(lazy(x), normal(x))


def test_meta_init_then_load_state_dict_with_assign_regenerates_the_locations() -> None:
    adapter = SpectralAdapter(basis="fft", r=4, sparse_ratio=0.5)
    torch.manual_seed(0)
    normal = selora.inject(_mlp(), adapter)
    with torch.no_grad():
        for _, spectrum in _spectra(normal):
            spectrum.coefficients.normal_()
    with torch.device("meta"):
        lazy = _mlp()
    selora.inject(lazy, adapter)
    lazy.load_state_dict(normal.state_dict(), assign=True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(lazy(x), normal(x))
    for (_, mine), (_, theirs) in zip(_spectra(lazy), _spectra(normal), strict=True):
        assert torch.equal(mine.indices, theirs.indices)


def test_moving_a_relocated_spectrum_keeps_its_locations() -> None:
    spectrum = SparseSpectrum((8, 16), "fft", n_coeffs=6)
    moved = torch.tensor([1 * 16 + 3, 7 * 16 + 13, 2, 14, 5, 11])
    spectrum.set_locations(moved)
    scale = spectrum.scale_factor
    spectrum.to(torch.float64)
    spectrum.to_empty(device="cpu")  # values of the coefficients are gone, not the locations
    assert torch.equal(spectrum.indices, moved)
    assert spectrum.scale_factor == scale


# --------------------------------------------------------------------------- basis contract


class _WrongShape(InverseTransform):
    def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        return spectrum.transpose(-1, -2)


class _WrongDtype(InverseTransform):
    def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        return spectrum.double() if spectrum.dtype == torch.float32 else spectrum.float()


class _NotATensor(InverseTransform):
    def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        return spectrum.numpy()  # type: ignore[return-value]


class _Crashes(InverseTransform):
    def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
        return spectrum @ torch.ones(3, 3, dtype=spectrum.dtype)


@pytest.mark.parametrize(
    ("basis", "error", "message"),
    [
        (_WrongShape(), ValueError, r"basis '_WrongShape' .*returned shape \(8, 4\).*\(4, 8\)"),
        (_WrongDtype(), ValueError, r"basis '_WrongDtype' .*returned dtype torch.float64"),
        (_NotATensor(), TypeError, r"basis '_NotATensor' .*returned a ndarray, not a torch.Tensor"),
        (_Crashes(), ValueError, r"basis '_Crashes' \(_Crashes\) fails on a torch.float32"),
    ],
    ids=["shape", "dtype", "type", "crash"],
)
def test_a_user_basis_that_breaks_the_contract_is_named_at_construction(
    basis: InverseTransform, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        SparseSpectrum((4, 8), basis, n_coeffs=5)
    with pytest.raises(error, match=message):  # the same through inject, before any forward
        selora.inject(
            nn.Sequential(nn.Linear(8, 4)),
            SpectralAdapter(basis=basis, r=4, n_coeffs=5, target_modules=["0"]),
        )


def test_the_contract_is_checked_in_the_coefficients_dtype() -> None:
    class OnlyFloat32(InverseTransform):
        def inverse(self, spectrum: torch.Tensor) -> torch.Tensor:
            return spectrum.float()

    SparseSpectrum((4, 8), OnlyFloat32(), n_coeffs=5, scale="paper")
    with pytest.raises(ValueError, match=r"returned dtype torch\.float32 for a torch\.float64"):
        SparseSpectrum((4, 8), OnlyFloat32(), n_coeffs=5, dtype=torch.float64)


# --------------------------------------------------------------------------- zero B


def test_a_constant_valued_b_factor_is_built_at_zero_not_calibrated() -> None:
    # B of a one-output head is (1, 4); fft's single location there is the DC term,
    # a constant matrix: calibrating it failed inject with "variance 0.0".
    assert selora.spectral_bases.spectral_locations((1, 4), 1, 0).item() == 0
    model = nn.Sequential(nn.Linear(16, 1))
    x = torch.randn(3, 16)
    expected = model(x).detach()
    selora.inject(model, SpectralAdapter(basis="fft", r=4, n_coeffs=1, target_modules=["0"]))
    b = model[0].adapter.lora_B
    assert isinstance(b, SparseSpectrum) and b.init == "zero"
    assert torch.count_nonzero(b.coefficients) == 0
    assert torch.equal(model(x).detach(), expected)
    b.reset_parameters()  # a re-initialisation keeps B at zero
    assert torch.count_nonzero(b.coefficients) == 0
    assert model[0].adapter.lora_A.init == "kaiming"


def test_zero_init_spectrum_skips_calibration() -> None:
    # one coefficient: a constant matrix, calibrated by its mean square (no longer refused)
    calibrated = SparseSpectrum((1, 4), "fft", n_coeffs=1, dtype=torch.float64)
    with torch.no_grad():
        assert calibrated().square().mean().item() == pytest.approx(1 / 12, rel=1e-9)
    spectrum = SparseSpectrum((1, 4), "fft", n_coeffs=1, init="zero")
    assert torch.count_nonzero(spectrum()) == 0
