"""Adapter checkpoints: one safetensors file plus its JSON config.

A checkpoint is a directory holding ``adapter_model.safetensors`` and
``adapter_config.json``.

Tensor keys (``adapter_model.safetensors``):
    A tensor is keyed by its full name in the adapted model, as
    ``model.state_dict()`` spells it: ``"{layer}.adapter.lora_A.coefficients"``
    (``...lora_A.weight`` for a dense factor), ``"{layer}.adapter.magnitude"``
    (DoRA), ``"classifier.weight"`` (a ``modules_to_save`` head). Saved, each in
    its dtype: every parameter and persistent buffer under an
    :class:`AdapterUnit`, under a wrapper (a module with a ``base_layer`` and an
    ``AdapterUnit``) but outside its ``base_layer``, under a ``modules_to_save``
    module or a module selora attached as ``selora_*`` (X-LoRA's classifier),
    and every parameter with ``requires_grad``; never a frozen base weight.
    Each distinct set of spectral locations is stored once, as int32 flat
    indices, under ``"__locations__.{m}x{n}.{k}.{seed}"`` (``.1``, ``.2``, ...
    appended if sets of one key differ).

JSON (``adapter_config.json``):
    ``format`` (``"selora-adapter"``), ``format_version``, ``selora_version``,
    ``torch_version``; ``adapter``: :meth:`SpectralAdapter.to_dict`;
    ``basis_class``: the basis' ``module.QualName`` (``null`` for dense
    factors); ``modules``: adapter-unit name -> ``{"layer", "d_in", "d_out",
    "factors": {"lora_A": {"shape", "n_coeffs", "locations"}, ...}}`` where
    ``locations`` is a tensor key (``null`` for a dense factor);
    ``locations``: tensor key -> ``{"shape": [m, n], "n_coeffs", "seed"}``.

A basis given as an instance is saved by its label (its registered name, or
its class name when unregistered). Loading into a model that holds no adapter
builds the basis by that name, so an unregistered basis must be registered
(:func:`selora.register_basis`) under that name before :func:`load_adapter`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from selora.adapters.config import SpectralAdapter
from selora.adapters.layer import AdapterUnit, DenseFactor
from selora.adapters.model import adapter_config, inject
from selora.spectral_bases import SparseSpectrum, UnknownBasisError, get_basis

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterCheckpointError",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT, FORMAT_VERSION = "selora-adapter", 1
_LOCATIONS = "__locations__."
_INT32_MAX = 2**31 - 1


class AdapterCheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; the model is unchanged."""


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _is_wrapper(module: nn.Module) -> bool:
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and any(isinstance(m, AdapterUnit) for m in module.modules())


def _adapter_state(model: nn.Module, adapter: SpectralAdapter) -> dict[str, Tensor]:
    """Return the tensors a checkpoint holds (see the module docstring), by state-dict key."""
    units, wrappers, kept = [], [], []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, AdapterUnit):
            units.append(prefix)
        elif _is_wrapper(module):
            wrappers.append(prefix)
        leaf = name.rpartition(".")[2]
        if leaf.startswith("selora_") or any(
            name == t or name.endswith("." + t) for t in adapter.modules_to_save
        ):
            kept.append(prefix)
    bases = [f"{w}base_layer." for w in wrappers]
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
        wrapped = _under(key, wrappers) and not _under(key, bases)
        if id(tensor) not in seen and (trainable or wrapped or _under(key, units + kept)):
            seen.add(id(tensor))
            state[key] = tensor
    return state


def _units(model: nn.Module) -> dict[str, tuple[str, AdapterUnit]]:
    """Map each adapter unit's name to (the name of the layer it adapts, the unit)."""
    wrappers: list[str] = []
    units: dict[str, tuple[str, AdapterUnit]] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterUnit):
            owners = [w for w in wrappers if name.startswith(w + ".")]
            units[name] = (max(owners, key=len) if owners else name, module)
        elif _is_wrapper(module):
            wrappers.append(name)
    return units


def _factors(unit: AdapterUnit) -> list[tuple[str, SparseSpectrum | DenseFactor]]:
    return [
        (n, c) for n, c in unit.named_children() if isinstance(c, (SparseSpectrum, DenseFactor))
    ]


