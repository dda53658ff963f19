"""The X-LoRA checkpoint, which both front doors write and read: :func:`save`, :func:`load`.

PEFT's directory layout, selora's format (version 2); PEFT's door
(:mod:`selora.xlora.peft`) writes and reads the same files:

``adapter_config.json``
    ``peft_type: "SELORA_XLORA"``, ``selora_format_version``, the fields of
    :class:`~selora.xlora.XLoRAConfig` (``experts``: the names, in order),
    ``expert_configs`` (name -> the expert's config as :func:`selora.save_adapter`
    writes it) and PEFT's own fields.
``adapter_model.safetensors``
    ``base_model.model.<layer>.selora_units.<expert>.<tensor>`` (each expert's
    unit; a single adapter's checkpoint drops the name), the location sets
    (``selora.locations.<m>x<n>.<k>``, as for one adapter),
    ``base_model.model.selora_xlora_classifier.<tensor>`` and
    ``selora.config_sha256`` (:func:`xlora_digest` of the config).

Loading checks the hash, every key, dtype, shape and location set before
anything is written (:func:`~selora.adapters.checkpoint_plan.plan_load`) and
leaves the model as it was on any failure.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from selora.adapters.checkpoint_format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HASH_KEY,
    VERSION_FIELD,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    adapter_from_config,
    config_digest,
    digest_tensor,
    full_config,
    tensor_digest,
)
from selora.adapters.checkpoint_plan import (
    LoadPlan,
    location_tensors,
    plan_load,
    restore_model,
    snapshot_model,
)
from selora.adapters.checkpoint_read import read_config_file, read_tensors_file
from selora.adapters.io import fsync_directory, unit_tensors, write_atomically
from selora.adapters.layer import SpectralLayer
from selora.adapters.model import ADAPTERS_ATTR, inject
from selora.adapters.unit import AdapterUnit
from selora.spectral_bases import SparseSpectrum
from selora.xlora.classifier import CLASSIFIER_ATTR
from selora.xlora.config import XLoRAConfig
from selora.xlora.model import XLoRAModel

__all__ = ["PEFT_TYPE", "from_pretrained", "load", "read", "save", "xlora_digest"]

PEFT_TYPE = "SELORA_XLORA"
"""The ``peft_type`` of an X-LoRA checkpoint."""

EXPERT_CONFIGS = "expert_configs"
CLASSIFIER_PREFIX = f"base_model.model.{CLASSIFIER_ATTR}."
_FIELDS = set(XLoRAConfig.__dataclass_fields__) - {"checkpoints"}
_PEFT_FIELDS: dict[str, Any] = dict.fromkeys(
    ("auto_mapping", "base_model_name_or_path", "revision", "task_type")
) | {"inference_mode": True}


def config_fields(config: XLoRAConfig, model: nn.Module) -> dict[str, Any]:
    """Return the selora part of ``adapter_config.json`` for ``config``'s experts on ``model``."""
    registry = model.__dict__.get(ADAPTERS_ATTR) or {}
    units = {
        n: m.unit(n)
        for m in model.modules()
        if isinstance(m, SpectralLayer)
        for n in m.selora_units
    }
    experts = {
        n: full_config(registry[n] if n in registry else units[n].adapter) for n in config.names
    }
    return {"peft_type": PEFT_TYPE, VERSION_FIELD: FORMAT_VERSION, **config.to_dict()} | {
        EXPERT_CONFIGS: experts
    }


def xlora_digest(data: Mapping[str, Any]) -> bytes:
    """Return the sha256 of what a config computes: its X-LoRA fields and the experts' hashes."""
    part: dict[str, Any] = {key: data.get(key) for key in sorted(_FIELDS)}
    experts = data.get(EXPERT_CONFIGS) or {}
    part[EXPERT_CONFIGS] = {name: config_digest(cfg).hex() for name, cfg in experts.items()}
    text = json.dumps(part, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).digest()


def _check_digest(tensors: Mapping[str, Tensor], data: Mapping[str, Any], where: str) -> None:
    stored = tensors.get(HASH_KEY)
    if stored is None or tensor_digest(stored, where) != xlora_digest(data):
        raise AdapterCheckpointError(
            f"{where}: the tensors were not saved with this X-LoRA config (no or another "
            f"{HASH_KEY!r}: an edited config, or files of two saves); nothing was loaded"
        )


def inject_experts(model: nn.Module, data: Mapping[str, Any], where: str) -> None:
    """Inject the experts a saved config describes (``experts``, ``expert_configs``).

    Raises:
        AdapterCheckpointError: for a missing or bad expert config.
    """
    configs, names = data.get(EXPERT_CONFIGS), data.get("experts")
    if not isinstance(configs, dict) or not isinstance(names, list) or set(configs) != set(names):
        raise AdapterCheckpointError(
            f"{where}: {EXPERT_CONFIGS} must give one adapter config per expert {names!r}"
        )
    adapters = {n: adapter_from_config(configs[n], f"{where}: expert {n!r}") for n in names}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    for name, adapter in adapters.items():
        with torch.random.fork_rng(devices=devices):  # the checkpoint gives every tensor
            inject(model, adapter, name=name)


