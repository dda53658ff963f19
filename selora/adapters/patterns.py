r"""PEFT's per-module options: rank / alpha / budget patterns, layer selection, task heads.

These are the habits of ``peft.LoraConfig`` (0.21), with PEFT's matching rules
exactly, so that a config means the same through :func:`selora.inject` and
through the PEFT bridge:

* a pattern key (``rank_pattern``, ``alpha_pattern``, ``sparse_ratio_pattern``,
  ``n_coeffs_pattern``) is a regular expression that must match a whole
  dot-separated suffix of the module's full name: PEFT's ``get_pattern_key``
  tries ``re.match(rf"(.*\.)?({key})$", name)`` for each key in order, and the
  first key that matches gives the value;
* ``layers_to_transform`` / ``layers_pattern`` keep only the modules whose
  layer index (the first number after ``<layers_pattern>.``, or after any
  name when ``layers_pattern`` is empty) is selected. As in PEFT's
  ``check_target_module_exists`` it applies to a list of target names matched
  by ``"." + name`` suffix; a target given by its exact full name is taken
  whatever its index, and a regex ``target_modules`` refuses the option;
* a module named by (or inside one named by) ``modules_to_save`` is never
  adapted (``(^|.*\.)<name>($|\..*)``, PEFT's guard);
* task types ``SEQ_CLS`` / ``TOKEN_CLS`` add ``classifier`` and ``score`` to
  ``modules_to_save``, as ``PeftModelForSequenceClassification`` and
  ``PeftModelForTokenClassification`` do, so ``"all-linear"`` trains the head
  instead of adapting it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from selora.adapters.config import SpectralAdapter

_Module = TypeVar("_Module")

__all__ = [
    "CLASSIFIER_HEAD_NAMES",
    "HEAD_TASK_TYPES",
    "PATTERN_FIELDS",
    "TASK_TYPES",
    "check_layer_selection",
    "check_pattern",
    "check_task_type",
    "in_modules_to_save",
    "layer_selected",
    "module_overrides",
    "pattern_key",
    "resolve_for_module",
    "saved_modules",
    "task_heads",
    "unmatched_pattern_keys",
    "warn_unmatched_patterns",
]

TASK_TYPES: tuple[str, ...] = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
"""PEFT's ``TaskType`` values (PEFT 0.21)."""

HEAD_TASK_TYPES: tuple[str, ...] = ("SEQ_CLS", "TOKEN_CLS")
"""The task types whose classification head PEFT trains through ``modules_to_save``."""

CLASSIFIER_HEAD_NAMES: tuple[str, ...] = ("classifier", "score")
"""The names PEFT adds to ``modules_to_save`` for those task types."""

PATTERN_FIELDS: tuple[str, ...] = (
    "rank_pattern",
    "alpha_pattern",
    "sparse_ratio_pattern",
    "n_coeffs_pattern",
)
"""The per-module override fields, each overriding the field its name starts with."""


def _fail(owner: str, field_name: str, message: str) -> ValueError:
    return ValueError(f"{owner}.{field_name}: {message}")


def _positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and int(value) >= 1


def _check_value(field_name: str, value: object) -> bool:
    if field_name in ("rank_pattern", "n_coeffs_pattern"):
        return _positive_int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if field_name == "alpha_pattern":
        return math.isfinite(float(value)) and float(value) > 0
    return 0.0 <= float(value) < 1.0  # sparse_ratio_pattern


_EXPECTED = {
    "rank_pattern": "a positive integer rank",
    "alpha_pattern": "a positive finite alpha",
    "sparse_ratio_pattern": "a sparse ratio in [0, 1)",
    "n_coeffs_pattern": "a positive integer number of coefficients",
}


