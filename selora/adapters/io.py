"""Adapter checkpoints through the native front door: ``save_adapter`` / ``load_adapter``.

The format (PEFT's directory layout, version 2) is described in
:mod:`selora.adapters.checkpoint_format`; ``PeftModel.save_pretrained`` writes
the same files and ``PeftModel.from_pretrained`` reads them, so either front
door reads what the other wrote.

Safe to write: each file goes to a temporary file created exclusively in the
target directory (``mkstemp``: unpredictable name, ``O_EXCL``, no symlink
followed), is flushed to disk, then renamed over the old one. Safe to read:
the config's hash must equal the one stored with the tensors (a reader racing
a writer re-reads for up to :data:`CONSISTENCY_TIMEOUT` seconds, so it gets
the old or the new adapter, never a mix); every key, dtype, shape, size and
location set is checked before anything is allocated or written, and any
failure raises :class:`AdapterCheckpointError` and leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from selora.adapters.checkpoint_format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HASH_KEY,
    PEFT_PREFIX,
    UNITS_ATTR,
    VERSION_FIELD,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    config_digest,
    differing_fields,
    digest_tensor,
    full_config,
    spectral_config,
)
from selora.adapters.checkpoint_plan import (
    LoadPlan,
    check_location_set,
    expected_budget,
    location_tensors,
    locations_key,
    override_key,
    plan_load,
    restore_model,
    snapshot_model,
)
from selora.adapters.checkpoint_read import (
    CONSISTENCY_TIMEOUT,
    META_HASH,
    Checkpoint,
    read_adapter,
    read_checkpoint,
)
from selora.adapters.config import SpectralAdapter
from selora.adapters.layer import SpectralLayer
from selora.adapters.layer_types import is_adaptable_layer, weight_shape
from selora.adapters.model import ADAPTERS_ATTR, adapter_config, inject
from selora.adapters.patterns import resolve_for_module
from selora.adapters.unit import AdapterUnit
from selora.spectral_bases import SparseSpectrum

__all__ = [
    "CONFIG_NAME",
    "CONSISTENCY_TIMEOUT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterCheckpointError",
    "Checkpoint",
    "load_adapter",
    "read_adapter",
    "read_checkpoint",
    "save_adapter",
]

# --------------------------------------------------------------------------- what an adapter owns


def _name_matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def unit_tensors(model: nn.Module, name: str) -> Iterator[tuple[str, str, nn.Module]]:
    """Yield ``(layer name, checkpoint prefix, unit)`` per unit of the adapter ``name``.

    The unit's persistent state, keyed from the prefix, is what the checkpoint holds.

    Args:
        model: an adapted model.
        name: the adapter.

    Yields:
        The triples, in module order.
    """
    for layer_name, layer in model.named_modules():
        if isinstance(layer, SpectralLayer) and name in layer.selora_units:
            yield layer_name, f"{PEFT_PREFIX}{layer_name}.{UNITS_ATTR}.", layer.selora_units[name]


def _owned(
    model: nn.Module, name: str, adapter: SpectralAdapter
) -> tuple[dict[str, Tensor], dict[str, SparseSpectrum]]:
    """Return the adapter's tensors and sparse factors, by checkpoint key and stem."""
    tensors: dict[str, Tensor] = {}
    factors: dict[str, SparseSpectrum] = {}
    for _, prefix, unit in unit_tensors(model, name):
        for key, tensor in unit.state_dict(keep_vars=True).items():
            tensors[prefix + key] = tensor
        for sub, module in unit.named_modules():
            if isinstance(module, SparseSpectrum):
                factors[prefix + sub] = module
    modules = [(n, m) for n, m in model.named_modules() if n]
    for wanted in adapter.modules_to_save:
        for module_name, module in modules:
            if _name_matches(module_name, wanted):
                for key, tensor in module.state_dict(keep_vars=True).items():
                    tensors[f"{PEFT_PREFIX}{module_name}.{key}"] = tensor
    return tensors, factors