def _describe(layer: str, unit: AdapterUnit) -> dict[str, Any]:
    """Return the JSON entry of an adapter unit (its factors without their locations)."""
    factors = {n: {"shape": list(f.shape), "n_coeffs": f.n_coeffs} for n, f in _factors(unit)}
    d_out, d_in = int(unit.lora_B.shape[0]), int(unit.lora_A.shape[1])
    return {"layer": layer, "d_in": d_in, "d_out": d_out, "factors": factors}


def _store_locations(
    spectrum: SparseSpectrum | DenseFactor, tensors: dict[str, Tensor], table: dict[str, Any]
) -> str | None:
    """Add the locations of a spectrum to ``tensors`` once; return their key (None if dense)."""
    if not isinstance(spectrum, SparseSpectrum):
        return None
    (m, n), k = spectrum.shape, spectrum.n_coeffs
    if m * n > _INT32_MAX:
        raise ValueError(f"a {m}x{n} spectrum has flat indices beyond int32")
    indices = spectrum.indices.detach().cpu()
    stem = f"{_LOCATIONS}{m}x{n}.{k}.{spectrum.seed}"
    key, i = stem, 0
    while key in table:
        if torch.equal(tensors[key].long(), indices.long()):
            return key
        i += 1
        key = f"{stem}.{i}"
    tensors[key] = indices.to(torch.int32).contiguous()
    table[key] = {"shape": [m, n], "n_coeffs": k, "seed": spectrum.seed}
    return key


def _write(target: Path, write: Any) -> None:
    """Write through a temporary file and rename it, so no half-written file is left."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save the adapter of ``model`` (not its frozen base weights) to the directory ``path``.

    Writes ``adapter_model.safetensors`` (coefficients, trainable extras, each
    distinct set of spectral locations once as int32) and
    ``adapter_config.json``; the module docstring gives the keys.

    Args:
        model: a model adapted by :func:`selora.inject`.
        path: a directory, created if needed; existing checkpoint files are replaced.

    Raises:
        ValueError: if ``model`` holds no selora adapter, or its ``base_options``
            are not JSON-serialisable.
    """
    from selora import __version__

    adapter = adapter_config(model)
    state = _adapter_state(model, adapter)
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in state.items()}
    modules: dict[str, Any] = {}
    locations: dict[str, Any] = {}
    for name, (layer, unit) in _units(model).items():
        modules[name] = _describe(layer, unit)
        for fname, factor in _factors(unit):
            key = _store_locations(factor, tensors, locations)
            modules[name]["factors"][fname]["locations"] = key
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "selora_version": __version__,
        "torch_version": torch.__version__,
        "adapter": adapter.to_dict(),
        "basis_class": None if adapter.basis is None else _class_path(_basis(adapter)),
        "modules": modules,
        "locations": locations,
    }
    try:
        text = json.dumps(meta, indent=2)
    except TypeError as exc:
        raise ValueError(f"cannot save the adapter config as JSON: {exc}") from None
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "selora": FORMAT}
    _write(directory / WEIGHTS_NAME, lambda f: save_file(tensors, str(f), metadata=metadata))
    _write(directory / CONFIG_NAME, lambda f: f.write_text(text + "\n", encoding="utf-8"))


def _basis(adapter: SpectralAdapter) -> object:
    basis = adapter.basis
    return get_basis(basis) if isinstance(basis, str) else basis


def _adapter_dict(meta: dict[str, Any]) -> dict[str, Any]:
    """The saved adapter description; one saved before ``scale`` existed is ``"paper"``."""
    data = dict(meta["adapter"])
    data.setdefault("scale", "paper")  # FoRA's eq. 3 as written: what it computed
    return data


def _adapter_from(meta: dict[str, Any], where: Path) -> SpectralAdapter:
    data, recorded = _adapter_dict(meta), meta.get("basis_class")
    name = data.get("basis")
    if name is not None:
        try:
            found = _class_path(get_basis(name))
        except UnknownBasisError as exc:
            raise AdapterCheckpointError(
                f"{where}: the adapter's basis {name!r} (class {recorded}) is not registered; "
                f"register it with selora.register_basis({name!r}) before loading. {exc}"
            ) from None
        if recorded is not None and found != recorded:
            raise AdapterCheckpointError(
                f"{where}: basis {name!r} was {recorded} when saved but is {found} now"
            )
    try:
        return SpectralAdapter.from_dict(data)
    except ValueError as exc:
        raise AdapterCheckpointError(f"{where}: invalid adapter config: {exc}") from None


