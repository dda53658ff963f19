"""X-LoRA through Hugging Face PEFT: the method ``SELORA_XLORA``.

Importing this module registers it with PEFT (as :mod:`selora.integrations.peft`
registers ``SELORA``), after which PEFT's own entry points work on it::

    import selora.xlora.peft  # registers "SELORA_XLORA" with PEFT
    from peft import PeftModel, get_peft_model
    from selora.xlora.peft import XLoRASeloraConfig

    config = XLoRASeloraConfig(experts={"a": "ckpt/a", "b": "ckpt/b"}, top_k=1)
    model = get_peft_model(base, config)     # loads the experts, adds the classifier
    model.save_pretrained("out")             # selora.xlora.checkpoint's files
    model = PeftModel.from_pretrained(fresh_base, "out")
    with model.disable_adapter(): ...        # the base model, bit-exactly

The tuner holds the same :class:`~selora.xlora.XLoRAModel` machinery as
selora's door and writes the same checkpoint. Its expert layers become
:class:`~selora.integrations.peft_layer.SeloraLinear` (the same layer, marked
as PEFT's), so that PEFT's ``disable_adapter`` and ``get_model_status`` find
them. A ``PeftModel.from_pretrained`` that fails leaves the model as it was:
the files are checked before PEFT touches it, and the rest is undone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import Tensor, nn

from selora.adapters.checkpoint_format import FORMAT_VERSION, VERSION_FIELD, AdapterCheckpointError
from selora.adapters.checkpoint_plan import ModelSnapshot, restore_model, snapshot_model
from selora.adapters.layer import SpectralLayer
from selora.adapters.model import unload
from selora.integrations.peft import SeloraPeftType, register_tables
from selora.integrations.peft_layer import SeloraLayer, SeloraLinear
from selora.xlora.checkpoint import (
    CLASSIFIER_PREFIX,
    EXPERT_CONFIGS,
    PEFT_TYPE,
    checkpoint_tensors,
    config_fields,
    inject_experts,
    load_plan,
    read,
)
from selora.xlora.classifier import CLASSIFIER_ATTR, XLoRAClassifier
from selora.xlora.config import XLoRAConfig
from selora.xlora.model import MERGE_ERROR, XLoRAModel

__all__ = ["PREFIX", "XLoRASeloraConfig", "XLoRASeloraModel", "register"]

PREFIX = "selora_xlora_"
"""The method's PEFT prefix (the classifier's parameters carry it)."""


@dataclass
class XLoRASeloraConfig(PeftConfig):
    """PEFT configuration of an X-LoRA model over selora experts.

    The fields mean what they mean on :class:`~selora.xlora.XLoRAConfig`;
    ``experts`` is a list of names (of adapters the model holds, or with
    ``expert_configs``) or a mapping name -> checkpoint directory of selora's
    format (either door's). After ``get_peft_model`` the live config holds the
    names and ``expert_configs``, so that ``save_pretrained`` writes a
    self-contained checkpoint.

    Raises:
        ValueError: naming the field, for any invalid value.
        AdapterCheckpointError: for a config of another format version.
    """

    experts: list[str] | dict[str, str] = field(default_factory=list)
    layerwise: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    renormalize: bool = False
    enable_softmax: bool = True
    classifier_depth: int = 1
    classifier_width: int | None = None
    hidden_size: int | None = None
    freeze_experts: bool = True
    expert_configs: dict[str, dict[str, Any]] | None = None
    selora_format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """Set the PEFT type; check the format version; validate as :class:`XLoRAConfig`."""
        parent: Any = super()
        parent.__post_init__()
        if self.selora_format_version != FORMAT_VERSION:
            raise AdapterCheckpointError(
                f"{VERSION_FIELD} is {self.selora_format_version!r}; this selora reads "
                f"version {FORMAT_VERSION}"
            )
        self.peft_type = SeloraPeftType(PEFT_TYPE)
        self.xlora_config()

    def xlora_config(self) -> XLoRAConfig:
        """Return the equivalent :class:`~selora.xlora.XLoRAConfig`."""
        fields = {
            k: getattr(self, k) for k in XLoRAConfig.__dataclass_fields__ if k != "checkpoints"
        }
        experts: Any = self.experts
        return XLoRAConfig(
            **fields | {"experts": dict(experts) if isinstance(experts, dict) else list(experts)}
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> Any:
        """Read the config; check a local checkpoint whole first (``checkpoint.read``).

        ``PeftModel.from_pretrained`` calls this before it touches the model,
        so a bad file is refused while the model is still as it was.
        """
        directory = Path(pretrained_model_name_or_path, subfolder or "")
        if directory.is_dir():
            read(directory)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)


_TUNER_CLASSES: dict[type, type] = {SpectralLayer: SeloraLinear}


def _tuner_layer_class(cls: type) -> type:
    """``cls`` marked as a PEFT tuner layer (``SeloraLinear`` for ``SpectralLayer``)."""
    if issubclass(cls, BaseTunerLayer):
        return cls
    if cls not in _TUNER_CLASSES:
        _TUNER_CLASSES[cls] = type(cls.__name__, (cls, SeloraLayer), {"__module__": cls.__module__})
    return _TUNER_CLASSES[cls]


class XLoRASeloraModel(BaseTuner):
    """PEFT tuner wrapping a model as :class:`~selora.xlora.XLoRAModel` does.

    Created by PEFT (``get_peft_model``, ``PeftModel.from_pretrained``). Its
    children are the model and the classifier. Only one X-LoRA adapter per model.

    Args:
        model: the model to wrap (experts injected already, or named by path
            or by ``expert_configs`` in the config).
        config: ``{adapter_name: XLoRASeloraConfig}`` or the config.
        adapter_name: the X-LoRA adapter's name.
        **kwargs: PEFT's further arguments (ignored).
    """

    prefix: str = PREFIX
    tuner_layer_cls = SeloraLayer

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, XLoRASeloraConfig] | XLoRASeloraConfig,
        adapter_name: str,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        conf = config[adapter_name] if isinstance(config, dict) else config
        self.peft_config: dict[str, Any] = {adapter_name: conf}
        self.active_adapter: str | list[str] = adapter_name
        snapshot = snapshot_model(model)
        try:
            if conf.expert_configs is not None:
                data = {"experts": list(conf.experts), EXPERT_CONFIGS: conf.expert_configs}
                inject_experts(model, data, "XLoRASeloraConfig")
            wrapped = XLoRAModel(model, conf.xlora_config())
        except BaseException:
            restore_model(snapshot)
            raise
        layers = [(layer, type(layer)) for layer in wrapped.expert_layers]
        # Kept until a load succeeds, to undo a failing PeftModel.from_pretrained.
        self.__dict__["_undo"] = (snapshot, layers) if conf.expert_configs is not None else None
        for layer, cls in layers:
            layer.__class__ = _tuner_layer_class(cls)
        self.model = model
        self.__dict__["xlora"] = wrapped  # not a child: its modules are ours already
        self.add_module(CLASSIFIER_ATTR, wrapped.classifier)
        conf.experts = list(wrapped.experts)
        conf.expert_configs = config_fields(wrapped.xlora_config, model)[EXPERT_CONFIGS]
        if conf.inference_mode:
            wrapped.classifier.requires_grad_(False)
            for layer, _ in layers:
                layer.selora_units.requires_grad_(False)
        self.model.peft_config = self.peft_config

    def _undo_injection(self) -> None:
        """Give the model back as it was before this tuner (a failed load)."""
        undo: tuple[ModelSnapshot, list[tuple[SpectralLayer, type]]] | None = self.__dict__["_undo"]
        if undo is not None:
            restore_model(undo[0])
            for layer, cls in undo[1]:
                layer.__class__ = cls

    @property
    def xlora_model(self) -> XLoRAModel:
        """The :class:`~selora.xlora.XLoRAModel` machinery (sharing this tuner's modules)."""
        wrapped = self.__dict__["xlora"]
        assert isinstance(wrapped, XLoRAModel)
        return wrapped

    @property
    def classifier(self) -> XLoRAClassifier:
        """The classifier."""
        return self.xlora_model.classifier

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model: scoring pass, classifier, mixed pass."""
        return self.model(*args, **kwargs)

    # PEFT's hooks. The tuner adds no layers of its own: its experts are selora adapters.

    @staticmethod
    def _prepare_adapter_config(peft_config: PeftConfig, model_config: dict[str, Any]) -> Any:
        return peft_config

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("XLoRASeloraModel adds no layers: its experts are selora adapters")

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> bool:
        return False

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Nothing to do: the construction set the flags."""

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Refuse ``adapter_names``: X-LoRA mixes its experts per token itself."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError("X-LoRA mixes its experts per token itself; adapter_names is refused")
        yield

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Enable or disable every expert layer (PEFT's ``disable_adapter``)."""
        for layer in self.xlora_model.expert_layers:
            layer.disabled = not enabled

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Keep the one X-LoRA adapter active; refuse another name."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != list(self.peft_config):
            raise ValueError(f"this X-LoRA model holds only {list(self.peft_config)}")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Refuse: per-token weights cannot be merged."""
        raise RuntimeError(MERGE_ERROR)

    merge_adapter = merge_and_unload  # type: ignore[assignment]

    def unload(self) -> nn.Module:
        """Give back the base model: the hooks, the classifier and every adapter removed."""
        self.model.__dict__.pop("peft_config", None)
        return unload(self.xlora_model.unwrap(), merge_weights=False)

    @classmethod
    def _get_adapter_state_dict(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, *args: Any, **kwargs: Any
    ) -> dict[str, Tensor]:
        """PEFT's saving hook: the tensors of :mod:`selora.xlora.checkpoint`."""
        wrapped = _tuner(model).xlora_model
        return checkpoint_tensors(wrapped.model, wrapped.xlora_config, wrapped.classifier)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Keep the key: the file's keys carry expert names, never the X-LoRA adapter's."""
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """PEFT's loading hook: check everything, apply the locations, return model keys.

        Raises:
            AdapterCheckpointError: naming the key or module; the model is as
                it was before the tuner.
        """
        tuner = _tuner(model)
        wrapped = tuner.xlora_model
        where = f"the X-LoRA checkpoint of adapter {adapter_name!r}"
        try:
            plan = load_plan(
                wrapped.model, wrapped.xlora_config, wrapped.classifier, state_dict, where
            )
        except BaseException:
            tuner._undo_injection()
            raise
        tuner.__dict__["_undo"] = None
        plan.apply_locations()
        keys = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        prefix = f"{CLASSIFIER_ATTR}."  # a bare tuner: keys from the tuner itself
        return {keys.get(id(t), k.replace(CLASSIFIER_PREFIX, prefix)): s for k, t, s in plan.copies}


def _tuner(model: nn.Module) -> XLoRASeloraModel:
    for module in model.modules():
        if isinstance(module, XLoRASeloraModel):
            return module
    raise AdapterCheckpointError(f"{type(model).__name__} holds no X-LoRA tuner")


def register() -> None:
    """Register ``SELORA_XLORA`` with PEFT (idempotent; done on import of this module).

    Raises:
        KeyError: if another method already holds the name or the prefix.
    """
    register_tables(PEFT_TYPE, PREFIX, XLoRASeloraConfig, XLoRASeloraModel)


register()