def check_pattern(value: object, field_name: str, owner: str = "SpectralAdapter") -> dict[str, Any]:
    """Validate one pattern field: non-empty regex keys, values of the field's kind.

    Args:
        value: the mapping given (``None`` means empty).
        field_name: one of :data:`PATTERN_FIELDS`, for messages and value checks.
        owner: the class named in messages.

    Returns:
        A plain dict copy (integers as ``int``, the others as ``float``).

    Raises:
        ValueError: naming the field, the key and what is wrong.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(owner, field_name, f"expected a dict of name or regex -> value; got {value!r}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise _fail(owner, field_name, f"keys must be non-empty strings; got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise _fail(
                owner, field_name, f"key {key!r} is not a valid regular expression: {exc}"
            ) from None
        if not _check_value(field_name, item):
            raise _fail(
                owner, field_name, f"value of {key!r} must be {_EXPECTED[field_name]}; got {item!r}"
            )
        integral = field_name in ("rank_pattern", "n_coeffs_pattern")
        out[key] = int(item) if integral else float(item)
    return out


def check_layer_selection(
    layers: object,
    pattern: object,
    targets: str | Sequence[str] | None,
    owner: str = "SpectralAdapter",
) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """Validate ``layers_to_transform`` / ``layers_pattern`` (PEFT's rules).

    Args:
        layers: an int, a sequence of ints, or ``None`` (an empty sequence is ``None``).
        pattern: a name (regex), a sequence of them, or ``None`` (empty is ``None``).
        targets: the ``target_modules`` (``None``: not resolved yet, no check).
        owner: the class named in messages.

    Returns:
        ``(layers, pattern)`` normalised to tuples or ``None``.

    Raises:
        ValueError: naming the field; as PEFT, for a ``layers_pattern``
            without ``layers_to_transform`` and for either with a string
            ``target_modules`` (a regex or ``"all-linear"``).
    """
    if layers is None or (isinstance(layers, Sequence) and not isinstance(layers, str)):
        items = tuple(layers or ())
    else:
        items = (layers,)
    if not all(
        not isinstance(i, bool) and isinstance(i, numbers.Integral) and int(i) >= 0 for i in items
    ):
        raise _fail(
            owner,
            "layers_to_transform",
            f"expected a non-negative layer index or a list of them; got {layers!r}",
        )
    if pattern is None or (isinstance(pattern, Sequence) and not isinstance(pattern, str)):
        names = tuple(pattern or ())
    else:
        names = (pattern,)
    for name in names:
        if not isinstance(name, str) or not name:
            raise _fail(owner, "layers_pattern", f"expected module list names; got {pattern!r}")
        try:
            re.compile(name)
        except re.error as exc:
            raise _fail(
                owner, "layers_pattern", f"{name!r} is not a valid regular expression: {exc}"
            ) from None
    if isinstance(targets, str):
        for field_name, given in (("layers_to_transform", items), ("layers_pattern", names)):
            if given:
                raise _fail(
                    owner,
                    field_name,
                    f"cannot be used when target_modules is a string ({targets!r}); give "
                    "target_modules as a list of names (PEFT's rule)",
                )
    if names and not items:
        raise _fail(
            owner,
            "layers_pattern",
            "needs layers_to_transform: it only says where the layer index is read",
        )
    return (tuple(int(i) for i in items) or None), (names or None)


def check_task_type(value: object, owner: str = "SpectralAdapter") -> str | None:
    """Validate ``task_type`` (one of PEFT's :data:`TASK_TYPES`, or ``None``).

    Raises:
        ValueError: naming the field.
    """
    if value is None:
        return None
    text = getattr(value, "value", value)  # a peft TaskType member
    if not isinstance(text, str) or text not in TASK_TYPES:
        raise _fail(owner, "task_type", f"must be one of {list(TASK_TYPES)} or None; got {value!r}")
    return text


def task_heads(task_type: str | None) -> tuple[str, ...]:
    """The ``modules_to_save`` names a task type adds (PEFT's ``classifier``, ``score``)."""
    return CLASSIFIER_HEAD_NAMES if task_type in HEAD_TASK_TYPES else ()


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    r"""PEFT's ``get_pattern_key``: the first key matching a dot-separated suffix of ``name``.

    Args:
        keys: the pattern keys, in order.
        name: the module's full name.

    Returns:
        The key, or ``None`` if none matches.
    """
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def unmatched_pattern_keys(adapter: SpectralAdapter, names: Iterable[str]) -> dict[str, list[str]]:
    """Name the pattern keys (per field) that match none of ``names`` (PEFT warns of them)."""
    names = list(names)
    out: dict[str, list[str]] = {}
    for field_name in PATTERN_FIELDS:
        patterns: Mapping[str, Any] = getattr(adapter, field_name)
        missed = [k for k in patterns if not any(pattern_key((k,), n) for n in names)]
        if missed:
            out[field_name] = sorted(missed)
    return out


def warn_unmatched_patterns(adapter: SpectralAdapter, names: Iterable[str]) -> None:
    """Warn of pattern keys matching none of the targeted ``names`` (PEFT warns so too).

    Warns:
        RuntimeWarning: naming the keys per field; a misspelt key changes nothing.
    """
    missed = unmatched_pattern_keys(adapter, names)
    if missed:
        warnings.warn(
            f"pattern keys that match no targeted module were ignored: {missed}",
            RuntimeWarning,
            stacklevel=4,
        )


def saved_modules(
    candidates: Sequence[tuple[str, _Module]], adapter: SpectralAdapter, owner: str
) -> list[_Module]:
    """The modules ``adapter.modules_to_save`` names, by name or ``"." + name`` suffix.

    The task heads a ``task_type`` adds (``classifier``, ``score``) may match
    nothing, as in PEFT, but with such a task type some entry must match.

    Args:
        candidates: the model's ``(name, module)`` pairs.
        adapter: the adapter.
        owner: the model's class name, for messages.

    Returns:
        The modules, in entry order.

    Raises:
        ValueError: naming the entry (or the task type) that matches nothing.
    """
    heads = task_heads(adapter.task_type)
    saved: list[_Module] = []
    for wanted in adapter.modules_to_save:
        found = [m for n, m in candidates if n == wanted or n.endswith("." + wanted)]
        if not found and wanted not in heads:
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module")
        saved.extend(found)
    if heads and not saved:
        raise ValueError(
            f"task_type={adapter.task_type!r} trains the classification head through "
            f"modules_to_save, but {owner} has no module named "
            f"{' or '.join(map(repr, heads))}; name the head in modules_to_save"
        )
    return saved


def module_overrides(adapter: SpectralAdapter, name: str) -> dict[str, Any]:
    """Return the fields the patterns override on the module ``name`` (empty if none).

    Raises:
        ValueError: if both budget patterns match the module (naming both keys).
    """
    changes: dict[str, Any] = {}
    key = pattern_key(adapter.rank_pattern, name)
    if key is not None:
        changes["r"] = adapter.rank_pattern[key]
    key = pattern_key(adapter.alpha_pattern, name)
    if key is not None:
        changes["alpha"] = adapter.alpha_pattern[key]
    ratio_key = pattern_key(adapter.sparse_ratio_pattern, name)
    coeffs_key = pattern_key(adapter.n_coeffs_pattern, name)
    if ratio_key is not None and coeffs_key is not None:
        raise ValueError(
            f"module {name!r} matches sparse_ratio_pattern key {ratio_key!r} and "
            f"n_coeffs_pattern key {coeffs_key!r}; a module takes one budget"
        )
    if ratio_key is not None:
        changes["sparse_ratio"] = adapter.sparse_ratio_pattern[ratio_key]
        changes["n_coeffs"] = None
    if coeffs_key is not None:
        changes["n_coeffs"] = adapter.n_coeffs_pattern[coeffs_key]
        changes["sparse_ratio"] = None
    return changes


def resolve_for_module(adapter: SpectralAdapter, name: str) -> SpectralAdapter:
    """Return the adapter one module gets: the patterns applied, then cleared.

    Args:
        adapter: the model-level adapter.
        name: the module's full name (PEFT's ``current_key``).

    Returns:
        ``adapter`` itself when it has no pattern, else a copy with the
        module's ``r`` / ``alpha`` / budget and empty patterns.

    Raises:
        ValueError: if both budget patterns match the module.
    """
    if not any(getattr(adapter, f) for f in PATTERN_FIELDS):
        return adapter
    changes = module_overrides(adapter, name)
    cleared: dict[str, Any] = {f: {} for f in PATTERN_FIELDS}
    return dataclasses.replace(adapter, **changes, **cleared)


def in_modules_to_save(name: str, modules_to_save: Iterable[str]) -> bool:
    r"""PEFT's guard: ``name`` is, or is inside, a ``modules_to_save`` module."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def layer_selected(
    name: str, layers: int | Sequence[int] | None, pattern: str | Sequence[str] | None
) -> bool:
    """PEFT's layer filter: whether the layer index found in ``name`` is selected.

    Args:
        name: the module's full name.
        layers: ``layers_to_transform`` (``None``: every module is selected).
        pattern: ``layers_pattern`` (``None``: the first ``<name>.<index>.``).

    Returns:
        ``True`` if selected.
    """
    if layers is None or (not isinstance(layers, int) and not layers):
        return True
    layers = (layers,) if isinstance(layers, int) else layers
    pattern = (pattern,) if isinstance(pattern, str) else pattern
    match: re.Match[str] | None = None
    if not pattern:
        # PEFT: the lazy .*? takes the first numbered segment (not an MoE expert index).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for layer_name in pattern:
            match = re.match(rf"(?:^|.*?\.){layer_name}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    return int(match.group("idx")) in layers
