r"""The checkpoint format both front doors write and read (version 2), without torch models.

A checkpoint is a directory in PEFT's layout:

``adapter_config.json``
    Exactly what :meth:`SeloraConfig.to_dict` gives (PEFT writes it): PEFT's
    own fields (``peft_type: "SELORA"``, ``task_type``, ``inference_mode``,
    ...), the spectral fields of :class:`~selora.SpectralAdapter`
    (:data:`SPECTRAL_FIELDS`), ``basis_class`` and ``basis_options`` (the
    basis' class path and constructor options,
    :func:`~selora.spectral_bases.basis_spec`) and ``selora_format_version``.
    :func:`spectral_config` defines the selora part, for both writers.

``adapter_model.safetensors``
    Every key carries PEFT's ``base_model.model.`` prefix (a model adapted by
    :func:`selora.inject` has none; the native writer adds it):

    * ``base_model.model.<layer>.selora_units.<tensor>``: the tensors of the
      adapter's unit on ``<layer>``, adapter name removed (``lora_A.coefficients``,
      ``lora_B.coefficients``, ``lora_A.weight`` for a dense factor, DoRA's
      ``magnitude``);
    * ``base_model.model.<module>.<tensor>``: a ``modules_to_save`` module
      (what PEFT's ``ModulesToSaveWrapper`` saves);
    * ``selora.locations.<m>x<n>.<k>``: int32 flat row-major indices of the
      location set shared by the ``(m, n)`` factors with ``k`` coefficients
      (every factor of one shape shares :math:`\Omega`), each distinct set
      once; a factor whose set differs from the shared one has its own under
      its stem: ``<...>.lora_A.locations``. Never regenerated at load;
    * ``selora.config_sha256``: uint8 ``(32,)``, :func:`config_digest` of the
      config, so that a config and tensors of two different saves are told
      apart (the native writer also puts it, and the format version, in the
      safetensors metadata).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import torch
from torch import Tensor

from selora.adapters.config import SpectralAdapter
from selora.adapters.patterns import PATTERN_FIELDS
from selora.spectral_bases import InverseTransform, basis_spec, build_basis, get_basis

__all__ = [
    "BASIS_FIELDS",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "HASHED_FIELDS",
    "HASH_KEY",
    "LOCATIONS_PREFIX",
    "LOCATIONS_SUFFIX",
    "PEFT_PREFIX",
    "PEFT_TYPE_NAME",
    "PLACEMENT_FIELDS",
    "REQUIRED_FIELDS",
    "SELECTION_FIELDS",
    "SPECTRAL_FIELDS",
    "UNITS_ATTR",
    "VERSION_FIELD",
    "WEIGHTS_NAME",
    "AdapterCheckpointError",
    "adapter_from_config",
    "check_config_keys",
    "config_digest",
    "differing_fields",
    "digest_tensor",
    "full_config",
    "rebuild_basis",
    "refuse_legacy",
    "spectral_config",
    "tensor_digest",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2
VERSION_FIELD = "selora_format_version"
PEFT_TYPE_NAME = "SELORA"
PEFT_PREFIX = "base_model.model."
UNITS_ATTR = "selora_units"
LOCATIONS_PREFIX = "selora.locations."
LOCATIONS_SUFFIX = ".locations"
HASH_KEY = "selora.config_sha256"

SPECTRAL_FIELDS: tuple[str, ...] = (
    "basis",
    "base",
    "r",
    "alpha",
    "sparse_ratio",
    "n_coeffs",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "dropout",
    "seed",
    "base_options",
    "scale",
    "init_weights",
    "autocast_adapter_dtype",
    "rank_pattern",
    "alpha_pattern",
    "sparse_ratio_pattern",
    "n_coeffs_pattern",
    "use_rslora",
    "layers_to_transform",
    "layers_pattern",
    "task_type",
)
"""The fields of :class:`~selora.SpectralAdapter`, as ``adapter_config.json`` names them."""

SELECTION_FIELDS: tuple[str, ...] = ("layers_to_transform", "layers_pattern", "task_type")
"""Which modules are adapted or saved (PEFT's layer selection and task type); not hashed,
like :data:`PLACEMENT_FIELDS`: they change where units sit (the tensor keys say it), not
what a unit computes. The per-module patterns and ``use_rslora`` are hashed."""

BASIS_FIELDS: tuple[str, ...] = ("basis_class", "basis_options")

PLACEMENT_FIELDS: tuple[str, ...] = ("target_modules", "exclude_modules", "modules_to_save")
"""Where the adapter sits; not hashed: PEFT rewrites them in a live config (``"all-linear"``
becomes the matched names, task heads join ``modules_to_save``), and the tensor keys
carry them (every targeted layer's tensors must be there, and no other)."""

INIT_FIELDS: tuple[str, ...] = ("init_weights",)
"""How a new adapter's tensors start; not hashed: a checkpoint's tensors replace them, so a
model built with either value computes the same after loading (PEFT's tests load a
``init_weights=False`` save into a model built with the default)."""

HASHED_FIELDS: tuple[str, ...] = (
    VERSION_FIELD,
    *(f for f in SPECTRAL_FIELDS if f not in PLACEMENT_FIELDS + SELECTION_FIELDS + INIT_FIELDS),
    *BASIS_FIELDS,
)
"""The computation-defining fields :func:`config_digest` covers."""

REQUIRED_FIELDS: tuple[str, ...] = ("peft_type", VERSION_FIELD, *SPECTRAL_FIELDS, *BASIS_FIELDS)


class AdapterCheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; the model is unchanged."""


# --------------------------------------------------------------------------- config


def _peft_version() -> str | None:
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None


def _names(value: str | Iterable[str]) -> str | list[str] | None:
    if isinstance(value, str):
        return value
    names = sorted(value)
    return names or None


def spectral_config(
    adapter: SpectralAdapter, *, shapes: Iterable[tuple[int, int]] = ()
) -> dict[str, Any]:
    """Return the selora part of ``adapter_config.json`` for ``adapter`` (both writers use it).

    The spectral fields as :class:`~selora.integrations.peft.SeloraConfig`
    stores them (empty ``exclude_modules`` / ``modules_to_save`` as ``None``,
    target names sorted), the basis by name with ``basis_class`` and
    ``basis_options`` (``None`` for dense factors), and ``selora_format_version``.

    Args:
        adapter: the adapter.
        shapes: factor shapes ``(m, n)`` the basis is probed at besides the
            defaults of :func:`~selora.spectral_bases.basis_spec` (needed only
            by a basis that refuses those).

    Returns:
        A JSON-serialisable dict.

    Raises:
        BasisNotSavableError: if the basis cannot be rebuilt from its declared
            options (a ``ValueError``; nothing should be written).
        ValueError: if ``base_options`` is not JSON-serialisable.
    """
    data = adapter.to_dict()
    if adapter.basis is None:
        basis, cls, options = None, None, None
    else:
        spec = basis_spec(adapter.basis, shapes=shapes)
        basis, cls, options = spec["name"], spec["cls"], spec["options"]
    out: dict[str, Any] = {field: data[field] for field in SPECTRAL_FIELDS}
    out["basis"] = basis
    out["target_modules"] = _names(adapter.target_modules) or []
    out["exclude_modules"] = _names(adapter.exclude_modules)
    out["modules_to_save"] = _names(adapter.modules_to_save)
    out["basis_class"] = cls
    out["basis_options"] = options
    out[VERSION_FIELD] = FORMAT_VERSION
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the adapter config cannot be saved as JSON: {exc}") from None
    return out


def full_config(
    adapter: SpectralAdapter, *, shapes: Iterable[tuple[int, int]] = ()
) -> dict[str, Any]:
    """Return the whole ``adapter_config.json`` the native writer writes (PEFT's fields too).

    The same keys as ``SeloraConfig.to_dict()``, without importing PEFT:
    PEFT's fields take the values ``PeftModel.save_pretrained`` writes for a
    model with no task type.

    Args:
        adapter: the adapter.
        shapes: see :func:`spectral_config`.

    Returns:
        A JSON-serialisable dict.
    """
    peft_fields: dict[str, Any] = {
        "task_type": None,
        "peft_type": PEFT_TYPE_NAME,
        "auto_mapping": None,
        "peft_version": _peft_version(),
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
    }
    return {**peft_fields, **spectral_config(adapter, shapes=shapes)}


def _canonical(value: Any) -> Any:
    """Sets as sorted lists, tuples as lists, through JSON: a saved and a read value agree."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=repr)
        if isinstance(obj, Mapping):
            return dict(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(value, default=default))


def config_digest(config: Mapping[str, Any]) -> bytes:
    """Return the sha256 of the computation-defining part of a config (:data:`HASHED_FIELDS`).

    The digest of a canonical JSON text: sorted keys, no whitespace, sets as
    sorted lists, tuples as lists (in order: in ``base_options`` an order can
    mean something), every value put through a JSON
    round trip first, so the config object a writer holds and the JSON a
    reader parses give the same digest. A missing field counts as ``null``.
    The placement fields are left out (:data:`PLACEMENT_FIELDS`).

    Args:
        config: the config dict (``SeloraConfig.to_dict()`` or the parsed JSON).

    Returns:
        32 bytes.
    """
    part = {key: config.get(key) for key in HASHED_FIELDS}
    text = json.dumps(_canonical(part), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).digest()


def digest_tensor(digest: bytes) -> Tensor:
    """Return ``digest`` as the uint8 tensor stored under :data:`HASH_KEY`."""
    return torch.tensor(list(digest), dtype=torch.uint8)


def tensor_digest(tensor: Tensor, where: str) -> bytes:
    """Read the digest a checkpoint stores under :data:`HASH_KEY` (checked: uint8, 32 bytes).

    Raises:
        AdapterCheckpointError: naming ``where`` and the key, if it is not a uint8 (32,) tensor.
    """
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (32,):
        raise AdapterCheckpointError(
            f"{where}: {HASH_KEY!r} must be a uint8 tensor of 32 bytes; got "
            f"{tensor.dtype} {tuple(tensor.shape)}"
        )
    return bytes(tensor.tolist())


def refuse_legacy(config: Mapping[str, Any], where: str) -> None:
    """Refuse a selora v1 config, or a SELORA PEFT config written before the format version.

    Raises:
        AdapterCheckpointError: naming ``where`` and saying why such a file cannot load.
    """
    if config.get("format") == "selora-adapter":
        raise AdapterCheckpointError(
            f'{where} is a selora v1 checkpoint ("format": "selora-adapter"); this selora reads '
            f"checkpoint format version {FORMAT_VERSION} only (PEFT's layout), so it is not "
            "loaded: retrain, or load it with the selora release that wrote it"
        )
    if VERSION_FIELD not in config and config.get("peft_type") == PEFT_TYPE_NAME:
        raise AdapterCheckpointError(
            f"{where} is a SELORA checkpoint written before {VERSION_FIELD!r} existed: it "
            "stores no spectral locations (they were regenerated from the seed through NumPy "
            "at load, which another NumPy or an edited seed silently changes) and no basis "
            "class or options, so it cannot be loaded exactly and is refused: retrain, or load "
            "it with the selora release that wrote it"
        )


def check_config_keys(config: object, where: str) -> dict[str, Any]:
    """Check the format version, ``peft_type`` and that every field is present.

    Args:
        config: the parsed JSON.
        where: the file, for messages.

    Returns:
        ``config`` as a dict.

    Raises:
        AdapterCheckpointError: naming the file and the field.
    """
    if not isinstance(config, dict):
        raise AdapterCheckpointError(
            f"{where}: expected a JSON object; got {type(config).__name__}"
        )
    refuse_legacy(config, where)
    version = config.get(VERSION_FIELD)
    if VERSION_FIELD in config and version != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{where}: {VERSION_FIELD} is {version!r}; this selora reads version {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_FIELDS if key not in config]
    if missing:
        raise AdapterCheckpointError(
            f"{where}: the config has no {missing[0]!r} (missing: {missing}); a checkpoint "
            "must state every field, none is given a default"
        )
    if str(config["peft_type"]) != PEFT_TYPE_NAME:
        raise AdapterCheckpointError(
            f"{where}: peft_type is {config['peft_type']!r}, not {PEFT_TYPE_NAME!r}: not a "
            "selora adapter"
        )
    return config


def rebuild_basis(config: Mapping[str, Any], where: str) -> str | InverseTransform | None:
    """Rebuild the basis a config names (:func:`~selora.spectral_bases.build_basis`).

    Returns:
        ``None`` for dense factors; the registered name when the options are
        empty (the class checked); else the instance built from the options.

    Raises:
        AdapterCheckpointError: naming the file, if the basis is not registered,
            is of another class now, or refuses its options.
    """
    name, cls, options = config["basis"], config["basis_class"], config["basis_options"]
    if name is None:
        if cls is not None or options is not None:
            raise AdapterCheckpointError(
                f"{where}: basis is null (dense factors) but basis_class={cls!r}, "
                f"basis_options={options!r}"
            )
        return None
    try:
        built = build_basis({"name": name, "cls": cls, "options": options})
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterCheckpointError(f"{where}: {exc}") from None
    if options == {} and type(get_basis(name)) is type(built):
        return str(name)
    return built


def adapter_from_config(config: object, where: str) -> SpectralAdapter:
    """Check a parsed ``adapter_config.json`` and return its adapter.

    Checked: version 2 (a v1 or a legacy PEFT config is refused, saying why),
    ``peft_type``, every field present, the basis rebuilt (registered, same
    class, same options), every value valid.

    Args:
        config: the parsed JSON.
        where: the file, for messages.

    Returns:
        The :class:`~selora.SpectralAdapter`.

    Raises:
        AdapterCheckpointError: naming the file and what is wrong.
    """
    data = check_config_keys(config, where)
    values = {field: data[field] for field in SPECTRAL_FIELDS}
    values["basis"] = rebuild_basis(data, where)
    for key in PLACEMENT_FIELDS:
        value = values[key]
        if value is None:
            values[key] = ()
        elif isinstance(value, list):
            values[key] = tuple(value)
    for key in ("base_options", *PATTERN_FIELDS):
        if not isinstance(values[key], dict):
            raise AdapterCheckpointError(
                f"{where}: {key} must be a JSON object; got {values[key]!r}"
            )
    try:
        return SpectralAdapter(**values)
    except (TypeError, ValueError) as exc:
        raise AdapterCheckpointError(f"{where}: invalid adapter config: {exc}") from None


def differing_fields(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """Name the spectral and basis fields in which two configs differ (placements as sets)."""
    diff = []
    for key in (*SPECTRAL_FIELDS, *BASIS_FIELDS):
        a, b = _canonical(ours.get(key)), _canonical(theirs.get(key))
        if key in PLACEMENT_FIELDS and isinstance(a, list) and isinstance(b, list):
            a, b = sorted(a), sorted(b)
        if key in PLACEMENT_FIELDS:
            a, b = a or None, b or None
        if a != b:
            diff.append(key)
    return diff
