"""The X-LoRA checkpoint, written and read by both front doors (selora's and PEFT's).

PEFT's directory layout, selora's format (version 2):

``adapter_config.json``
    ``peft_type: "SELORA_XLORA"``, ``selora_format_version``, the fields of
    :class:`~selora.xlora.XLoRAConfig` (``experts``: the names, in order) and
    ``expert_configs``: name -> the expert's adapter config exactly as
    :func:`selora.save_adapter` writes it (basis, class, options, base, budget, ...).
    The PEFT door adds PEFT's own fields.
``adapter_model.safetensors``
    * ``base_model.model.<layer>.selora_units.<expert>.<tensor>``: each expert's
      unit on each layer (a single adapter's checkpoint drops the name; here it
      tells the experts apart);
    * ``selora.locations.<m>x<n>.<k>`` (and ``<stem>.locations`` for a factor
      whose set differs): the int32 location sets, each distinct one once;
    * ``base_model.model.selora_xlora_classifier.<tensor>``: the classifier;
    * ``selora.config_sha256``: :func:`xlora_digest` of the config.

Loading checks the hash, every key, dtype, shape and location set before
anything is written (:func:`~selora.adapters.checkpoint_plan.plan_load`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from selora.adapters.checkpoint_format import (
    FORMAT_VERSION,
    HASH_KEY,
    PEFT_PREFIX,
    UNITS_ATTR,
    VERSION_FIELD,
    AdapterCheckpointError,
    adapter_from_config,
    config_digest,
    digest_tensor,
    full_config,
    tensor_digest,
)
from selora.adapters.checkpoint_plan import LoadPlan, location_tensors, plan_load
from selora.adapters.config import SpectralAdapter
from selora.adapters.layer import SpectralLayer
from selora.spectral_bases import SparseSpectrum
from selora.xlora.classifier import CLASSIFIER_ATTR
from selora.xlora.config import XLoRAConfig

__all__ = [
    "EXPERT_CONFIGS",
    "PEFT_TYPE",
    "adapter_of",
    "checkpoint_tensors",
    "config_fields",
    "expert_adapters",
    "load_plan",
    "xlora_digest",
]

PEFT_TYPE = "SELORA_XLORA"
"""The ``peft_type`` of an X-LoRA checkpoint."""

EXPERT_CONFIGS = "expert_configs"
"""The config field holding each expert's adapter config."""

CLASSIFIER_PREFIX = f"{PEFT_PREFIX}{CLASSIFIER_ATTR}."


def adapter_of(model: nn.Module, name: str) -> SpectralAdapter:
    """Return the :class:`~selora.SpectralAdapter` of the expert ``name`` on ``model``.

    Args:
        model: the model holding the expert.
        name: the adapter name.

    Returns:
        The model's registered adapter (:func:`selora.inject`), else the unit's own.

    Raises:
        ValueError: if no layer holds ``name``.
    """
    registry = model.__dict__.get("selora_adapters")
    if isinstance(registry, dict) and name in registry:
        adapter = registry[name]
        assert isinstance(adapter, SpectralAdapter)
        return adapter
    for module in model.modules():
        if isinstance(module, SpectralLayer) and name in module.selora_units:
            return module.unit(name).adapter
    raise ValueError(f"{type(model).__name__} holds no adapter {name!r}")


def config_fields(config: XLoRAConfig, model: nn.Module) -> dict[str, Any]:
    """Return the selora part of the X-LoRA ``adapter_config.json``.

    Args:
        config: the X-LoRA configuration.
        model: the model holding the experts.

    Returns:
        ``peft_type``, the format version, the X-LoRA fields and ``expert_configs``.
    """
    experts = {name: full_config(adapter_of(model, name)) for name in config.names}
    return {
        "peft_type": PEFT_TYPE,
        VERSION_FIELD: FORMAT_VERSION,
        **config.to_dict(),
        EXPERT_CONFIGS: experts,
    }


