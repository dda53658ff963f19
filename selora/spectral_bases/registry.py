r"""The registry of inverse transforms (the *spectral bases*).

A basis is a linear map :math:`T: \mathbb{R}^{m \times n} \to \mathbb{R}^{m \times n}`
applied to the last two dimensions of a real tensor. Bases are registered by
name with :func:`register_basis` and built with :func:`get_basis`; the adapters
only ever see this contract.
"""

from __future__ import annotations

import abc
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from selora._names import UnknownNameError, unknown_name

__all__ = [
    "InverseTransform",
    "register_basis",
    "unregister_basis",
    "get_basis",
    "list_bases",
    "basis_name",
    "UnknownBasisError",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

ENERGY_PROBES = 32
"""Number of probes of the estimated :meth:`InverseTransform.active_energy` (the fallback)."""
_ENERGY_SEED = 20240613
_EXACT_ENERGY_LIMIT = 2**22  # k * m * n up to which the fallback energy is exact
_ENERGY_BATCH = 2**20  # float64 entries transformed at once by the fallback


class InverseTransform(abc.ABC):
    r"""Contract of a spectral basis: a real, linear, shape-keeping map.

    Calling a basis on a spectrum ``F`` of shape ``(..., m, n)`` returns
    :math:`M = T(F)` of the same shape, dtype and device. Subclasses implement
    :meth:`inverse` and, if they refuse some shapes, :meth:`check_shape`.
    Low-precision inputs (float16, bfloat16) are transformed in float32 and
    cast back, because FFTs and some reductions do not take them on every
    device; float32 and float64 inputs are transformed in their own precision.

    Attributes:
        name: the registered name, set by :func:`register_basis`.
        orthonormal: whether :math:`\|T(F)\|_F = \|F\|_F` for all ``F``.
    """

    name: ClassVar[str] = ""
    orthonormal: bool = False

    def check_shape(self, m: int, n: int) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if this basis cannot transform an ``(m, n)`` matrix.

        Args:
            m: number of rows.
            n: number of columns.
        """

    @abc.abstractmethod
    def inverse(self, spectrum: Tensor) -> Tensor:
        """Apply :math:`T` to the last two dimensions of a float32/float64 tensor.

        Args:
            spectrum: real tensor ``(..., m, n)``; the shape was already checked.

        Returns:
            Real tensor ``(..., m, n)`` of the same dtype.
        """

    def __call__(self, spectrum: Tensor) -> Tensor:
        """Validate ``spectrum`` and return :math:`T(F)` in the input's dtype.

        Args:
            spectrum: real floating tensor of shape ``(..., m, n)``.

        Returns:
            :math:`T(F)`, same shape, dtype and device as ``spectrum``.

        Raises:
            ValueError: if the tensor has fewer than two dimensions, is not a
                real floating tensor, or has a shape this basis refuses.
        """
        if spectrum.ndim < 2:
            raise ValueError(
                f"basis {self.label()!r} needs a tensor of shape (..., m, n); "
                f"got shape {tuple(spectrum.shape)}"
            )
        if not spectrum.is_floating_point():
            raise ValueError(
                f"basis {self.label()!r} takes a real floating tensor; got dtype {spectrum.dtype}"
            )
        m, n = spectrum.shape[-2], spectrum.shape[-1]
        self.check_shape(m, n)
        if spectrum.dtype in _LOW_PRECISION:
            return self.inverse(spectrum.float()).to(spectrum.dtype)
        return self.inverse(spectrum)

    def synthesize(self, coefficients: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
        r"""Return :math:`T(\operatorname{scatter}(s, \Omega))` straight from the coefficients.

        .. math::

            M = T(F), \qquad F_p = s_i \text{ at } p = \Omega_i, \quad F_p = 0 \text{ elsewhere}.

        This default scatters ``s`` into a zero ``(..., m, n)`` spectrum and
        calls the basis, so a user basis needs nothing more. A basis whose
        transform can skip the dense spectrum (``fft`` builds the half
        spectrum that a real inverse FFT reads) overrides it; the result must
        equal the default's to rounding, and the contract tests compare the two
        for every registered basis.

        Args:
            coefficients: real floating tensor ``(..., k)``.
            indices: the ``k`` distinct flat positions of :math:`\Omega` in
                ``[0, m * n)``, int64, on the coefficients' device.
            shape: ``(m, n)``, a shape this basis accepts.

        Returns:
            :math:`M`, shape ``(..., m, n)``, in the coefficients' dtype.
        """
        m, n = int(shape[0]), int(shape[1])
        batch = coefficients.shape[:-1]
        flat = coefficients.new_zeros(*batch, m * n)
        flat = flat.scatter(-1, indices.expand(coefficients.shape), coefficients)
        return self(flat.view(*batch, m, n))

    def active_energy(self, shape: tuple[int, int], indices: Tensor) -> float:
        r"""Return the energy :math:`E` of the active set :math:`\Omega`, in float64.

        .. math::

            E = \sum_{p \in \Omega} \|T(e_p)\|_F^2,

        where :math:`e_p` is the unit spectrum at the flat position ``p``. A
        :class:`~selora.SparseSpectrum` scales its matrix by
        :math:`c = \sqrt{mn / E}` (see ``docs/concepts.md``). Locations whose
        unit matrices are parallel (fft's ``p`` and ``-p`` give the same
        matrix) always receive proportional gradients and move together, so
        they count as one group :math:`G` of energy
        :math:`(\sum_{p \in G} \|T(e_p)\|_F)^2`; a basis with such
        locations overrides this method (as ``fft`` does).

        This default is the fallback for user bases; built-in bases give closed
        forms. An :attr:`orthonormal` basis gives :math:`E = k` exactly.
        Otherwise, when :math:`k m n \le 2^{22}` the unit spectra are
        transformed in float64 batches and :math:`E` is exact (to rounding).
        Beyond that it is an unbiased *estimate*: for coefficients
        :math:`z_p \sim N(0, 1)` i.i.d. on :math:`\Omega`,
        :math:`\mathbb{E}\,\|T(\sum_p z_p e_p)\|_F^2 = E`, averaged over
        :data:`ENERGY_PROBES` probes drawn by a generator of fixed seed (never
        torch's global RNG). Its relative standard error is
        :math:`\sqrt{2 \operatorname{tr}(K^2) / P} / \operatorname{tr} K` for
        the Gram matrix :math:`K` of the active unit matrices and :math:`P`
        probes: :math:`\sqrt{2 / (P k)}` (under 1 % for :math:`k \ge 625`)
        when they are orthogonal, at worst :math:`\sqrt{2 / P} = 25\,\%` when
        they are all parallel. Both routes assume the active unit matrices are
        pairwise non-parallel.

        Args:
            shape: ``(m, n)``, a shape this basis accepts.
            indices: the ``k`` distinct flat positions of :math:`\Omega`, any device.

        Returns:
            :math:`E > 0` for a basis that maps no unit spectrum to zero.
        """
        m, n = int(shape[0]), int(shape[1])
        self.check_shape(m, n)
        flat = indices.detach().to("cpu", torch.int64).reshape(-1)
        k = int(flat.numel())
        if self.orthonormal:
            return float(k)
        total = 0.0
        if k * m * n <= _EXACT_ENERGY_LIMIT:
            batch = max(1, _ENERGY_BATCH // (m * n))
            for start in range(0, k, batch):
                chunk = flat[start : start + batch]
                units = torch.zeros(chunk.numel(), m * n, dtype=torch.float64, device="cpu")
                units[torch.arange(chunk.numel(), device="cpu"), chunk] = 1.0
                out = self._checked(units.view(-1, m, n))
                total += float(out.square().sum())
            return total
        generator = torch.Generator(device="cpu").manual_seed(_ENERGY_SEED)
        batch = max(1, min(ENERGY_PROBES, _ENERGY_BATCH // (m * n)))
        for start in range(0, ENERGY_PROBES, batch):
            count = min(batch, ENERGY_PROBES - start)
            probes = torch.zeros(count, m * n, dtype=torch.float64, device="cpu")
            draws = torch.randn(count, k, generator=generator, dtype=torch.float64, device="cpu")
            probes[:, flat] = draws
            total += float(self._checked(probes.view(count, m, n)).square().sum())
        return total / ENERGY_PROBES

    def check_output(self, spectrum: Tensor, out: object) -> Tensor:
        """Check that ``out`` is what this basis must return for ``spectrum``.

        A basis returns a tensor of the input's shape and dtype. A user basis
        that does not otherwise fails deep inside torch (a matrix product of
        the wrong shape), so :class:`~selora.SparseSpectrum` checks once, at
        construction.

        Args:
            spectrum: the input given to :meth:`inverse`.
            out: what :meth:`inverse` returned.

        Returns:
            ``out``.

        Raises:
            TypeError: naming the basis, if ``out`` is not a tensor.
            ValueError: naming the basis, if its shape or dtype differs from the input's.
        """
        if not isinstance(out, Tensor):
            raise TypeError(
                f"basis {self.label()!r} ({type(self).__name__}.inverse) returned a "
                f"{type(out).__name__}, not a torch.Tensor"
            )
        if out.shape != spectrum.shape:
            raise ValueError(
                f"basis {self.label()!r} ({type(self).__name__}.inverse) returned shape "
                f"{tuple(out.shape)} for an input of shape {tuple(spectrum.shape)}; "
                "a basis must keep the shape"
            )
        if out.dtype != spectrum.dtype:
            raise ValueError(
                f"basis {self.label()!r} ({type(self).__name__}.inverse) returned dtype "
                f"{out.dtype} for a {spectrum.dtype} input; a basis must keep the dtype"
            )
        return out

    def _checked(self, spectrum: Tensor) -> Tensor:
        """Return ``self(spectrum)`` after :meth:`check_output`."""
        return self.check_output(spectrum, self(spectrum))

    def options(self) -> dict[str, Any]:
        """Return the constructor keyword arguments that rebuild this instance.

        Contract: ``get_basis(self.label(), **self.options())`` builds an
        instance of exactly this class that computes the same transform and
        declares equal options, and the options survive a JSON round trip
        (``json.loads(json.dumps(options)) == options``: strings, finite
        numbers, booleans, ``None``, lists and string-keyed dicts). A
        checkpoint stores the basis as its name, class path and these options
        (see :func:`~selora.spectral_bases.basis_spec`), so **a basis whose
        constructor takes arguments must override this method**; otherwise it
        would reload with its defaults, which :func:`basis_spec` detects and
        refuses. An option equal to its default may be left out.

        Example:
            >>> class Rotation(InverseTransform):  # doctest: +SKIP
            ...     def __init__(self, seed: int = 0) -> None:
            ...         self.seed = seed
            ...     def options(self) -> dict[str, Any]:
            ...         return {"seed": self.seed}

        Returns:
            A new JSON-serialisable dict; ``{}`` by default (no constructor arguments).
        """
        return {}

    def label(self) -> str:
        """Return a human-readable name used in error messages."""
        return self.name or type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.label()!r})"


class UnknownBasisError(UnknownNameError):
    """Raised by :func:`get_basis` for an unknown name (a ``KeyError`` and a ``ValueError``)."""


_T = TypeVar("_T", bound=type[InverseTransform])
_REGISTRY: dict[str, type[InverseTransform]] = {}
_Factory = Callable[..., InverseTransform]
_FALLBACKS: list[Callable[[str], _Factory | None]] = []


def register_basis(name: str, *, override: bool = False) -> Callable[[_T], _T]:
    """Class decorator that registers an :class:`InverseTransform` under ``name``.

    Example:
        >>> @register_basis("identity")  # doctest: +SKIP
        ... class Identity(InverseTransform):
        ...     orthonormal = True
        ...     def inverse(self, spectrum):
        ...         return spectrum

    Args:
        name: the registry key, a non-empty string.
        override: replace an existing registration of the same name instead
            of raising.

    Returns:
        The decorator, which returns the class unchanged but for its ``name``.

    Raises:
        ValueError: on an empty name, or a duplicate name without ``override``.
        TypeError: if the decorated object is not an ``InverseTransform`` subclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a basis name must be a non-empty string; got {name!r}")

    def decorator(cls: _T) -> _T:
        if not (isinstance(cls, type) and issubclass(cls, InverseTransform)):
            raise TypeError(
                f"register_basis({name!r}) decorates InverseTransform subclasses; got {cls!r}"
            )
        if name in _REGISTRY and not override:
            raise ValueError(
                f"a basis named {name!r} is already registered ({_REGISTRY[name].__name__}); "
                "pass override=True to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def unregister_basis(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive work).

    Args:
        name: a registered basis name.

    Raises:
        KeyError: if ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise KeyError(f"no basis named {name!r} is registered")
    del _REGISTRY[name]


def add_fallback(resolver: Callable[[str], Callable[..., InverseTransform] | None]) -> None:
    """Add a resolver consulted by :func:`get_basis` for names not in the registry.

    The wavelet module uses it so that every PyWavelets discrete wavelet name
    (``sym8``, ``coif3``, ...) works without registering a hundred classes.

    Args:
        resolver: returns a factory (a class or a callable taking the
            basis options) for a name it knows, else ``None``.
    """
    _FALLBACKS.append(resolver)


def get_basis(name: str, **options: Any) -> InverseTransform:
    """Build the basis registered as ``name``.

    Args:
        name: a registered name (see :func:`list_bases`) or any PyWavelets
            discrete wavelet name.
        **options: keyword arguments passed to the basis' constructor.

    Returns:
        A new :class:`InverseTransform` instance.

    Raises:
        UnknownBasisError: for an unknown name (a ``KeyError`` and a
            ``ValueError``); the message lists the registered names and
            suggests the closest one.
    """
    factory: _Factory | None = _REGISTRY.get(name)
    if factory is None:
        for resolver in _FALLBACKS:
            factory = resolver(name)
            if factory is not None:
                break
    if factory is None:
        raise UnknownBasisError(
            unknown_name(
                "basis", name, _REGISTRY, "Any PyWavelets discrete wavelet name is accepted too."
            )
        )
    return factory(**options)


def _as_patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def list_bases(
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """List registered basis names, sorted, filtered by shell-style wildcards.

    Args:
        include: keep only names matching one of these patterns (``"db*"``).
        exclude: then drop names matching one of these patterns.

    Returns:
        The sorted list of names.
    """
    names = sorted(_REGISTRY)
    keep = _as_patterns(include)
    drop = _as_patterns(exclude)
    if keep is not None:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in keep)]
    if drop is not None:
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in drop)]
    return names


def basis_name(basis: InverseTransform | str) -> str:
    """Return the registry name of a basis given as a name or an instance.

    Args:
        basis: a name or an :class:`InverseTransform`.

    Returns:
        The name; an unregistered instance gives its class name.
    """
    return basis if isinstance(basis, str) else basis.label()
