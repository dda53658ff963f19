"""The typed configuration of an X-LoRA model: :class:`XLoRAConfig`.

It says which experts, how the weights :math:`g` are formed
(:mod:`selora.xlora.classifier`), and the classifier's shape.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["XLoRAConfig"]


def _positive_int(value: Any, field: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "None or " if optional else ""
        raise ValueError(f"XLoRAConfig.{field} must be {allowed}an integer >= 1; got {value!r}")


def _flag(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"XLoRAConfig.{field} must be True or False; got {value!r}")


@dataclasses.dataclass(frozen=True)
class XLoRAConfig:
    r"""How an :class:`~selora.xlora.XLoRAModel` mixes its experts.

    Attributes:
        experts: the :math:`K \ge 1` experts, in order: names of adapters the
            model holds (added by :func:`selora.inject` or
            :func:`selora.load_adapter`), or a mapping name -> checkpoint
            directory (selora's format, written by either front door) that
            :class:`~selora.xlora.XLoRAModel` loads under that name. Each expert
            may have its own basis, budget and base (lora, dora, hira). Stored
            as the tuple of names; the paths, if any, in ``checkpoints``.
        checkpoints: name -> checkpoint directory of the experts to load (filled
            from a mapping ``experts``; saved checkpoints hold the experts, so
            it is never written).
        layerwise: one set of :math:`K` weights per adapted layer,
            ``(batch, seq, L, K)``, rather than one ``(batch, seq, K)`` for all.
        temperature: :math:`\tau > 0` of the softmax.
        top_k: keep the ``top_k`` largest weights per token, zero the others
            (``None``: all :math:`K`).
        renormalize: divide the kept weights by their sum (needs the softmax).
        enable_softmax: without it the classifier's raw scores :math:`z` are the weights.
        classifier_depth: the number of linear layers of the MLP (ReLU between).
        classifier_width: the width of its hidden layers (``None``: the hidden size).
        hidden_size: the model's hidden size :math:`H` (``None``: ``model.config.hidden_size``).
        freeze_experts: train only the classifier (X-LoRA's usual recipe); the
            experts' tensors stay bit-identical.

    Raises:
        ValueError: naming the field, for any invalid value.
    """

    experts: Sequence[str] | Mapping[str, str | os.PathLike[str]]
    layerwise: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    renormalize: bool = False
    enable_softmax: bool = True
    classifier_depth: int = 1
    classifier_width: int | None = None
    hidden_size: int | None = None
    freeze_experts: bool = True
    checkpoints: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field; store ``experts`` as names and the paths in ``checkpoints``."""
        experts = self.experts
        paths: dict[str, str] = {k: os.fspath(v) for k, v in dict(self.checkpoints).items()}
        if isinstance(experts, Mapping):
            paths.update({str(k): os.fspath(v) for k, v in experts.items()})
            names = tuple(experts)
        elif isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence):
            raise ValueError(
                "XLoRAConfig.experts must be a list of adapter names or a mapping name -> "
                f"checkpoint directory; got {experts!r}"
            )
        else:
            names = tuple(experts)
        if not names or not all(isinstance(n, str) and n and "." not in n for n in names):
            raise ValueError(
                f"XLoRAConfig.experts must hold at least one adapter name (no '.'); got {names!r}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"XLoRAConfig.experts names an adapter twice: {names!r}")
        unknown = sorted(set(paths) - set(names))
        if unknown:
            raise ValueError(f"XLoRAConfig.checkpoints names no expert: {unknown}")
        object.__setattr__(self, "experts", names)
        object.__setattr__(self, "checkpoints", paths)
        for field in ("layerwise", "renormalize", "enable_softmax", "freeze_experts"):
            _flag(getattr(self, field), field)
        temperature = self.temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not 0 < float(temperature) < float("inf")
        ):
            raise ValueError(
                f"XLoRAConfig.temperature must be a finite number > 0; got {temperature!r}"
            )
        object.__setattr__(self, "temperature", float(temperature))
        _positive_int(self.top_k, "top_k", optional=True)
        if self.top_k is not None and self.top_k > len(names):
            raise ValueError(
                f"XLoRAConfig.top_k must lie in 1..{len(names)} (the experts); got {self.top_k}"
            )
        if self.renormalize and not self.enable_softmax:
            raise ValueError(
                "XLoRAConfig.renormalize needs enable_softmax=True (the weights must be positive)"
            )
        _positive_int(self.classifier_depth, "classifier_depth", optional=False)
        _positive_int(self.classifier_width, "classifier_width", optional=True)
        _positive_int(self.hidden_size, "hidden_size", optional=True)

    @property
    def names(self) -> tuple[str, ...]:
        """The experts' adapter names, in order."""
        return tuple(self.experts)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-serialisable fields, ``experts`` as names (never ``checkpoints``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["experts"] = list(self.names)
        del data["checkpoints"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> XLoRAConfig:
        """Build the config from :meth:`to_dict`'s output; an unknown key raises ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"checkpoints"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"XLoRAConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))