def xlora_digest(data: Mapping[str, Any]) -> bytes:
    """Return the sha256 of what an X-LoRA config computes (its fields, the experts' hashes).

    Args:
        data: the config dict (PEFT's fields in it are ignored).

    Returns:
        32 bytes.
    """
    fields = set(XLoRAConfig.__dataclass_fields__) - {"checkpoints"}
    part: dict[str, Any] = {key: data.get(key) for key in sorted(fields)}
    experts = data.get(EXPERT_CONFIGS) or {}
    part[EXPERT_CONFIGS] = {name: config_digest(cfg).hex() for name, cfg in experts.items()}
    text = json.dumps(part, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).digest()


def expert_adapters(data: Mapping[str, Any], where: str) -> dict[str, SpectralAdapter]:
    """Read the experts' adapter configs of a saved X-LoRA config.

    Args:
        data: the config dict.
        where: the file, for messages.

    Returns:
        Name -> adapter, in the order of ``experts``.

    Raises:
        AdapterCheckpointError: for a missing or bad expert config.
    """
    configs = data.get(EXPERT_CONFIGS)
    names = data.get("experts")
    if not isinstance(configs, dict) or not isinstance(names, list) or set(configs) != set(names):
        raise AdapterCheckpointError(
            f"{where}: {EXPERT_CONFIGS} must give one adapter config per expert {names!r}"
        )
    return {name: adapter_from_config(configs[name], f"{where}: expert {name!r}") for name in names}


def _units(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, str, nn.Module]]:
    """``(checkpoint prefix, unit)`` for every unit of the experts, keyed from ``model``'s root."""
    found = []
    for layer_name, layer in model.named_modules():
        if isinstance(layer, SpectralLayer):
            for name in names:
                if name in layer.selora_units:
                    prefix = f"{PEFT_PREFIX}{layer_name}.{UNITS_ATTR}.{name}."
                    found.append((prefix, name, layer.selora_units[name]))
    return found


def _owned(
    model: nn.Module, names: tuple[str, ...], classifier: nn.Module
) -> tuple[dict[str, Tensor], dict[str, SparseSpectrum]]:
    tensors: dict[str, Tensor] = {}
    factors: dict[str, SparseSpectrum] = {}
    for prefix, _, unit in _units(model, names):
        for key, tensor in unit.state_dict(keep_vars=True).items():
            tensors[prefix + key] = tensor
        for sub, module in unit.named_modules():
            if isinstance(module, SparseSpectrum):
                factors[prefix + sub] = module
    for key, tensor in classifier.state_dict(keep_vars=True).items():
        tensors[CLASSIFIER_PREFIX + key] = tensor
    return tensors, factors


def checkpoint_tensors(
    model: nn.Module, config: XLoRAConfig, classifier: nn.Module
) -> dict[str, Tensor]:
    """Return every tensor of the X-LoRA checkpoint (CPU copies), the hash included.

    Args:
        model: the model holding the experts.
        config: the X-LoRA configuration.
        classifier: the classifier.

    Returns:
        Checkpoint key -> tensor.
    """
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
    """Check a checkpoint's tensors against an X-LoRA model; nothing is written yet.

    Args:
        model: the model holding the experts (keys from its root).
        config: the X-LoRA configuration.
        classifier: the classifier.
        tensors: the checkpoint's tensors.
        where: the file, for messages.

    Returns:
        The plan: ``apply_locations()``, then ``apply_copies()``.

    Raises:
        AdapterCheckpointError: for another config's tensors, a missing,
            foreign or misshapen tensor, or a bad location set.
    """
    stored = tensors.get(HASH_KEY)
    expected = xlora_digest(config_fields(config, model))
    if stored is None or tensor_digest(stored, where) != expected:
        raise AdapterCheckpointError(
            f"{where}: the tensors were not saved with this X-LoRA config (no or another "
            f"{HASH_KEY!r}: an edited config, or files of two saves); nothing was loaded"
        )
    targets, factors = _owned(model, config.names, classifier)
    return plan_load(dict(tensors), targets, factors, where, owner="the X-LoRA model")
