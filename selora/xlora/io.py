"""X-LoRA checkpoints through selora's front door: :func:`save` and :func:`load`.

The files are those of :mod:`selora.xlora.checkpoint`, the ones PEFT's door
(``PeftModel.save_pretrained`` / ``from_pretrained`` with
:class:`~selora.xlora.peft.XLoRASeloraConfig`) writes and reads too. The
native writer adds PEFT's own config fields with the values PEFT writes, so
either door reads what the other wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from selora.adapters.checkpoint_format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    VERSION_FIELD,
    WEIGHTS_NAME,
    AdapterCheckpointError,
)
from selora.adapters.checkpoint_plan import restore_model, snapshot_model
from selora.adapters.model import inject
from selora.adapters.unit import AdapterUnit
from selora.xlora.checkpoint import (
    PEFT_TYPE,
    checkpoint_tensors,
    config_fields,
    expert_adapters,
    load_plan,
)
from selora.xlora.config import XLoRAConfig
from selora.xlora.model import XLoRAModel

__all__ = ["from_pretrained", "load", "read_config", "save"]

_PEFT_FIELDS: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "revision": None,
    "task_type": None,
}


def _write_atomically(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: XLoRAModel, path: str | os.PathLike[str]) -> None:
    """Save an X-LoRA model's experts and classifier (not the frozen base weights).

    Args:
        model: the X-LoRA model.
        path: a directory, created if needed; existing checkpoint files are replaced.
    """
    config = {**_PEFT_FIELDS, **config_fields(model.xlora_config, model.model)}
    tensors = checkpoint_tensors(model.model, model.xlora_config, model.classifier)
    metadata = {"format": "pt", VERSION_FIELD: str(FORMAT_VERSION)}
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=metadata))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomically(directory / CONFIG_NAME, text.encode("utf-8"))


def read_config(path: str | os.PathLike[str]) -> tuple[XLoRAConfig, dict[str, Any]]:
    """Read and check an X-LoRA checkpoint's ``adapter_config.json``.

    Args:
        path: the checkpoint directory.

    Returns:
        The configuration and the whole JSON object.

    Raises:
        AdapterCheckpointError: for another ``peft_type`` or version, or a bad field.
    """
    file = Path(path) / CONFIG_NAME
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterCheckpointError(f"{file}: cannot read the X-LoRA config: {exc}") from None
    if not isinstance(data, dict) or data.get("peft_type") != PEFT_TYPE:
        got = data.get("peft_type") if isinstance(data, dict) else data
        raise AdapterCheckpointError(f"{file}: peft_type is {got!r}, not {PEFT_TYPE!r}")
    if data.get(VERSION_FIELD) != FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{file}: {VERSION_FIELD} is {data.get(VERSION_FIELD)!r}; this selora reads "
            f"version {FORMAT_VERSION}"
        )
    known = set(XLoRAConfig.__dataclass_fields__) - {"checkpoints"}
    try:
        config = XLoRAConfig.from_dict({k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise AdapterCheckpointError(f"{file}: {exc}") from None
    return config, data


def _inject_experts(model: nn.Module, data: dict[str, Any], where: str) -> None:
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    for name, adapter in expert_adapters(data, where).items():
        with torch.random.fork_rng(devices=devices):  # the checkpoint gives every tensor
            inject(model, adapter, name=name)


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
    directory = Path(path)
    config, data = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist")
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterCheckpointError(
            f"{weights} is not a readable safetensors file: {exc}"
        ) from None
    snapshot = snapshot_model(model)
    try:
        _inject_experts(model, data, str(directory / CONFIG_NAME))
        wrapped = XLoRAModel(model, config)
        plan = load_plan(model, config, wrapped.classifier, tensors, str(weights))
    except AdapterCheckpointError:
        restore_model(snapshot)
        raise
    except (ValueError, TypeError) as exc:
        restore_model(snapshot)
        raise AdapterCheckpointError(
            f"{directory / CONFIG_NAME}: the X-LoRA model does not fit "
            f"{type(model).__name__}: {exc}"
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
