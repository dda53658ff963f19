"""PEFT's two checkpoint hooks for SELORA: what ``save_pretrained`` writes, what loading checks.

PEFT 0.21's ``get_peft_model_state_dict`` calls the tuner's
``_get_adapter_state_dict`` and ``set_peft_model_state_dict`` its
``_remap_adapter_state_dict_for_load``; :class:`~selora.integrations.peft_model.SeloraModel`
wires the two functions here as those classmethods. The files are selora's
checkpoint format (:mod:`selora.adapters.checkpoint_format`), the one
:func:`selora.save_adapter` writes and :func:`selora.load_adapter` reads:

* saving adds every distinct location set once (int32) and the config hash
  ``selora.config_sha256`` to PEFT's usual per-adapter tensors;
* loading checks everything :func:`selora.load_adapter` checks (the hash
  against the config, every key, dtype, shape and location set) before
  anything is touched, raises :class:`~selora.AdapterCheckpointError` naming
  the key or module, applies the stored locations (never regenerated from the
  seed), and hands PEFT the model-keyed tensors to ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from selora.adapters.checkpoint_format import (
    FORMAT_VERSION,
    HASH_KEY,
    PEFT_PREFIX,
    UNITS_ATTR,
    VERSION_FIELD,
    AdapterCheckpointError,
    config_digest,
    digest_tensor,
    tensor_digest,
)
from selora.adapters.checkpoint_plan import location_tensors, plan_load
from selora.adapters.layer import SpectralLayer
from selora.spectral_bases import SparseSpectrum

__all__ = ["get_adapter_state_dict", "remap_adapter_state_dict_for_load"]


def _config_dict(config: Any) -> dict[str, Any]:
    data: dict[str, Any] = config.to_dict()
    return data


def _units(model: nn.Module, adapter_name: str) -> list[tuple[str, SpectralLayer, nn.Module]]:
    """``(layer name, layer, unit)`` for every selora layer holding ``adapter_name``."""
    found: list[tuple[str, SpectralLayer, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer) and adapter_name in module.selora_units:
            found.append((_state_dict_name(name), module, module.selora_units[adapter_name]))
    return found


_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
"""Module names FSDP, activation checkpointing and ``torch.compile`` insert, which
``state_dict()`` leaves out of its keys."""


def _state_dict_name(name: str) -> str:
    """A module name as ``state_dict()`` spells it (wrapper modules removed)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _spectra(unit: nn.Module) -> list[tuple[str, SparseSpectrum]]:
    return [(sub, m) for sub, m in unit.named_modules() if isinstance(m, SparseSpectrum)]


def get_adapter_state_dict(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    state_dict: dict[str, Tensor],
    unwanted_adapter_names: list[str],
) -> dict[str, Tensor]:
    """Select the tensors of ``adapter_name`` and add its location sets and config hash.

    PEFT's ``BaseTuner._get_adapter_state_dict`` contract: the keys of the
    adapter's units keep the adapter name
    (``<layer>.selora_units.<name>.lora_A.coefficients``); PEFT then removes
    it (``SeloraModel._remove_adapter_name_from_key``) and adds the
    ``modules_to_save`` tensors. Added: ``selora.locations.<m>x<n>.<k>``
    (int32, each distinct set once; a factor whose set differs from the
    shared one also gets ``<its stem>.locations``) and
    ``selora.config_sha256`` (uint8, the hash of ``config``'s
    computation-defining fields).

    Args:
        model: the model whose state dict ``state_dict`` is (a ``PeftModel``,
            or a model PEFT layers were injected into).
        config: the adapter's ``SeloraConfig``.
        adapter_name: the adapter saved.
        state_dict: the model's state dict, other adapters filtered out.
        unwanted_adapter_names: the other adapters (unused: the units are
            selected by name).

    Returns:
        The adapter's tensors, keyed as PEFT expects before the name is removed.
    """
    del unwanted_adapter_names
    prefixes: list[str] = []
    factors: list[tuple[str, SparseSpectrum]] = []
    for layer_name, _, unit in _units(model, adapter_name):
        prefix = f"{layer_name}.{UNITS_ATTR}.{adapter_name}."
        prefixes.append(prefix)
        factors.extend((prefix + sub, spectrum) for sub, spectrum in _spectra(unit))
    starts = tuple(prefixes)
    selected = {k: v for k, v in state_dict.items() if starts and k.startswith(starts)}
    selected.update(location_tensors(factors))
    selected[HASH_KEY] = digest_tensor(config_digest(_config_dict(config)))
    return selected