# --------------------------------------------------------------------------- writing


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through an exclusive temporary file, fsync'd, then renamed.

    The temporary file is created with ``O_EXCL`` under an unpredictable name in
    ``target``'s directory (no symlink followed), so a reader sees the old file
    or the new one, never a part.

    Args:
        target: the file to replace.
        data: its new content.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (the renames) to disk, where the platform allows it.

    Args:
        directory: the checkpoint directory.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_adapter(model: nn.Module, path: str | os.PathLike[str], name: str = "default") -> None:
    """Save the adapter ``name`` of ``model`` (not its frozen base weights) to directory ``path``.

    Writes ``adapter_config.json`` (what ``SeloraConfig.to_dict()`` gives) and
    ``adapter_model.safetensors`` in PEFT's layout
    (:mod:`selora.adapters.checkpoint_format`), so ``PeftModel.from_pretrained``
    reads it too. Each file is written to an exclusive temporary file in
    ``path``, flushed to disk and renamed over the old one; a reader racing
    the save gets the old or the new adapter.

    Args:
        model: a model adapted by :func:`selora.inject`.
        path: a directory, created if needed; existing checkpoint files are replaced.
        name: the adapter to save.

    Raises:
        ValueError: if ``model`` holds no adapter ``name``, or its ``base_options``
            are not JSON-serialisable.
        BasisNotSavableError: if the basis cannot be rebuilt from its declared
            options (a ``ValueError``); nothing is written.
    """
    adapter = adapter_config(model, name)
    owned, factors = _owned(model, name, adapter)
    shapes = sorted({spectrum.shape for spectrum in factors.values()})
    config = full_config(adapter, shapes=shapes)  # refuses an unsavable basis, before any write
    tensors = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in owned.items()}
    tensors.update(location_tensors(factors.items()))
    digest = config_digest(config)
    tensors[HASH_KEY] = digest_tensor(digest)
    metadata = {"format": "pt", VERSION_FIELD: str(FORMAT_VERSION), META_HASH: digest.hex()}
    weights = safetensors_bytes(tensors, metadata=metadata)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_NAME, weights)
    write_atomically(directory / CONFIG_NAME, text.encode("utf-8"))
    fsync_directory(directory)


# --------------------------------------------------------------------------- loading


def _fit_modules_to_save(adapter: SpectralAdapter, model: nn.Module) -> SpectralAdapter:
    """Drop the ``modules_to_save`` entries no module of ``model`` matches.

    PEFT adds ``classifier`` and ``score`` to a sequence-classification config
    whatever the model, and ignores the ones that match nothing; so does loading.
    """
    names = [n for n, _ in model.named_modules() if n]
    kept = tuple(w for w in adapter.modules_to_save if any(_name_matches(n, w) for n in names))
    if kept == tuple(adapter.modules_to_save):
        return adapter
    return dataclasses.replace(adapter, modules_to_save=kept)


def _precheck(model: nn.Module, checkpoint: Checkpoint, adapter: SpectralAdapter) -> None:
    """Check every unit's sizes against its layer before anything is built.

    Each layer the checkpoint names must exist and be adaptable; its factors'
    shapes ``(r, d_in)`` and ``(d_out, r)``, the budget ``k`` and the basis'
    shape rules give the size of every coefficient tensor and location set,
    which must be what the file holds. So a config asking for a huge ``r`` or
    a file not made for this model fails here, with nothing allocated.
    """
    where = checkpoint.weights_file
    marker = f".{UNITS_ATTR}."
    by_layer: dict[str, dict[str, Tensor]] = {}
    for key, tensor in checkpoint.tensors.items():
        if key.startswith(PEFT_PREFIX) and marker in key:
            layer, _, rel = key[len(PEFT_PREFIX) :].partition(marker)
            by_layer.setdefault(layer, {})[rel] = tensor
    if not by_layer:
        raise AdapterCheckpointError(f"{where} holds no adapter unit tensors")
    sparse = adapter.basis is not None
    for layer, rels in by_layer.items():
        try:
            spec = resolve_for_module(adapter, layer)  # this module's r and budget
        except ValueError as exc:
            raise AdapterCheckpointError(f"{where}: {exc}") from None
        r = spec.r
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise AdapterCheckpointError(
                f"{where}: module {layer!r} of the checkpoint is not in {type(model).__name__}"
            ) from None
        if isinstance(module, SpectralLayer):
            d_out, d_in = module.out_features, module.in_features
        elif is_adaptable_layer(module):
            d_out, d_in = weight_shape(module)  # a quantized weight is stored packed
        else:
            raise AdapterCheckpointError(
                f"{where}: module {layer!r} is a {type(module).__name__}, not a layer selora adapts"
            )
        for fname, shape in (("lora_A", (r, d_in)), ("lora_B", (d_out, r))):
            stem = f"{PEFT_PREFIX}{layer}{marker}{fname}"
            k = expected_budget(spec, shape, f"{where}: module {layer!r}, {fname}")
            rel, want = (f"{fname}.coefficients", (k,)) if sparse else (f"{fname}.weight", shape)
            key = f"{stem}.{rel.partition('.')[2]}"
            found = rels.get(rel)
            if found is None:
                raise AdapterCheckpointError(
                    f"{where}: tensor {key!r} of module {layer!r} is missing"
                )
            if tuple(found.shape) != tuple(want) or not found.is_floating_point():
                raise AdapterCheckpointError(
                    f"{where}: tensor {key!r} (module {layer!r}) is {found.dtype} "
                    f"{tuple(found.shape)}; r={r} on this {d_out}x{d_in} layer needs a floating "
                    f"{tuple(want)} tensor"
                )
            if sparse:
                location = override_key(stem)
                if location not in checkpoint.tensors:
                    location = locations_key(shape, k)
                stored = checkpoint.tensors.get(location)
                if stored is None:
                    raise AdapterCheckpointError(
                        f"{where}: no location set {location!r} for {fname} of module {layer!r} "
                        f"(r={r}: a {shape[0]}x{shape[1]} factor with {k} coefficients)"
                    )
                check_location_set(stored, shape, k, f"{where}: {location!r}")