def read_adapter(
    path: str | os.PathLike[str],
) -> tuple[SpectralAdapter, dict[str, Tensor], dict[str, Any]]:
    """Read and check a checkpoint without touching any model.

    Args:
        path: a directory written by :func:`save_adapter`.

    Returns:
        ``(adapter, tensors, metadata)``: the adapter description; every tensor
        of the file on the CPU, keyed as in the module docstring (locations
        included, int32); the parsed JSON config.

    Raises:
        FileNotFoundError: if a checkpoint file is missing (naming it).
        AdapterCheckpointError: naming the file, if it is truncated, corrupt or
            inconsistent, or its basis is not registered.
    """
    config_file, weights_file = Path(path) / CONFIG_NAME, Path(path) / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"no adapter checkpoint file {file}")
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterCheckpointError(f"{config_file} is not a readable JSON file: {exc}") from None
    try:
        tensors: dict[str, Tensor] = load_file(str(weights_file), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterCheckpointError(
            f"{weights_file} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    if not isinstance(meta, dict) or (meta.get("format"), meta.get("format_version")) != (
        FORMAT,
        FORMAT_VERSION,
    ):
        raise AdapterCheckpointError(f"{config_file} is not a {FORMAT} v{FORMAT_VERSION} config")
    try:
        adapter = _adapter_from(meta, config_file)
        for key, info in meta["locations"].items():
            (m, n), k, t = info["shape"], int(info["n_coeffs"]), tensors.get(key)
            if t is None or t.dtype != torch.int32 or tuple(t.shape) != (k,):
                raise AdapterCheckpointError(f"{weights_file}: {key!r} is not an int32 ({k},) set")
            s = t.sort().values
            if k and (s[0] < 0 or s[-1] >= m * n or bool((s[1:] == s[:-1]).any())):
                raise AdapterCheckpointError(
                    f"{weights_file}: {key!r} holds indices out of range or repeated"
                )
        for entry in meta["modules"].values():
            for factor in entry["factors"].values():
                if factor["locations"] is not None and factor["locations"] not in meta["locations"]:
                    raise AdapterCheckpointError(
                        f"{config_file}: unknown locations {factor['locations']!r}"
                    )
    except AdapterCheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterCheckpointError(f"{config_file} is malformed: {exc!r}") from None
    return adapter, tensors, meta


_Snapshot = tuple[list[tuple[nn.Module, dict[str, Any], dict[int, dict[Any, Any]]]], list[Any]]


def _snapshot(model: nn.Module) -> _Snapshot:
    """Record every module's attributes (dict contents included) and requires_grad flags."""
    modules = []
    for module in model.modules():
        attrs = dict(vars(module))
        modules.append(
            (module, attrs, {id(v): dict(v) for v in attrs.values() if isinstance(v, dict)})
        )
    return modules, [(p, p.requires_grad) for p in model.parameters()]


def _restore(snapshot: _Snapshot) -> None:
    """Undo an injection: the same module, parameter and hook objects as before."""
    modules, flags = snapshot
    for module, attrs, contents in modules:
        current = vars(module)
        for key in [k for k in current if k not in attrs]:
            del current[key]
        for key, value in attrs.items():
            current[key] = value
            if isinstance(value, dict):
                value.clear()
                value.update(contents[id(value)])
    for param, flag in flags:
        param.requires_grad_(flag)


def _plan(
    model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], where: Path
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[SparseSpectrum, Tensor]]]:
    """Check everything and return the copies and the location replacements to make."""
    if any(_is_wrapper(m) and getattr(m, "merged", False) is True for m in model.modules()):
        raise AdapterCheckpointError(f"the model's adapter is merged; unmerge() it to load {where}")
    units, saved = _units(model), meta["modules"]
    extra = [entry["layer"] for name, entry in saved.items() if name not in units]
    if extra:
        raise AdapterCheckpointError(f"modules {extra[:5]} of {where} are not adapted in the model")
    relocate: list[tuple[SparseSpectrum, Tensor]] = []
    for name, (layer, unit) in units.items():
        if name not in saved:
            raise AdapterCheckpointError(f"module {layer!r} of the model is missing from {where}")
        entry, mine = saved[name], _describe(layer, unit)
        have, want = (mine["d_out"], mine["d_in"]), (entry["d_out"], entry["d_in"])
        if want != have:
            raise AdapterCheckpointError(
                f"module {layer!r}: {where} holds an adapter for a weight of shape "
                f"(d_out, d_in) = {want}, the model's is {have}"
            )
        theirs = {f: {k: i[k] for k in ("shape", "n_coeffs")} for f, i in entry["factors"].items()}
        if theirs != mine["factors"]:
            raise AdapterCheckpointError(
                f"module {layer!r}: factors {theirs} in {where}, {mine['factors']} in the model"
            )
        for fname, factor in _factors(unit):
            if isinstance(factor, SparseSpectrum):
                key = entry["factors"][fname]["locations"]
                info = meta["locations"].get(key) or {}
                fits = info.get("shape") == list(factor.shape)
                if not fits or info.get("n_coeffs") != factor.n_coeffs:
                    raise AdapterCheckpointError(
                        f"module {layer!r}: the locations {key!r} of {fname} in {where} do not fit"
                    )
                if not torch.equal(tensors[key].long(), factor.indices.cpu().long()):
                    relocate.append((factor, tensors[key]))
    wanted = _adapter_state(model, adapter_config(model))
    present = model.state_dict(keep_vars=True)
    keys = {k for k in tensors if not k.startswith(_LOCATIONS)}
    missing, unknown = sorted(set(wanted) - keys), sorted(keys - set(present))
    if missing or unknown:
        raise AdapterCheckpointError(
            f"{where} does not fit {type(model).__name__}: missing tensors {missing[:5]}, "
            f"tensors the model does not have {unknown[:5]}"
        )
    copies = []
    for key in sorted(keys):
        target, source = present[key], tensors[key]
        if target.shape != source.shape:
            raise AdapterCheckpointError(
                f"module {key.rpartition('.')[0]!r}: tensor {key!r} has shape "
                f"{tuple(source.shape)} in {where} and {tuple(target.shape)} in the model"
            )
        copies.append((target, source))
    return copies, relocate


