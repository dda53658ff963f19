r"""Checkpoint specs of spectral bases: the registered name, the class path, the options.

A checkpoint must rebuild *exactly* the basis it was trained with, so it stores
a :class:`BasisSpec`, never a pickled object:

.. code-block:: json

    {"name": "haar", "cls": "selora.spectral_bases.wavelet.HaarTransform", "options": {}}

:func:`basis_spec` writes one only after proving it rebuilds the basis: the
instance ``get_basis(name, **options)`` must be of the same class, declare the
same options and compute the same transform on probe spectra. So a basis whose
constructor arguments are not declared by :meth:`InverseTransform.options`
cannot be saved, instead of silently reloading with its defaults.
:func:`build_basis` rebuilds from a spec read from a file through the registry
alone: the class path is compared with the built class, never imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

import torch

from selora.spectral_bases.registry import InverseTransform, UnknownBasisError, get_basis

__all__ = ["BasisNotSavableError", "BasisSpec", "PROBE_SHAPES", "basis_spec", "build_basis"]

PROBE_SHAPES: tuple[tuple[int, int], ...] = ((8, 8), (4, 6), (16, 12), (2, 2))
"""Shapes :func:`basis_spec` probes a basis at (those its ``check_shape`` refuses are skipped)."""

_PROBE_SEED = 20240917
# Both bases run the same code on the same input, so anything beyond rounding
# noise of a float64 transform of O(1) entries means a different transform.
_PROBE_ATOL = 1e-12
_ENERGY_RTOL = 1e-12
_KEYS = frozenset({"name", "cls", "options"})


class BasisSpec(TypedDict):
    """What a checkpoint stores of a spectral basis (see :func:`basis_spec`).

    Attributes:
        name: the name :func:`~selora.spectral_bases.get_basis` builds it by
            (a registered name, or a PyWavelets wavelet name).
        cls: the class path ``module.QualName`` of the basis, checked at load.
        options: the constructor keyword arguments, JSON-serialisable
            (:meth:`InverseTransform.options`).
    """

    name: str
    cls: str
    options: dict[str, Any]


class BasisNotSavableError(ValueError):
    """A basis that a checkpoint could not rebuild exactly, refused by :func:`basis_spec`."""


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _json_problem(options: object) -> str | None:
    """Say why ``options`` is not a JSON-round-tripping dict of string keys (``None`` if it is)."""
    if not isinstance(options, dict):
        return f"is a {type(options).__name__}, not a dict"
    bad = [key for key in options if not isinstance(key, str)]
    if bad:
        return f"has keys that are not strings: {bad!r}"
    try:
        # allow_nan=False: NaN and infinities are not JSON, and NaN != NaN.
        text = json.dumps(options, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        return f"is not JSON-serialisable ({exc})"
    if json.loads(text) != options:
        return "does not survive a JSON round trip (tuples, sets or non-string nested keys?)"
    return None


def _describe(basis: InverseTransform) -> str:
    return f"{type(basis).__name__} basis {basis.label()!r}"


def _probe_shapes(extra: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    shapes = [(int(m), int(n)) for m, n in extra]
    return list(dict.fromkeys([*shapes, *PROBE_SHAPES]))


def _accepts(basis: InverseTransform, m: int, n: int) -> bool:
    try:
        basis.check_shape(m, n)
    except ValueError:
        return False
    return True


def _compare_transforms(
    basis: InverseTransform, rebuilt: InverseTransform, shapes: list[tuple[int, int]], fix: str
) -> None:
    r"""Require ``basis`` and ``rebuilt`` to agree on seeded probes of every accepted shape.

    At each shape :math:`(m, n)` the basis accepts, both transform one
    float64 spectrum :math:`F` with i.i.d. :math:`N(0, 1)` entries drawn by a
    seeded generator (never torch's global RNG) and must give
    :math:`\max |T(F) - T'(F)| \le 10^{-12}`; both must also give the same
    :meth:`~InverseTransform.active_energy` of a fixed half of the locations,
    which sets the adapter's scale :math:`c = \sqrt{mn / E}`.
    """
    desc = _describe(basis)
    tried = 0
    for m, n in shapes:
        if not _accepts(basis, m, n):
            continue
        tried += 1
        generator = torch.Generator(device="cpu").manual_seed(_PROBE_SEED + 7919 * m + n)
        probe = torch.randn(m, n, generator=generator, dtype=torch.float64)
        active = torch.randperm(m * n, generator=generator)[: max(1, m * n // 2)]
        try:
            # Clones: a basis that wrote into its input would corrupt the other's probe.
            want = basis.check_output(probe, basis(probe.clone()))
            got = rebuilt.check_output(probe, rebuilt(probe.clone()))
            energies = (basis.active_energy((m, n), active), rebuilt.active_energy((m, n), active))
        except Exception as exc:
            raise BasisNotSavableError(
                f"{desc} could not be compared with its rebuilt copy on a ({m}, {n}) probe: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        gap = float((want - got).abs().max())
        if not gap <= _PROBE_ATOL:  # also catches NaN
            raise BasisNotSavableError(
                f"{desc} rebuilt from its declared options {basis.options()!r} computes a "
                f"different transform (max difference {gap:.3g} on a ({m}, {n}) probe); {fix}"
            )
        if not math.isclose(energies[0], energies[1], rel_tol=_ENERGY_RTOL, abs_tol=0.0):
            raise BasisNotSavableError(
                f"{desc} rebuilt from its declared options {basis.options()!r} gives a different "
                f"active energy ({energies[1]!r} instead of {energies[0]!r} on a ({m}, {n}) "
                f"probe), so a different adapter scale; {fix}"
            )
    if tried == 0:
        raise BasisNotSavableError(
            f"{desc} accepts none of the probe shapes {shapes}, so it cannot be checked to "
            "rebuild exactly; pass shapes=[(m, n), ...] it accepts (the adapted layers' shapes)"
        )


def basis_spec(
    basis: InverseTransform | str, *, shapes: Iterable[tuple[int, int]] = ()
) -> BasisSpec:
    """Describe a basis for a checkpoint, after proving the description rebuilds it.

    The spec is ``{"name": basis.label(), "cls": "module.QualName",
    "options": basis.options()}``. It is returned only if
    ``get_basis(name, **options)``

    * resolves (the name is registered, or a PyWavelets wavelet name),
    * builds an instance of exactly the same class,
    * whose :meth:`~InverseTransform.options` are equal and JSON-serialisable,
    * with the same :attr:`~InverseTransform.orthonormal` flag,
    * computing the same transform: on a seeded float64 probe of each shape of
      ``shapes`` and :data:`PROBE_SHAPES` that the basis accepts, outputs agree
      to 1e-12 and so do the :meth:`~InverseTransform.active_energy` values.

    Nothing is cached: every call checks the basis as it is now.

    Args:
        basis: an instance, or a name (the instance ``get_basis(name)`` is described).
        shapes: more ``(m, n)`` shapes to probe, first; needed only by a basis
            that refuses all of :data:`PROBE_SHAPES`.

    Returns:
        The :class:`BasisSpec`; its ``options`` are a fresh copy.

    Raises:
        BasisNotSavableError: naming the basis and the fix, if any check fails:
            typically a user basis with constructor arguments that does not
            declare them in ``options()``, or one that is not registered.
        UnknownBasisError: if ``basis`` is a name nothing answers to.
        TypeError: if ``basis`` is neither a name nor an ``InverseTransform``.
    """
    if isinstance(basis, str):
        instance = get_basis(basis)
    elif isinstance(basis, InverseTransform):
        instance = basis
    else:
        raise TypeError(
            f"basis_spec takes a basis name or an InverseTransform; got {type(basis).__name__}"
        )
    name = instance.label()
    desc = _describe(instance)
    fix = "declare the constructor arguments in options() (see InverseTransform.options)"
    options = instance.options()
    problem = _json_problem(options)
    if problem is not None:
        raise BasisNotSavableError(
            f"{desc}: options() returned {options!r}, which {problem}; options() must return "
            "the constructor keyword arguments as a dict of JSON values"
        )
    try:
        rebuilt = get_basis(name, **options)
    except UnknownBasisError as exc:
        raise BasisNotSavableError(
            f"{desc} is not registered under {name!r}, so a checkpoint could not rebuild it; "
            f"register its class with @register_basis({name!r}) (or another name) and build "
            f"it from there ({exc})"
        ) from exc
    except Exception as exc:  # a user constructor may raise anything: say where it came from
        raise BasisNotSavableError(
            f"{desc} cannot be rebuilt: get_basis({name!r}, **{options!r}) raised "
            f"{type(exc).__name__}: {exc}; {fix}"
        ) from exc
    want, got = _class_path(type(instance)), _class_path(type(rebuilt))
    # Identity, not the path: two classes may share a path (made by one factory).
    if type(rebuilt) is not type(instance):
        got += " (another class of the same path)" if got == want else ""
        raise BasisNotSavableError(
            f"{desc}: get_basis({name!r}, **{options!r}) builds a {got}, not a {want}, so a "
            f"checkpoint would reload another class; save a basis built by get_basis({name!r}), "
            "or register this class under a name of its own with register_basis"
        )
    if rebuilt.options() != options:
        raise BasisNotSavableError(
            f"{desc} declares options {options!r} but the basis rebuilt from them declares "
            f"{rebuilt.options()!r}; options() must return the arguments its constructor took"
        )
    if bool(rebuilt.orthonormal) != bool(instance.orthonormal):
        raise BasisNotSavableError(
            f"{desc} has orthonormal={instance.orthonormal} but the basis rebuilt from its "
            f"declared options {options!r} has orthonormal={rebuilt.orthonormal}; {fix}"
        )
    _compare_transforms(instance, rebuilt, _probe_shapes(shapes), fix)
    copied: dict[str, Any] = json.loads(json.dumps(options, allow_nan=False))
    return BasisSpec(name=name, cls=want, options=copied)


def build_basis(spec: Mapping[str, Any]) -> InverseTransform:
    """Rebuild the basis a :class:`BasisSpec` read from a file describes.

    The basis is built by ``get_basis(spec["name"], **spec["options"])``
    from the registry alone; ``spec["cls"]`` is only compared with the class
    built, never imported (a file must not choose code to run).

    Args:
        spec: a mapping with exactly the keys ``name`` (non-empty str),
            ``cls`` (non-empty str) and ``options`` (dict of JSON values with
            string keys), as written by :func:`basis_spec`.

    Returns:
        A new instance of the class ``spec["cls"]`` names, declaring ``spec["options"]``.

    Raises:
        UnknownBasisError: if no basis answers to the name (a ``KeyError`` and
            a ``ValueError``); its class must be registered before loading.
        ValueError: if the keys or their types are wrong, the constructor
            refuses the options (a ``TypeError`` or ``ValueError`` of its
            own), or the basis built is of another class or declares other
            options than the spec.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"a basis spec is a mapping with keys 'cls', 'name', 'options'; got a "
            f"{type(spec).__name__}"
        )
    keys = set(spec)
    if keys != _KEYS:
        parts = []
        if _KEYS - keys:
            parts.append("missing " + ", ".join(sorted(map(repr, _KEYS - keys))))
        if keys - _KEYS:
            parts.append("unexpected " + ", ".join(sorted(map(repr, keys - _KEYS))))
        raise ValueError(
            "a basis spec has exactly the keys 'cls', 'name', 'options'; " + "; ".join(parts)
        )
    name, cls, options = spec["name"], spec["cls"], spec["options"]
    for key, value in (("name", name), ("cls", cls)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"basis spec key {key!r} must be a non-empty string; got {value!r}")
    problem = _json_problem(options)
    if problem is not None:
        raise ValueError(
            f"basis spec {name!r}: 'options' must be a dict of JSON values with string keys; "
            f"it {problem}"
        )
    try:
        built = get_basis(name, **options)
    except UnknownBasisError as exc:
        raise UnknownBasisError(
            f"{exc} The saved basis {name!r} (class {cls}) must be registered before loading: "
            f"import the module that defines it, whose class is decorated with "
            f"@register_basis({name!r})."
        ) from None
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"basis {name!r} ({cls}) cannot be built with the saved options {options!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    got = _class_path(type(built))
    if got != cls:
        raise ValueError(
            f"the saved basis {name!r} is a {cls}, but get_basis({name!r}) now builds a {got}; "
            f"register the saved class under {name!r} before loading"
        )
    if built.options() != options:
        raise ValueError(
            f"basis {name!r} ({cls}) built with the saved options {options!r} declares "
            f"{built.options()!r}; its options() does not match its constructor"
        )
    return built
