"""Reading a checkpoint from disk, on its own: files, format version, config, basis, hash.

A reader racing a writer (:func:`selora.save_adapter` renames the tensors,
then the config) may read one file of each save; the config's hash then
differs from the one stored with the tensors, and both are read again until
they agree (at most :data:`CONSISTENCY_TIMEOUT` seconds), so a load gets the
old or the new adapter, never a mix.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from selora.adapters.checkpoint_format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HASH_KEY,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    AdapterCheckpointError,
    adapter_from_config,
    check_config_keys,
    config_digest,
    tensor_digest,
)
from selora.adapters.config import SpectralAdapter

__all__ = ["CONSISTENCY_TIMEOUT", "META_HASH", "Checkpoint", "read_adapter", "read_checkpoint"]

CONSISTENCY_TIMEOUT = 2.0
"""Seconds a reader keeps re-reading a checkpoint whose config and tensors disagree."""

META_HASH = "selora_config_sha256"
"""The safetensors metadata key of the config hash (hex), written by the native writer."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked on its own (no model involved).

    Attributes:
        path: the directory.
        config: the parsed ``adapter_config.json`` (every field present).
        adapter: the adapter it describes (basis rebuilt).
        tensors: every tensor of ``adapter_model.safetensors`` on the CPU, by
            key (locations and the config hash included), keys without PEFT's
            prefix given it.
    """

    path: Path
    config: dict[str, Any]
    adapter: SpectralAdapter
    tensors: dict[str, Tensor]

    @property
    def config_file(self) -> str:
        """The config file, for messages."""
        return str(self.path / CONFIG_NAME)

    @property
    def weights_file(self) -> str:
        """The tensors file, for messages."""
        return str(self.path / WEIGHTS_NAME)


def read_config_file(file: Path) -> object:
    """Parse a checkpoint's ``adapter_config.json``.

    Args:
        file: the JSON file.

    Returns:
        The parsed JSON value (checked by the caller).

    Raises:
        AdapterCheckpointError: naming the file, if it cannot be read or parsed.
    """
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterCheckpointError(f"{file} is not a readable JSON file: {exc}") from None


def read_tensors_file(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read every tensor of a checkpoint's safetensors file, and its metadata, on the CPU.

    Args:
        file: the ``adapter_model.safetensors`` file.

    Returns:
        ``(tensors, metadata)``; keys carry PEFT's ``base_model.model.`` prefix
        (added where transformers' own writer left it out).

    Raises:
        AdapterCheckpointError: naming the file, if it is truncated or corrupt.
    """
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterCheckpointError(
            f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    # transformers' own adapter writer leaves PEFT's prefix out
    prefixed = {
        key if key.startswith((PEFT_PREFIX, "selora.")) else PEFT_PREFIX + key: tensor
        for key, tensor in tensors.items()
    }
    return prefixed, metadata


def _stored_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], where: str) -> bytes:
    stored = tensors.get(HASH_KEY)
    if stored is None:
        raise AdapterCheckpointError(
            f"{where} holds no {HASH_KEY!r}: not written in selora's checkpoint format "
            f"version {FORMAT_VERSION}, so its tensors cannot be matched to its config"
        )
    digest = tensor_digest(stored, where)
    recorded = metadata.get(META_HASH)
    if recorded is not None and recorded != digest.hex():
        raise AdapterCheckpointError(
            f"{where}: the config hash in the safetensors metadata ({recorded}) differs from "
            f"the tensor {HASH_KEY!r} ({digest.hex()}): the file was edited"
        )
    return digest


def read_checkpoint(path: str | os.PathLike[str], *, timeout: float | None = None) -> Checkpoint:
    """Read and check a checkpoint on its own: files, version, config, basis, hash.

    If the config's hash differs from the tensors' (a save in progress
    between the two renames), both files are read again until they agree or
    ``timeout`` seconds have passed.

    Args:
        path: a checkpoint directory.
        timeout: how long to wait for a consistent pair, in seconds
            (:data:`CONSISTENCY_TIMEOUT` if ``None``).

    Returns:
        The :class:`Checkpoint`.

    Raises:
        FileNotFoundError: if a checkpoint file is missing (naming it).
        AdapterCheckpointError: naming the file, if it is unreadable, of another
            format version, lacks a field, names an unregistered basis, or its
            config and tensors disagree.
    """
    directory = Path(path)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"no adapter checkpoint file {file}")
    deadline = time.monotonic() + (CONSISTENCY_TIMEOUT if timeout is None else timeout)
    while True:
        config = check_config_keys(read_config_file(config_file), str(config_file))
        tensors, metadata = read_tensors_file(weights_file)
        if config_digest(config) == _stored_digest(tensors, metadata, str(weights_file)):
            break
        if time.monotonic() >= deadline:
            raise AdapterCheckpointError(
                f"{config_file} and {weights_file} disagree: the tensors were saved with "
                "another config (a torn or interrupted save, or an edited config); "
                "nothing was loaded"
            )
        time.sleep(0.02)
    adapter = adapter_from_config(config, str(config_file))
    return Checkpoint(directory, config, adapter, tensors)


def read_adapter(
    path: str | os.PathLike[str],
) -> tuple[SpectralAdapter, dict[str, Tensor], dict[str, Any]]:
    """Read and check a checkpoint without touching any model.

    Args:
        path: a directory written by :func:`save_adapter` or ``save_pretrained``.

    Returns:
        ``(adapter, tensors, config)``: the adapter description; every tensor
        of the file on the CPU by key (locations and the config hash included);
        the parsed JSON config.

    Raises:
        FileNotFoundError: if a checkpoint file is missing (naming it).
        AdapterCheckpointError: see :func:`read_checkpoint`.
    """
    checkpoint = read_checkpoint(path)
    return checkpoint.adapter, checkpoint.tensors, checkpoint.config