def _check_version(config: Any) -> None:
    version = getattr(config, VERSION_FIELD, None)
    if version != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"the config's {VERSION_FIELD} is {version!r}; this selora loads version "
            f"{FORMAT_VERSION} (a legacy SELORA checkpoint stores no locations)"
        )


def remap_adapter_state_dict_for_load(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    state_dict: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Check a checkpoint against ``model``, apply its locations, return model-keyed tensors.

    PEFT's ``BaseTuner._remap_adapter_state_dict_for_load`` contract: the
    checkpoint keys (no adapter name; ``modules_to_save`` keys already turned
    into model keys by PEFT) become the model's keys of ``adapter_name``;
    PEFT then loads the result with ``load_state_dict(strict=False)``. Before
    anything is touched: the config hash stored with the tensors must equal
    ``config``'s (a config edited after saving, a seed say, or the tensors of
    another save); every key must be a tensor of the adapter's units, of its
    ``modules_to_save`` copies, a location set or the hash (a base weight is
    refused); every unit tensor present, floating where the model's is, of
    the model's shape; every location set int32, of the factor's length, in
    range, without repeats; no unit of the adapter merged. Then each factor
    gets its stored locations.

    Args:
        model: the model loaded into (a ``PeftModel``, or a model PEFT layers
            were injected into, whose keys lack ``base_model.model.``).
        config: the adapter's ``SeloraConfig``.
        adapter_name: the adapter loaded into.
        state_dict: the checkpoint's tensors.

    Returns:
        The tensors keyed as in ``model.state_dict()``, without the location
        sets and the hash.

    Raises:
        AdapterCheckpointError: naming the key or module; nothing was changed.
    """
    where = f"the checkpoint of adapter {adapter_name!r}"
    _check_version(config)
    stored = state_dict.get(HASH_KEY)
    if stored is None:
        raise AdapterCheckpointError(
            f"{where} holds no {HASH_KEY!r}: not written in selora's checkpoint format "
            f"version {FORMAT_VERSION}, so its tensors cannot be matched to its config"
        )
    if tensor_digest(stored, where) != config_digest(_config_dict(config)):
        raise AdapterCheckpointError(
            f"{where}: adapter_config.json does not match the tensors (they were saved with "
            "another config: an edited config, a torn save, or files of two saves); nothing "
            "was loaded"
        )
    model_keys = model.state_dict(keep_vars=True)
    prefixed = any(k.startswith(PEFT_PREFIX) for k in model_keys)

    def checkpoint_key(model_key: str) -> str:
        return model_key if prefixed else PEFT_PREFIX + model_key

    targets: dict[str, Tensor] = {}
    to_model: dict[str, str] = {}
    factors: dict[str, SparseSpectrum] = {}
    for layer_name, layer, unit in _units(model, adapter_name):
        if adapter_name in layer.merged_adapters:
            raise AdapterCheckpointError(
                f"{layer_name}: adapter {adapter_name!r} is merged into the frozen weight; "
                "unmerge it before loading (the merged weight would keep the old update)"
            )
        own = f"{layer_name}.{UNITS_ATTR}.{adapter_name}."
        saved = checkpoint_key(f"{layer_name}.{UNITS_ATTR}.")
        for rel, tensor in unit.state_dict(keep_vars=True).items():
            targets[saved + rel] = tensor
            to_model[saved + rel] = own + rel
        for sub, spectrum in _spectra(unit):
            factors[saved + sub] = spectrum
    marker = f".modules_to_save.{adapter_name}."
    for key, tensor in model_keys.items():
        if marker in key:  # PEFT translated these keys to the model's before this hook
            targets[key] = tensor
            to_model[key] = key
    if not factors and not any(UNITS_ATTR in k for k in targets):
        raise AdapterCheckpointError(f"the model holds no selora layer of adapter {adapter_name!r}")
    sources = {
        k if k.startswith((PEFT_PREFIX, "selora.")) or k in targets else PEFT_PREFIX + k: v
        for k, v in state_dict.items()
    }
    plan = plan_load(sources, targets, factors, where, owner=f"adapter {adapter_name!r}")
    plan.apply_locations()
    return {to_model[key]: source for key, _, source in plan.copies}
