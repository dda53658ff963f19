"""Checking a checkpoint's tensors against the model's, before anything is written.

Both front doors (:func:`selora.load_adapter` and the PEFT hook
:func:`selora.integrations.peft_checkpoint.remap_adapter_state_dict_for_load`)
describe the model's side as checkpoint key -> model tensor, and each sparse
factor by its checkpoint stem; :func:`plan_load` checks every key, dtype,
shape and location set and returns a :class:`LoadPlan` that nothing can make
fail half way. Also here: how each distinct location set is stored once
(:func:`location_tensors`), and :func:`snapshot_model` / :func:`restore_model`,
which undo an injection a failed load made.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from selora.adapters.checkpoint_format import (
    HASH_KEY,
    LOCATIONS_PREFIX,
    LOCATIONS_SUFFIX,
    PEFT_PREFIX,
    UNITS_ATTR,
    AdapterCheckpointError,
)
from selora.adapters.config import SpectralAdapter
from selora.spectral_bases import SparseSpectrum, coefficient_budget, get_basis

__all__ = [
    "LoadPlan",
    "ModelSnapshot",
    "check_location_set",
    "expected_budget",
    "location_tensors",
    "locations_key",
    "override_key",
    "plan_load",
    "restore_model",
    "snapshot_model",
]

_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- locations


def locations_key(shape: tuple[int, int], k: int) -> str:
    """The key of the location set shared by the ``(m, n)`` factors with ``k`` coefficients."""
    return f"{LOCATIONS_PREFIX}{int(shape[0])}x{int(shape[1])}.{int(k)}"


def override_key(stem: str) -> str:
    """The key of a factor's own location set; ``stem`` is the factor's key prefix.

    ``base_model.model.q.selora_units.lora_A`` gives ``...selora_units.lora_A.locations``.
    """
    return stem + LOCATIONS_SUFFIX


def location_tensors(factors: Iterable[tuple[str, SparseSpectrum]]) -> dict[str, Tensor]:
    """Store every distinct location set once (int32), keyed as the module docstring says.

    Per ``(m, n, k)`` the set most factors hold is the shared one
    (:func:`locations_key`); a factor holding another gets an override
    (:func:`override_key` of its stem).

    Args:
        factors: ``(stem, spectrum)`` pairs; the stem is the factor's key
            prefix in the checkpoint.

    Returns:
        The location tensors by key, on the CPU.

    Raises:
        ValueError: if a spectrum has flat indices beyond int32.
    """
    groups: dict[tuple[int, int, int], list[tuple[str, Tensor]]] = {}
    for stem, spectrum in factors:
        (m, n), k = spectrum.shape, spectrum.n_coeffs
        if m * n > _INT32_MAX:
            raise ValueError(f"{stem}: a {m}x{n} spectrum has flat indices beyond int32")
        indices = spectrum.indices.detach().to("cpu", torch.int32).contiguous()
        groups.setdefault((m, n, k), []).append((stem, indices))
    out: dict[str, Tensor] = {}
    for (m, n, k), members in groups.items():
        counts = Counter(t.numpy().tobytes() for _, t in members)
        shared_bytes = counts.most_common(1)[0][0]
        shared = next(t for _, t in members if t.numpy().tobytes() == shared_bytes)
        out[locations_key((m, n), k)] = shared.clone()
        for stem, indices in members:
            if indices.numpy().tobytes() != shared_bytes:
                out[override_key(stem)] = indices.clone()
    return out


def check_location_set(tensor: Tensor, shape: tuple[int, int], k: int, where: str) -> None:
    """Check a stored location set: int32, ``(k,)``, in ``[0, m n)``, no repeats.

    Raises:
        AdapterCheckpointError: naming ``where`` (the file and key).
    """
    m, n = shape
    if tensor.dtype != torch.int32 or tensor.ndim != 1 or tensor.numel() != k:
        raise AdapterCheckpointError(
            f"{where}: a location set of a {m}x{n} factor with {k} coefficients must be an "
            f"int32 ({k},) tensor; got {tensor.dtype} {tuple(tensor.shape)}"
        )
    if k == 0:
        return
    ordered = tensor.to(torch.int64).sort().values
    if int(ordered[0]) < 0 or int(ordered[-1]) >= m * n:
        raise AdapterCheckpointError(
            f"{where}: location indices must lie in [0, {m * n}) for a {m}x{n} factor; got "
            f"[{int(ordered[0])}, {int(ordered[-1])}]"
        )
    if bool((ordered[1:] == ordered[:-1]).any()):
        raise AdapterCheckpointError(f"{where}: the location set repeats an index")


def expected_budget(adapter: SpectralAdapter, shape: tuple[int, int], where: str) -> int:
    """Return ``k`` of an ``(m, n)`` factor of ``adapter`` (``m n`` if dense), by arithmetic.

    Nothing is allocated: a checkpoint's requested sizes are checked before any unit is built.

    Raises:
        AdapterCheckpointError: naming ``where``, if the budget does not fit or
            the basis refuses the shape.
    """
    m, n = shape
    if adapter.basis is None:
        return m * n
    try:
        basis = get_basis(adapter.basis) if isinstance(adapter.basis, str) else adapter.basis
        basis.check_shape(m, n)
        return coefficient_budget(
            (m, n), sparse_ratio=adapter.sparse_ratio, n_coeffs=adapter.n_coeffs
        )
    except ValueError as exc:
        raise AdapterCheckpointError(f"{where}: a ({m}, {n}) factor does not fit: {exc}") from None


@dataclass
class LoadPlan:
    """What loading a checked checkpoint does: copies and location replacements.

    Attributes:
        copies: ``(checkpoint key, model tensor, saved tensor)``, shapes and
            dtypes checked.
        relocations: ``(spectrum, location key, int32 set)`` for every sparse
            factor whose stored locations differ from its current ones.
        location_keys: every location key the checkpoint holds (all used).
    """

    copies: list[tuple[str, Tensor, Tensor]] = field(default_factory=list)
    relocations: list[tuple[SparseSpectrum, str, Tensor]] = field(default_factory=list)
    location_keys: set[str] = field(default_factory=set)

    @torch.no_grad()
    def apply_locations(self) -> None:
        """Give each factor its stored locations (one shared tensor per set and device)."""
        shared: dict[tuple[str, torch.device], Tensor] = {}
        for spectrum, key, indices in self.relocations:
            device = spectrum.coefficients.device
            if device.type == "meta":  # built on the meta device (PEFT's low_cpu_mem_usage)
                device = torch.device("cpu")
            cached = shared.get((key, device))
            if cached is None:
                cached = indices.to(device=device, dtype=torch.int64)
                shared[(key, device)] = cached
            if spectrum.coefficients.is_meta:
                spectrum.indices = cached  # kept by value when the unit is moved (_apply)
            else:
                spectrum.set_locations(cached)  # and recompute its scale factor

    @torch.no_grad()
    def apply_copies(self) -> None:
        """Copy every saved tensor into its model tensor (cast to the model tensor's dtype)."""
        for _, target, source in self.copies:
            target.copy_(source)


def _module_of(key: str) -> str:
    return key.rpartition(".")[0] or key


def _check_tensor(key: str, target: Tensor, source: Tensor, where: str) -> None:
    if target.is_floating_point():
        if not source.is_floating_point():
            raise AdapterCheckpointError(
                f"{where}: tensor {key!r} (module {_module_of(key)!r}) is {source.dtype}; "
                f"the model's is {target.dtype}: coefficients, magnitudes and weights must be "
                "floating point"
            )
    elif source.dtype != target.dtype:
        raise AdapterCheckpointError(
            f"{where}: tensor {key!r} (module {_module_of(key)!r}) is {source.dtype}; the "
            f"model's is {target.dtype}"
        )
    if tuple(source.shape) != tuple(target.shape):
        raise AdapterCheckpointError(
            f"{where}: tensor {key!r} (module {_module_of(key)!r}) has shape "
            f"{tuple(source.shape)}; the model's is {tuple(target.shape)}"
        )


def plan_load(
    tensors: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    factors: Mapping[str, SparseSpectrum],
    where: str,
    *,
    owner: str,
) -> LoadPlan:
    """Check a checkpoint's tensors against the model and return what loading them does.

    Checked, in this order, raising at the first failure: every key is a
    target, a location key used by a factor, or the config hash (anything
    else, a base weight say, is refused and named); every target is present;
    every tensor's dtype (floating where the model's is; an int or bool
    coefficient is refused) and shape; every factor's location set (its
    override, else the shared set of its ``(m, n, k)``) is present, int32, of
    length ``k``, in range and without repeats; no location key is left unused.

    Args:
        tensors: the checkpoint's tensors by checkpoint key.
        targets: checkpoint key -> the model tensor it loads into (every
            tensor the adapter owns in the model; all are required).
        factors: checkpoint stem (``...selora_units.lora_A``) -> the sparse factor.
        where: the file (or checkpoint) for messages.
        owner: what the targets are, for the message about a foreign key
            (``"adapter 'default'"``).

    Returns:
        The :class:`LoadPlan`.

    Raises:
        AdapterCheckpointError: naming ``where``, the key and the module.
    """
    overrides = {override_key(stem): stem for stem in factors}
    for key in tensors:
        if key == HASH_KEY or key in targets or key in overrides:
            continue
        if key.startswith(LOCATIONS_PREFIX):
            continue
        layer, marker, _ = key.removeprefix(PEFT_PREFIX).partition(f".{UNITS_ATTR}.")
        if marker:
            raise AdapterCheckpointError(
                f"{where}: tensor {key!r} is a unit of module {layer!r}, which {owner} does not "
                "adapt (not in its target_modules?); nothing was changed"
            )
        raise AdapterCheckpointError(
            f"{where}: tensor {key!r} (module {_module_of(key)!r}) belongs to no unit of "
            f"{owner} and no modules_to_save module; only "
            "adapter tensors are loaded (is it a base model weight?), nothing was changed"
        )
    missing = [key for key in targets if key not in tensors]
    if missing:
        raise AdapterCheckpointError(
            f"{where}: tensor {missing[0]!r} (module {_module_of(missing[0])!r}) of {owner} is "
            f"missing ({len(missing)} missing: {missing[:5]})"
        )
    plan = LoadPlan()
    for key, target in targets.items():
        source = tensors[key]
        _check_tensor(key, target, source, where)
        plan.copies.append((key, target, source))
    used: set[str] = set()
    for stem, spectrum in factors.items():
        (m, n), k = spectrum.shape, spectrum.n_coeffs
        key = override_key(stem)
        if key not in tensors:
            key = locations_key((m, n), k)
        stored = tensors.get(key)
        if stored is None:
            raise AdapterCheckpointError(
                f"{where}: no location set for factor {stem!r} ({m}x{n}, {k} coefficients): "
                f"neither {key!r} nor {override_key(stem)!r}"
            )
        if key not in used:
            check_location_set(stored, (m, n), k, f"{where}: {key!r}")
            used.add(key)
        current = spectrum.indices
        if current.is_meta or not torch.equal(current.detach().cpu(), stored.to(torch.int64)):
            plan.relocations.append((spectrum, key, stored))
    unused = sorted(
        key
        for key in tensors
        if (key.startswith(LOCATIONS_PREFIX) or key in overrides) and key not in used
    )
    if unused:
        raise AdapterCheckpointError(
            f"{where}: location set {unused[0]!r} belongs to no factor of {owner} "
            "(a shape the model's layers do not have)"
        )
    plan.location_keys = used
    return plan


ModelSnapshot = tuple[
    list[tuple[nn.Module, dict[str, Any], dict[int, Any]]], list[tuple[nn.Parameter, bool]]
]


def snapshot_model(model: nn.Module) -> ModelSnapshot:
    """Record every module's attributes (dict and list contents too) and requires_grad flags.

    :func:`restore_model` then undoes whatever an injection did: replaced
    children, new attributes, registries and hooks, frozen or unfrozen
    parameters (the tensors' values are not recorded: nothing is copied
    before every check passed).
    """
    modules = []
    for module in model.modules():
        attrs = dict(vars(module))
        contents: dict[int, Any] = {}
        for value in attrs.values():
            if isinstance(value, dict):
                contents[id(value)] = dict(value)
            elif isinstance(value, list):
                contents[id(value)] = list(value)
        modules.append((module, attrs, contents))
    return modules, [(p, p.requires_grad) for p in model.parameters()]


def restore_model(snapshot: ModelSnapshot) -> None:
    """Undo an injection: the same modules, parameters, hooks and flags as before."""
    modules, flags = snapshot
    for module, attrs, contents in modules:
        current = vars(module)
        for key in [k for k in current if k not in attrs]:
            del current[key]
        for key, value in attrs.items():
            current[key] = value
            saved = contents.get(id(value))
            if isinstance(value, dict) and isinstance(saved, dict):
                value.clear()
                value.update(saved)
            elif isinstance(value, list) and isinstance(saved, list):
                value[:] = saved
    for param, flag in flags:
        param.requires_grad_(flag)