def load_adapter(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint of :func:`save_adapter` into ``model``, all or nothing.

    A model with no adapter gets one injected from the saved config (the new
    tensors take the saved dtypes, torch's RNG is not advanced); one with an
    adapter must hold the same config. Everything is checked before anything
    changes, and on any error the model is left exactly as it was. Stored
    locations that differ from those regenerated from ``(seed, shape, k)``
    (another NumPy, say) replace them: the checkpoint computes what was saved.

    Args:
        model: the base model the adapter was trained on, bare or adapted.
        path: a directory written by :func:`save_adapter`.

    Returns:
        ``model``, adapted, with the saved tensors.

    Raises:
        FileNotFoundError: if a checkpoint file is missing.
        AdapterCheckpointError: naming the file, if it is unreadable or its
            basis unregistered; naming the module and both shapes, if a shape
            differs; if the model holds another adapter or a merged one.
    """
    adapter, tensors, meta = read_adapter(path)
    where = Path(path)
    current = getattr(model, "selora_adapter", None)
    if isinstance(current, SpectralAdapter):
        recorded = None if current.basis is None else _class_path(_basis(current))
        ours, theirs = json.loads(json.dumps(current.to_dict())), _adapter_dict(meta)
        diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if diff or recorded != meta.get("basis_class"):
            raise AdapterCheckpointError(
                f"{type(model).__name__} holds another adapter than {where} (differs in "
                f"{diff or ['basis_class']}); unload() it or load into the base model"
            )
    snapshot = None if isinstance(current, SpectralAdapter) else _snapshot(model)
    old = {id(m) for m in model.modules()} | {id(p) for p in model.parameters()}
    try:
        if snapshot is not None:
            devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
            with torch.random.fork_rng(devices=devices):
                inject(model, adapter)
        copies, relocate = _plan(model, tensors, meta, where)
    except Exception:
        if snapshot is not None:
            _restore(snapshot)
        raise
    shared: dict[tuple[int, torch.device], Tensor] = {}
    with torch.no_grad():
        for spectrum, indices in relocate:  # a new buffer: the old one is shared (lru_cache)
            device = spectrum.indices.device
            key = (id(indices), device)
            if key not in shared:
                shared[key] = indices.to(device, torch.int64)
            spectrum.set_locations(shared[key])  # and recompute its scale factor
        for target, source in copies:
            if id(target) not in old and target.dtype != source.dtype:
                target.data = source.to(target.device)  # a new factor takes the saved dtype
            else:
                target.copy_(source)
    for module in model.modules():
        if id(module) not in old:
            module.training = model.training
        if isinstance(module, AdapterUnit):
            module.train(module.training)  # drops the factor cache
    return model
