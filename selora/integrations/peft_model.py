"""The PEFT tuner of the bridge: :class:`SeloraModel` puts selora's one layer into a model.

Created by PEFT (``get_peft_model``, ``PeftModel.from_pretrained``,
``add_adapter``), not directly. Every targeted layer becomes a
:class:`~selora.integrations.peft_layer.SeloraLinear` (selora's
:class:`~selora.SpectralLayer`), so the maths, merging and mixed batches are
those of :func:`selora.inject`; this module only adapts PEFT's tuner hooks.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import Tensor, nn

from selora.adapters.checkpoint_format import PEFT_PREFIX
from selora.adapters.checkpoint_plan import restore_model, snapshot_model
from selora.adapters.factor_batch import formed_factors, spectra_to_batch
from selora.adapters.layer_types import (
    frozen_weight,
    is_adaptable_layer,
    is_unsupported_quantized_layer,
    quantized_layer_error,
)
from selora.adapters.routing import check_adapter_names, routed
from selora.integrations.peft_layer import UNITS_ATTR, SeloraLayer, SeloraLinear

__all__ = ["PREFIX", "SeloraModel"]

PREFIX = "selora_"
"""The method's unique PEFT prefix; every adapter attribute of a layer starts with it."""


def take_embedding_weights(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove from ``tensors`` the base weights of adapted embeddings; return them by model key.

    PEFT's ``save_pretrained`` (``save_embedding_layers="auto"``) writes a
    targeted ``embed_tokens``' frozen table as ``<layer>.base_layer.weight``, as
    for LoRA. It is taken out before the adapter's tensors are checked, and
    loaded back as PEFT's LoRA does (:meth:`SeloraModel._remap_adapter_state_dict_for_load`).

    Args:
        model: the model loaded into.
        tensors: checkpoint key -> tensor (changed in place).

    Returns:
        ``<layer>.base_layer.weight`` keys of ``model`` -> the saved tables.
    """
    taken: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SeloraLinear):
            continue
        if not isinstance(module.get_base_layer(), nn.Embedding):
            continue
        bare = name.removeprefix(PEFT_PREFIX)
        for key in (f"{PEFT_PREFIX}{bare}.base_layer.weight", f"{bare}.base_layer.weight"):
            if key in tensors:
                taken[f"{name}.base_layer.weight"] = tensors.pop(key)
    return taken


def _lora_default_targets() -> dict[str, list[str]]:
    """PEFT's LoRA default targets per model type, read when asked (never a stale copy)."""
    from peft.utils import constants

    table = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    return {model_type: list(names) for model_type, names in table.items()}


def _adapter_names_hook(
    names: list[str], module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs["adapter_names"] = names
    return args, kwargs


CHECKPOINT_DIR_ATTR = "selora_checkpoint_dir"
"""Set by ``SeloraConfig.from_pretrained`` on the config it reads (not saved)."""


def _check_checkpoint(model: nn.Module, config: Any, adapter_name: str, source: str) -> None:
    """Check ``source``'s tensors against the freshly injected adapter; apply its locations.

    The same checks as PEFT's loading hook
    (:func:`selora.integrations.peft_checkpoint.remap_adapter_state_dict_for_load`),
    on the file as written: ``modules_to_save`` keys are first mapped to their
    copies as PEFT maps them.

    Raises:
        AdapterCheckpointError: naming the file and the key or module.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper
    from safetensors.torch import load_file

    from selora.adapters.checkpoint_format import AdapterCheckpointError
    from selora.integrations.peft_checkpoint import remap_adapter_state_dict_for_load

    file = os.path.join(source, "adapter_model.safetensors")
    if not os.path.isfile(file):
        return  # a .bin or a Hub checkpoint: PEFT's loading hook checks it
    try:
        tensors: dict[str, Tensor] = load_file(file, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterCheckpointError(f"{file} is not a readable safetensors file: {exc}") from None
    take_embedding_weights(model, tensors)  # PEFT's saved embedding tables: not adapter tensors
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            wrapper: Any = module  # PEFT's method is unannotated
            for saved, loaded in wrapper.adapter_state_dict_load_map(adapter_name).items():
                key = f"{prefix}{name}.{saved}"
                if key in tensors:
                    tensors[f"{name}.{loaded}"] = tensors.pop(key)
    try:
        remap_adapter_state_dict_for_load(model, config, adapter_name, tensors)
    except AdapterCheckpointError as exc:
        raise AdapterCheckpointError(f"{file}: {exc}") from None


class SeloraModel(BaseTuner):
    """PEFT tuner that injects :class:`~selora.integrations.peft_layer.SeloraLinear` layers.

    Attributes:
        prefix: PEFT's method prefix, ``"selora_"``.
        tuner_layer_cls: :class:`~selora.integrations.peft_layer.SeloraLayer`.
    """

    prefix: str = PREFIX
    tuner_layer_cls = SeloraLayer

    @property
    def target_module_mapping(self) -> dict[str, list[str]]:  # type: ignore[override]
        """Default targets per model type: PEFT's LoRA table as it is now."""
        return _lora_default_targets()

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any
    ) -> None:
        """PEFT's injection, undone completely if it fails midway (as :func:`selora.inject`).

        A config read from a checkpoint directory (``SeloraConfig.from_pretrained``,
        which every loader uses: ``PeftModel.from_pretrained``, ``load_adapter``,
        transformers' ``model.load_adapter``) has that checkpoint checked right
        here, before any tensor is loaded, and its stored locations applied
        (:func:`_check_checkpoint`): transformers' own loader never calls PEFT's
        loading hook, and a refused checkpoint must leave the model unwrapped.

        Args:
            model: the model to adapt.
            adapter_name: the adapter's name.
            *args: PEFT's further arguments.
            **kwargs: PEFT's further keyword arguments.
        """
        snapshot = snapshot_model(model)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            source = self.peft_config[adapter_name].__dict__.get(CHECKPOINT_DIR_ATTR)
            if source is not None:
                _check_checkpoint(model, self.peft_config[adapter_name], adapter_name, source)
        except BaseException:
            restore_model(snapshot)
            raise

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        """Wrap ``target`` (or add an adapter to it if it is a selora layer already).

        Args:
            peft_config: the adapter's :class:`SeloraConfig`.
            adapter_name: its name.
            target: the matched module.
            target_name: its attribute name on ``parent``.
            parent: the module holding it.
            current_key: its full name.
            parameter_name: set when PEFT targets an ``nn.Parameter`` (unsupported).

        Raises:
            TypeError: if the matched module is neither a supported layer nor a
                selora layer, or is quantized in a form selora does not adapt (the
                message names the module).
            ValueError: if the budget does not fit the layer (naming it).
        """
        if getattr(peft_config, "peft_type", None) != "SELORA":
            raise TypeError(f"expected a SeloraConfig; got {type(peft_config).__name__}")
        if parameter_name is not None:
            raise TypeError("the selora PEFT bridge adapts modules, not parameters")
        try:
            if isinstance(target, SeloraLinear):
                target.update_layer(adapter_name, peft_config)
                return
            if is_unsupported_quantized_layer(target):
                raise quantized_layer_error(target, current_key)
            if isinstance(target, BaseTunerLayer) or not is_adaptable_layer(target):
                raise TypeError(
                    f"target {current_key!r} is a {type(target).__name__}; the selora PEFT "
                    "bridge adapts nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d "
                    "and nn.Conv2d (narrow target_modules)"
                )
            config: Any = peft_config  # a SeloraConfig (checked above)
            new_module = SeloraLinear(target, adapter_name, config, name=current_key)
        except ValueError as exc:
            raise ValueError(f"cannot adapt {current_key!r}: {exc}") from exc
        # A new nn.Module starts in training mode; take the mode of the layer it replaces, so
        # that an adapter added to a model in eval() is in eval too (no dropout, mixed batches).
        new_module.train(target.training)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Give the adapter the dtype PEFT's ``autocast_adapter_dtype`` asks for.

        selora builds its units in float32 (float64 for a float64 layer) unless
        the config says ``autocast_adapter_dtype=False``; PEFT's argument of the
        same name set to ``False`` (``get_peft_model(..., autocast_adapter_dtype=False)``)
        also keeps them in the layer's dtype.

        Args:
            adapter_name: the adapter.
            autocast_adapter_dtype: PEFT's argument.
        """
        if autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if isinstance(module, SeloraLinear) and adapter_name in module.selora_units:
                dtype = frozen_weight(module.get_base_layer()).dtype
                if dtype.is_floating_point:
                    module.unit(adapter_name).to(dtype=dtype)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route the rows of a call with ``adapter_names`` (PEFT's mixed batches).

        The names travel with the call (:mod:`selora.adapters.routing`); with
        beam search each name is repeated ``num_beams`` times, as PEFT does.
        ``modules_to_save`` copies get them as a keyword argument, as in PEFT.

        Args:
            *args: the call's arguments.
            **kwargs: the call's keyword arguments (``adapter_names``, ``num_beams``).

        Yields:
            Nothing.

        Raises:
            ValueError: in training mode, while merged, or for an unknown adapter.
        """
        names = kwargs.get("adapter_names")
        if names is None:
            if self.training and torch.is_grad_enabled():
                with formed_factors(spectra_to_batch(self.model)):
                    yield
            else:
                yield
            return
        merged = any(isinstance(m, SeloraLinear) and m.merged for m in self.model.modules())
        if merged and not self.training:
            # PEFT's wording: a PeftModel unmerges with ``unmerge_adapter`` (the training-mode
            # refusal, checked first as in PEFT, comes from check_adapter_names).
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call "
                "`unmerge_adapter` first."
            )
        known = list(self.peft_config)
        checked = list(check_adapter_names(names, known, training=self.training, merged=merged))
        beams = kwargs.get("num_beams")
        if isinstance(beams, int) and beams > 1:
            checked = [n for n in checked for _ in range(beams)]
        from peft.utils.other import AuxiliaryTrainingWrapper

        handles = [
            module.register_forward_pre_hook(
                lambda m, a, k, names=checked: _adapter_names_hook(names, m, a, k),
                with_kwargs=True,
            )
            for module in self.model.modules()
            if isinstance(module, AuxiliaryTrainingWrapper)
        ]
        try:
            with routed(checked):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "cat",
        svd_rank: int | None = None,
        svd_clamp: int | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of ``adapters`` (PEFT's API).

        ``"cat"`` (the default here; PEFT's default ``"svd"`` is refused) is
        exact for the summed update and gives dense factors; ``"linear"`` is
        PEFT's factor-wise combination, done exactly on shared coefficients.
        See :mod:`selora.adapters.weighted`. The SVD / TIES / DARE arguments
        are accepted for PEFT's signature and unused (those types are refused).
        The new adapter is inactive until ``set_adapter``.

        Args:
            adapters: the source adapters.
            weights: one weight each (negative subtracts).
            adapter_name: the new adapter's name.
            combination_type: ``"cat"`` or ``"linear"``.
            svd_rank: unused (PEFT's SVD types are refused).
            svd_clamp: unused.
            svd_full_matrices: unused.
            svd_driver: unused.
            density: unused (PEFT's TIES / DARE types are refused).
            majority_sign_method: unused.

        Raises:
            ValueError: for a taken or unknown name, mismatched weights, an
                unsupported type or base, or ``"linear"`` sources that do not
                share basis, shapes and locations.
        """
        from selora.integrations.peft_weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type)

    def _check_safe_merge(self, adapter_names: list[str] | None) -> None:
        """Check every layer before any is written (PEFT merges layer by layer)."""
        for module in self.model.modules():
            if isinstance(module, SeloraLinear):
                module.check_merge(adapter_names)

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Merge the adapters into the frozen weights (PEFT's ``merge_adapter``).

        With ``safe_merge`` every layer is checked before any is written, so a
        failure changes nothing (PEFT itself checks layer by layer).

        Args:
            adapter_names: the adapters to merge; the active ones if ``None``.
            safe_merge: check first (see :meth:`~selora.SpectralLayer.merged_weight`).

        Raises:
            ValueError: with ``safe_merge``, if a check fails; nothing is merged.
        """
        if safe_merge:
            self._check_merge_allowed()  # type: ignore[no-untyped-call]
            self._check_safe_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> Any:
        """PEFT's unload, with every layer checked first under ``safe_merge``.

        Args:
            merge: merge the adapters before unloading.
            progressbar: show PEFT's progress bar.
            safe_merge: check every layer before any is merged or unloaded.
            adapter_names: the adapters to merge; the active ones if ``None``.

        Returns:
            The unloaded base model.
        """
        if merge and safe_merge:
            self._check_merge_allowed()  # type: ignore[no-untyped-call]
            self._check_safe_merge(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge,
            progressbar=progressbar,
            safe_merge=safe_merge,
            adapter_names=adapter_names,
        )

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, Tensor]:
        """PEFT's saving hook: the adapter's tensors plus its location sets and config hash.

        See :func:`selora.integrations.peft_checkpoint.get_adapter_state_dict`.

        Args:
            model: the PEFT model.
            config: the adapter's config.
            adapter_name: the adapter saved.
            state_dict: the model's state dict.
            unwanted_adapter_names: the other adapters.

        Returns:
            The tensors to save, keyed as in the model.
        """
        from selora.integrations.peft_checkpoint import get_adapter_state_dict

        return get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """PEFT's loading hook: check everything, apply the locations, return model keys.

        See :func:`selora.integrations.peft_checkpoint.remap_adapter_state_dict_for_load`;
        any failure raises ``AdapterCheckpointError`` and changes nothing.

        Args:
            model: the PEFT model (or a transformers model holding the adapter).
            config: the adapter's config, read from the checkpoint.
            adapter_name: the adapter loaded.
            state_dict: the checkpoint's tensors.

        Returns:
            The tensors keyed as in the model, without the location and hash keys.
        """
        from selora.adapters.checkpoint_format import AdapterCheckpointError
        from selora.integrations.peft_checkpoint import remap_adapter_state_dict_for_load

        state_dict = dict(state_dict)
        tables = take_embedding_weights(model, state_dict)
        remapped = remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        current = model.state_dict()
        for key, table in tables.items():
            if key not in current or table.shape != current[key].shape:
                raise AdapterCheckpointError(
                    f"the checkpoint's embedding table {key!r} has shape {tuple(table.shape)}, "
                    f"the model's is {tuple(current[key].shape) if key in current else 'absent'} "
                    "(resize the model's embeddings first); nothing was loaded"
                )
        remapped.update(tables)  # loaded into the frozen table, as PEFT's LoRA does
        return remapped

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Map a model state-dict key to its checkpoint key by dropping the adapter name.

        ``...q_proj.selora_units.<adapter>.lora_A.coefficients`` becomes
        ``...q_proj.selora_units.lora_A.coefficients``; PEFT inverts this on load.

        Args:
            key: a key of the model's state dict.
            adapter_name: the adapter being saved or loaded.

        Returns:
            The checkpoint key.
        """
        if key.startswith("selora."):
            return key  # a location set or the config hash: no adapter name in it
        pattern = rf"(^|\.){re.escape(UNITS_ATTR)}\.{re.escape(adapter_name)}\."
        new_key, count = re.subn(pattern, rf"\g<1>{UNITS_ATTR}.", key, count=1)
        if count:
            return new_key
        default: str = super()._remove_adapter_name_from_key(key, adapter_name)
        return default
