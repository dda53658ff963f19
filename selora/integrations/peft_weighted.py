"""``SeloraModel.add_weighted_adapter``: PEFT's API over :mod:`selora.adapters.weighted`.

The maths (and what is exact) is in :mod:`selora.adapters.weighted`; this
module finds the sources in PEFT's bookkeeping, builds the new
:class:`~selora.integrations.peft.SeloraConfig` and lets PEFT inject it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from selora.adapters.layer import SpectralLayer
from selora.adapters.weighted import (
    _check_type,
    _check_weights,
    check_layers,
    check_sources,
    combined_adapter,
    fill_combined,
    quiet_rank_warning,
)

__all__ = ["add_weighted_adapter"]


def _check_modules_to_save(model: Any, adapters: Sequence[str]) -> None:
    """PEFT's rule: two sources may not both hold a ``modules_to_save`` copy of one module."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            holders = [a for a in adapters if a in module.modules_to_save]
            if len(holders) > 1:
                raise ValueError(
                    f"cannot add weighted adapters that each train the modules_to_save module "
                    f"{name!r} ({holders}); PEFT refuses this too"
                )


def add_weighted_adapter(
    tuner: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "cat",
) -> None:
    """Add ``adapter_name`` to a :class:`~selora.integrations.peft_model.SeloraModel`.

    Args:
        tuner: the ``SeloraModel`` (``peft_model.base_model``).
        adapters: the source adapters.
        weights: one weight each.
        adapter_name: the new adapter's name.
        combination_type: ``"cat"`` or ``"linear"``.

    Raises:
        ValueError: for an unknown or taken name, or what
            :func:`selora.adapters.weighted.check_sources` refuses.
    """
    from selora.integrations.peft import SeloraConfig

    if adapter_name in tuner.peft_config:
        raise ValueError(f"an adapter named {adapter_name!r} exists already; pick another name")
    values = _check_weights(adapters, weights)
    for name in adapters:
        if name not in tuner.peft_config:
            raise ValueError(f"Adapter {name} does not exist (held: {list(tuner.peft_config)})")
    kind = _check_type(combination_type, len(adapters))
    configs = [tuner.peft_config[n] for n in adapters]
    specs = [c.to_spectral_adapter() for c in configs]
    check_sources(specs, list(adapters), kind)
    _check_modules_to_save(tuner.model, adapters)
    layers = [(n, m) for n, m in tuner.model.named_modules() if isinstance(m, SpectralLayer)]
    names = check_layers(layers, list(adapters), kind)
    spec = combined_adapter(specs, kind, names)
    first = configs[0]
    config = SeloraConfig.from_spectral_adapter(
        spec,
        task_type=first.task_type,
        inference_mode=first.inference_mode,
        base_model_name_or_path=first.base_model_name_or_path,
        revision=first.revision,
    )
    config.target_modules = set(names)  # PEFT's form: the matched names
    if first.modules_to_save is not None:
        config.modules_to_save = list(first.modules_to_save)
    tuner.peft_config[adapter_name] = config
    try:
        with quiet_rank_warning():
            tuner.inject_adapter(tuner.model, adapter_name)  # undone whole if it fails
    except BaseException:
        del tuner.peft_config[adapter_name]
        raise
    try:
        fill_combined(
            (m for _, m in tuner.model.named_modules() if isinstance(m, SpectralLayer)),
            adapter_name,
            list(adapters),
            values,
            kind,
        )
    except BaseException:
        if adapter_name in tuner.peft_config:
            tuner.delete_adapter(adapter_name)
        raise