def _owned(
    model: nn.Module, names: tuple[str, ...], classifier: nn.Module
) -> tuple[dict[str, Tensor], dict[str, SparseSpectrum]]:
    """The experts' and the classifier's tensors, and the experts' sparse factors, by key."""
    tensors = {CLASSIFIER_PREFIX + k: t for k, t in classifier.state_dict(keep_vars=True).items()}
    factors: dict[str, SparseSpectrum] = {}
    for name in names:
        for _, prefix, unit in unit_tensors(model, name):
            tensors.update(
                {f"{prefix}{name}.{k}": t for k, t in unit.state_dict(keep_vars=True).items()}
            )
            factors.update(
                {
                    f"{prefix}{name}.{s}": m
                    for s, m in unit.named_modules()
                    if isinstance(m, SparseSpectrum)
                }
            )
    return tensors, factors


def checkpoint_tensors(
    model: nn.Module, config: XLoRAConfig, classifier: nn.Module
) -> dict[str, Tensor]:
    """Return every tensor of the checkpoint (CPU copies), locations and hash included."""
    owned, factors = _owned(model, config.names, classifier)
    tensors = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in owned.items()}
    tensors.update(location_tensors(factors.items()))
    tensors[HASH_KEY] = digest_tensor(xlora_digest(config_fields(config, model)))
    return tensors


def load_plan(
    model: nn.Module,
    config: XLoRAConfig,
    classifier: nn.Module,
    tensors: Mapping[str, Tensor],
    where: str,
) -> LoadPlan:
    """Check a checkpoint's tensors against an X-LoRA model (nothing is written yet).

    Raises:
        AdapterCheckpointError: for another config's tensors, a missing,
            foreign or misshapen tensor, or a bad location set.
    """
    _check_digest(tensors, config_fields(config, model), where)
    targets, factors = _owned(model, config.names, classifier)
    return plan_load(dict(tensors), targets, factors, where, owner="the X-LoRA model")


def save(model: XLoRAModel, path: str | os.PathLike[str]) -> None:
    """Save an X-LoRA model's experts and classifier (not the frozen base weights).

    Args:
        model: the X-LoRA model.
        path: a directory, created if needed; existing checkpoint files are replaced.
    """
    config = _PEFT_FIELDS | config_fields(model.xlora_config, model.model)
    tensors = checkpoint_tensors(model.model, model.xlora_config, model.classifier)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", VERSION_FIELD: str(FORMAT_VERSION)}
    write_atomically(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=metadata))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomically(directory / CONFIG_NAME, text.encode("utf-8"))
    fsync_directory(directory)


def read(path: str | os.PathLike[str]) -> tuple[XLoRAConfig, dict[str, Any], dict[str, Tensor]]:
    """Read and check a checkpoint on its own (no model): files, type, version, fields, hash.

    Returns:
        The configuration, the whole JSON object and the tensors.

    Raises:
        FileNotFoundError: if a checkpoint file is missing.
        AdapterCheckpointError: naming the file, for anything else.
    """
    config_file, weights = Path(path) / CONFIG_NAME, Path(path) / WEIGHTS_NAME
    for file in (config_file, weights):
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist")
    data = read_config_file(config_file)
    if not isinstance(data, dict) or data.get("peft_type") != PEFT_TYPE:
        got = data.get("peft_type") if isinstance(data, dict) else data
        raise AdapterCheckpointError(f"{config_file}: peft_type is {got!r}, not {PEFT_TYPE!r}")
    if data.get(VERSION_FIELD) != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{config_file}: {VERSION_FIELD} is {data.get(VERSION_FIELD)!r}; this selora "
            f"reads version {FORMAT_VERSION}"
        )
    try:
        config = XLoRAConfig.from_dict({k: v for k, v in data.items() if k in _FIELDS})
    except (TypeError, ValueError) as exc:
        raise AdapterCheckpointError(f"{config_file}: {exc}") from None
    tensors, _ = read_tensors_file(weights)
    _check_digest(tensors, data, str(weights))
    return config, data, tensors


def load(model: nn.Module, path: str | os.PathLike[str]) -> XLoRAModel:
    """Load an X-LoRA checkpoint (either door's) onto a base model, all or nothing.

    Args:
        model: the base model the experts were trained on (bare, or holding
            other adapters under other names).
        path: a checkpoint directory.

    Returns:
        The :class:`XLoRAModel`, computing what the saved one computed.

    Raises:
        FileNotFoundError: if a checkpoint file is missing.
        AdapterCheckpointError: naming the file, for anything that does not
            fit; the model is left as it was.
    """
    config, data, tensors = read(path)
    where = str(Path(path) / CONFIG_NAME)
    snapshot = snapshot_model(model)
    try:
        inject_experts(model, data, where)
        wrapped = XLoRAModel(model, config)
        plan = load_plan(model, config, wrapped.classifier, tensors, where)
    except (ValueError, TypeError) as exc:
        restore_model(snapshot)
        if isinstance(exc, AdapterCheckpointError):
            raise
        raise AdapterCheckpointError(
            f"{where}: the X-LoRA model does not fit {type(model).__name__}: {exc}"
        ) from exc
    except BaseException:
        restore_model(snapshot)
        raise
    plan.apply_locations()
    plan.apply_copies()
    for module in model.modules():
        if isinstance(module, AdapterUnit):
            module.train(module.training)  # drops the factor cache
    return wrapped


from_pretrained = load
