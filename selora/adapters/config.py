"""``SpectralAdapter``: the frozen, validated description of an adapter."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from selora.adapters.patterns import (
    PATTERN_FIELDS,
    check_layer_selection,
    check_pattern,
    check_task_type,
    task_heads,
)
from selora.spectral_bases import InverseTransform, SpectrumScale, basis_name, get_basis

__all__ = ["DEFAULT_SPARSE_RATIO", "SpectralAdapter"]

DEFAULT_SPARSE_RATIO = 0.6
"""Sparse ratio used when a basis is given with neither budget (SeLoRA's usual setting)."""


class _FrozenOptions(Mapping[str, Any]):
    """A read-only mapping for ``base_options``.

    Unlike ``MappingProxyType`` it can be copied and pickled, so adapted models
    survive ``copy.deepcopy`` and ``torch.save``.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self) -> tuple[type[_FrozenOptions], tuple[dict[str, Any]]]:
        return (type(self), (self._data,))


def _fail(field_name: str, message: str) -> ValueError:
    return ValueError(f"SpectralAdapter.{field_name}: {message}")


def _as_names(value: str | Sequence[str] | None, field_name: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if not value:
            raise _fail(field_name, "an empty string matches nothing")
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise _fail(
                    field_name, f"{value!r} is not a valid regular expression: {exc}"
                ) from None
        return value
    if value is None:
        return ()
    names = tuple(value)
    if not all(isinstance(v, str) and v for v in names):
        raise _fail(field_name, f"expected module names (non-empty strings); got {value!r}")
    return names


def _as_list(value: object) -> list[Any] | None:
    """A normalised layer selection (a tuple or ``None``) as JSON's list or ``None``."""
    if value is None:
        return None
    return list(value) if isinstance(value, (tuple, list)) else [value]


@dataclass(frozen=True)
class SpectralAdapter:
    r"""A spectral adapter: which basis, which base of adaptation, where and how big.

    Each targeted layer with frozen weight :math:`W_0 \in \mathbb{R}^{d_{out} \times d_{in}}`
    gets two factors :math:`\tilde A = T(F_A) \in \mathbb{R}^{r \times d_{in}}` and
    :math:`\tilde B = T(F_B) \in \mathbb{R}^{d_{out} \times r}`, each spanned by
    ``k`` coefficients (see :class:`selora.SparseSpectrum`); ``base`` says how they
    adapt :math:`W_0` (``lora``: :math:`W_0 + \tfrac{\alpha}{r}\tilde B\tilde A`,
    ``dora``, ``hira``, or any registered base). ``basis=None`` gives plain
    dense factors (vanilla LoRA / DoRA / HiRA) through the same code.

    Args:
        basis: a registered basis name, an :class:`~selora.InverseTransform`, or
            ``None`` for dense factors.
        base: a registered base of adaptation (:func:`selora.list_adapter_bases`).
        r: the rank, a positive integer.
        alpha: the scale numerator; the update is scaled by ``alpha / r``.
            ``None`` means ``alpha = r`` (scale 1). Ignored by bases that use no scale.
        sparse_ratio: SeLoRA's budget :math:`\eta \in [0, 1)`: each factor keeps
            :math:`\lfloor (1-\eta)\,\text{size} \rfloor` coefficients.
        n_coeffs: FoRA's budget: each factor keeps this many coefficients.
            Give at most one of the two budgets; with a basis and neither,
            ``sparse_ratio`` defaults to :data:`DEFAULT_SPARSE_RATIO`.
        target_modules: which modules to adapt. A sequence matches a module whose
            full name equals an entry or ends with ``"." + entry`` (``"q_proj"``);
            a string is a regular expression matched against the full name;
            ``"all-linear"`` takes every ``nn.Linear`` / ``Conv1D`` except a
            Hugging Face model's output embedding.
        exclude_modules: modules never adapted, matched like ``target_modules``
            (PEFT's rule too): a sequence by name or ``"." + name`` suffix, a
            string as a regular expression against the full name.
        modules_to_save: modules left trainable besides the adapter (a task
            head); their weights are saved with the adapter.
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
        seed: seeds the spectral locations; a non-negative integer.
        base_options: options of the base of adaptation, validated by it
            (for example a user base's own settings).
        scale: how the spectral factors are scaled (``SpectrumScale``):
            ``"lora"`` (default) multiplies each factor by the constant
            :math:`c = \sqrt{mn / E}` of its basis' energy on the active set,
            so the coefficients sit on a dense LoRA factor's scale and LoRA's
            learning rate carries over; ``"paper"`` is FoRA's eq. 3 as written
            (:math:`c = 1`). Both give the same model at init. Saved in
            checkpoints (one without it is refused, never given a default).
            Ignored by dense factors (``basis=None``).
        init_weights: PEFT's convention. ``True`` (default): :math:`\tilde B`
            starts at zero, so the adapted model equals its base model.
            ``False``: :math:`\tilde B` starts random and non-zero (calibrated
            as :math:`\tilde A` is), so the adapter changes the output from
            the start; for tests, as PEFT's other methods offer.
        autocast_adapter_dtype: PEFT's convention. ``True`` (default): the
            adapter parameters are float32 (float64 for a float64 layer)
            whatever the layer's dtype. ``False``: they take the layer's
            dtype (bfloat16 for a bfloat16 model); the transform still
            computes in float32 (:class:`~selora.InverseTransform`).
        rank_pattern: PEFT's per-module ranks: name or regex -> ``r``. A key
            matches a module whose full name ends with a dot-separated suffix
            it fully matches (PEFT's ``get_pattern_key``); the first matching
            key wins. See :mod:`selora.adapters.patterns`.
        alpha_pattern: per-module ``alpha``, matched likewise.
        sparse_ratio_pattern: per-module SeLoRA budget, matched likewise (the
            module then takes ``sparse_ratio`` and no ``n_coeffs``).
        n_coeffs_pattern: per-module FoRA budget, matched likewise (the module
            then takes ``n_coeffs`` and no ``sparse_ratio``). A module matched
            by both budget patterns is refused at injection. Both need a basis.
        use_rslora: rank-stabilised scale :math:`\alpha / \sqrt r` instead of
            :math:`\alpha / r` (with ``alpha=None``, :math:`\alpha = r`, so
            :math:`\sqrt r`). Ignored by bases that use no scale (HiRA).
        layers_to_transform: PEFT's layer selection: only modules whose layer
            index is listed are adapted (an int or a list of ints). Needs a
            list of ``target_modules`` names, as in PEFT.
        layers_pattern: the name (or names) of the module list the layer index
            follows (``"layers"``, ``"h"``); ``None``: the first number after a
            name. Needs ``layers_to_transform``.
        task_type: PEFT's task type (``"SEQ_CLS"``, ``"TOKEN_CLS"``,
            ``"CAUSAL_LM"``, ...; ``None`` by default). ``SEQ_CLS`` and
            ``TOKEN_CLS`` add ``"classifier"`` and ``"score"`` to
            ``modules_to_save``, as PEFT's task models do: the head is trained
            and saved, never adapted (``"all-linear"`` skips it).

    Raises:
        ValueError: naming the field, for any invalid value or combination.
    """

    basis: str | InverseTransform | None = "fft"
    base: str = "lora"
    r: int = 8
    alpha: float | None = None
    sparse_ratio: float | None = None
    n_coeffs: int | None = None
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] = ()
    modules_to_save: Sequence[str] = ()
    dropout: float = 0.0
    seed: int = 0
    base_options: Mapping[str, Any] = field(default_factory=dict)
    scale: SpectrumScale = "lora"
    init_weights: bool = True
    autocast_adapter_dtype: bool = True
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    sparse_ratio_pattern: Mapping[str, float] = field(default_factory=dict)
    n_coeffs_pattern: Mapping[str, int] = field(default_factory=dict)
    use_rslora: bool = False
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        # Imported here: the base registry imports this module for its types.
        from selora.adapters.registry import get_adapter_base

        if self.basis is not None and not isinstance(self.basis, (str, InverseTransform)):
            raise _fail(
                "basis", f"expected a name, an InverseTransform or None; got {self.basis!r}"
            )
        if isinstance(self.basis, str):
            try:
                get_basis(self.basis)
            except KeyError as exc:
                raise _fail("basis", str(exc)) from None
        if not isinstance(self.base, str):
            raise _fail("base", f"expected a registered name; got {self.base!r}")
        try:
            base_cls = get_adapter_base(self.base)
        except KeyError as exc:
            raise _fail("base", str(exc)) from None
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise _fail("r", f"the rank must be a positive integer; got {self.r!r}")
        if self.alpha is not None and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, numbers.Real)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise _fail("alpha", f"must be a positive finite number or None; got {self.alpha!r}")
        self._check_budget()
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise _fail("dropout", f"must be a number in [0, 1); got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise _fail("dropout", f"must lie in [0, 1); got {self.dropout!r}")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, numbers.Integral)
            or self.seed < 0
        ):
            raise _fail("seed", f"must be a non-negative integer; got {self.seed!r}")
        if not isinstance(self.scale, str) or self.scale not in get_args(SpectrumScale):
            allowed = list(get_args(SpectrumScale))
            raise _fail("scale", f"must be one of {allowed}; got {self.scale!r}")
        for flag in ("init_weights", "autocast_adapter_dtype", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise _fail(flag, f"must be True or False; got {getattr(self, flag)!r}")
        targets = _as_names(self.target_modules, "target_modules")
        if targets == ():
            raise _fail("target_modules", "no module names given")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(
            self, "exclude_modules", _as_names(self.exclude_modules, "exclude_modules")
        )
        task_type = check_task_type(self.task_type)
        object.__setattr__(self, "task_type", task_type)
        saved = _as_names(self.modules_to_save, "modules_to_save")
        saved = saved if isinstance(saved, tuple) else (saved,)
        object.__setattr__(
            self, "modules_to_save", tuple(dict.fromkeys(saved + task_heads(task_type)))
        )
        self._check_patterns(targets)
        if not isinstance(self.base_options, Mapping):
            raise _fail("base_options", f"expected a mapping; got {self.base_options!r}")
        options = dict(self.base_options)
        try:
            base_cls.validate_options(options)
        except ValueError as exc:
            raise _fail("base_options", str(exc)) from None
        object.__setattr__(self, "base_options", _FrozenOptions(options))

    def _check_patterns(self, targets: str | tuple[str, ...]) -> None:
        for name in PATTERN_FIELDS:
            patterns = check_pattern(getattr(self, name), name)
            if (
                patterns
                and self.basis is None
                and name in ("sparse_ratio_pattern", "n_coeffs_pattern")
            ):
                raise _fail(name, "a budget needs a spectral basis; basis=None gives dense factors")
            object.__setattr__(self, name, _FrozenOptions(patterns))
        layers, pattern = check_layer_selection(
            self.layers_to_transform, self.layers_pattern, targets
        )
        object.__setattr__(self, "layers_to_transform", layers)
        object.__setattr__(self, "layers_pattern", pattern)

    def _check_budget(self) -> None:
        if self.basis is None:
            if self.sparse_ratio is not None or self.n_coeffs is not None:
                raise _fail(
                    "sparse_ratio" if self.sparse_ratio is not None else "n_coeffs",
                    "a budget needs a spectral basis; basis=None gives dense factors",
                )
            return
        if self.sparse_ratio is not None and self.n_coeffs is not None:
            raise _fail(
                "n_coeffs",
                "give at most one of sparse_ratio (SeLoRA) and n_coeffs (FoRA); got both",
            )
        if self.n_coeffs is not None:
            if (
                isinstance(self.n_coeffs, bool)
                or not isinstance(self.n_coeffs, numbers.Integral)
                or self.n_coeffs < 1
            ):
                raise _fail("n_coeffs", f"must be a positive integer; got {self.n_coeffs!r}")
            return
        ratio = DEFAULT_SPARSE_RATIO if self.sparse_ratio is None else self.sparse_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, numbers.Real)
            or not 0.0 <= float(ratio) < 1.0
        ):
            raise _fail("sparse_ratio", f"must lie in [0, 1); got {ratio!r}")
        object.__setattr__(self, "sparse_ratio", float(ratio))

    @property
    def scaling(self) -> float:
        r"""The scale :math:`\alpha / r` of the update (1 when ``alpha`` is ``None``).

        With ``use_rslora`` it is :math:`\alpha / \sqrt r` (:math:`\sqrt r` when
        ``alpha`` is ``None``, which means :math:`\alpha = r`).
        """
        alpha = float(self.r) if self.alpha is None else float(self.alpha)
        if self.use_rslora:
            return alpha / math.sqrt(self.r)
        return 1.0 if self.alpha is None else alpha / self.r

    @property
    def basis_label(self) -> str | None:
        """The basis' registry name (``None`` for dense factors)."""
        return None if self.basis is None else basis_name(self.basis)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (the basis by name).

        Returns:
            A dict that :meth:`from_dict` turns back into an equal adapter
            when the basis is a registered name.
        """
        return {
            "basis": self.basis_label,
            "base": self.base,
            "r": self.r,
            "alpha": self.alpha,
            "sparse_ratio": self.sparse_ratio,
            "n_coeffs": self.n_coeffs,
            "target_modules": self.target_modules
            if isinstance(self.target_modules, str)
            else list(self.target_modules),
            "exclude_modules": self.exclude_modules
            if isinstance(self.exclude_modules, str)
            else list(self.exclude_modules),
            "modules_to_save": list(self.modules_to_save),
            "dropout": self.dropout,
            "seed": self.seed,
            "base_options": dict(self.base_options),
            "scale": self.scale,
            "init_weights": self.init_weights,
            "autocast_adapter_dtype": self.autocast_adapter_dtype,
            **{name: dict(getattr(self, name)) for name in PATTERN_FIELDS},
            "use_rslora": self.use_rslora,
            "layers_to_transform": _as_list(self.layers_to_transform),
            "layers_pattern": _as_list(self.layers_pattern),
            "task_type": self.task_type,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpectralAdapter:
        """Build an adapter from :meth:`to_dict`'s output.

        Args:
            data: the dict; unknown keys raise.

        Returns:
            The adapter.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SpectralAdapter fields: {sorted(unknown)}")
        values = dict(data)
        for key in ("target_modules", "exclude_modules"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)