def _refuse_merged(model: nn.Module, name: str, where: str) -> None:
    for layer_name, layer in model.named_modules():
        if isinstance(layer, SpectralLayer) and name in layer.merged_adapters:
            raise AdapterCheckpointError(
                f"{layer_name}: adapter {name!r} is merged into the frozen weight; unmerge it "
                f"to load {where} (the merged weight would keep the old update)"
            )


def _apply(model: nn.Module, plan: LoadPlan) -> None:
    plan.apply_locations()
    plan.apply_copies()
    for module in model.modules():
        if isinstance(module, AdapterUnit):
            module.train(module.training)  # drops the factor cache


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], name: str = "default"
) -> nn.Module:
    """Load a checkpoint as the adapter ``name`` of ``model``, all or nothing.

    Reads what :func:`save_adapter` and ``PeftModel.save_pretrained`` write. A
    model without the adapter ``name`` gets it injected from the saved config
    (torch's RNG is not advanced); one holding it must hold the same config.
    The stored locations replace the generated ones, so the checkpoint
    computes what was saved on any torch or NumPy. Tensors are copied into the
    model's (in the model's dtype). Everything is checked first (see
    :func:`read_checkpoint`, and the sizes, keys, dtypes, shapes and location
    sets against the model); on any failure the model is left exactly as it
    was (state, modules, ``requires_grad`` flags, adapters).

    Args:
        model: the base model the adapter was trained on, bare or adapted.
        path: a checkpoint directory.
        name: the adapter's name in ``model``.

    Returns:
        ``model``, holding the adapter with the saved tensors.

    Raises:
        FileNotFoundError: if a checkpoint file is missing.
        AdapterCheckpointError: naming the file, key or module, for anything
            that does not fit; the model is unchanged.
    """
    checkpoint = read_checkpoint(path)
    where = checkpoint.weights_file
    adapter = _fit_modules_to_save(checkpoint.adapter, model)
    registry = model.__dict__.get(ADAPTERS_ATTR)
    existing = registry.get(name) if isinstance(registry, dict) else None
    if existing is not None:
        diff = [
            f
            for f in differing_fields(spectral_config(existing), spectral_config(adapter))
            if f not in ("target_modules", "exclude_modules", "modules_to_save")
        ]
        if diff:
            raise AdapterCheckpointError(
                f"{type(model).__name__} holds another adapter {name!r} than {checkpoint.path} "
                f"(differs in {diff}); delete_adapter() it, or load under another name"
            )
        _refuse_merged(model, name, str(checkpoint.path))
        _apply(
            model,
            plan_load(
                checkpoint.tensors, *_owned(model, name, existing), where, owner=f"adapter {name!r}"
            ),
        )
        return model
    _precheck(model, checkpoint, adapter)
    snapshot = snapshot_model(model)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            inject(model, adapter, name=name)
        plan = plan_load(
            checkpoint.tensors, *_owned(model, name, adapter), where, owner=f"adapter {name!r}"
        )
    except AdapterCheckpointError:
        restore_model(snapshot)
        raise
    except (ValueError, TypeError) as exc:
        restore_model(snapshot)
        raise AdapterCheckpointError(
            f"{checkpoint.config_file}: the adapter does not fit {type(model).__name__}: {exc}"
        ) from exc
    except BaseException:
        restore_model(snapshot)
        raise
    _apply(model, plan)
    return model
