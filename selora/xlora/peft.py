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

The tuner holds the same :class:`~selora.xlora.XLoRAModel` machinery as
selora's door (experts as named adapters of :class:`~selora.SpectralLayer`,
the classifier, the two passes) and writes the same checkpoint, so
:func:`selora.xlora.load` reads what ``save_pretrained`` wrote and
``PeftModel.from_pretrained`` reads what :func:`selora.xlora.save` wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import Tensor, nn

from selora.adapters.checkpoint_format import (
    FORMAT_VERSION,
    VERSION_FIELD,
    AdapterCheckpointError,
)
from selora.adapters.layer import SpectralLayer
from selora.adapters.model import inject
from selora.integrations.peft import SeloraPeftType
from selora.xlora.checkpoint import (
    CLASSIFIER_PREFIX,
    EXPERT_CONFIGS,
    PEFT_TYPE,
    checkpoint_tensors,
    config_fields,
    expert_adapters,
    load_plan,
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
    names and ``expert_configs`` (each expert's adapter config), so that
    ``save_pretrained`` writes a self-contained checkpoint.

    Raises:
        ValueError: naming the field, for any invalid value.
        AdapterCheckpointError: for a config of another format version.
    """

    experts: list[str] | dict[str, str] = field(
        default_factory=list, metadata={"help": "Adapter names, or name -> checkpoint directory."}
    )
    layerwise: bool = field(default=False, metadata={"help": "One set of weights per layer."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature."})
    top_k: int | None = field(default=None, metadata={"help": "Keep the k largest weights."})
    renormalize: bool = field(default=False, metadata={"help": "Renormalise the kept weights."})
    enable_softmax: bool = field(default=True, metadata={"help": "Softmax over the scores."})
    classifier_depth: int = field(default=1, metadata={"help": "Linear layers of the MLP."})
    classifier_width: int | None = field(default=None, metadata={"help": "Its hidden width."})
    hidden_size: int | None = field(default=None, metadata={"help": "The model's hidden size."})
    freeze_experts: bool = field(default=True, metadata={"help": "Train the classifier only."})
    expert_configs: dict[str, dict[str, Any]] | None = field(
        default=None, metadata={"help": "Each expert's adapter config (filled in)."}
    )
    selora_format_version: int | None = field(
        default=None, metadata={"help": "Checkpoint format version (filled in)."}
    )

    def __post_init__(self) -> None:
        """Set the PEFT type and format version; validate through :class:`XLoRAConfig`."""
        parent: Any = super()
        parent.__post_init__()
        if self.selora_format_version is None:
            self.selora_format_version = FORMAT_VERSION
        if self.selora_format_version != FORMAT_VERSION:
            raise AdapterCheckpointError(
                f"{VERSION_FIELD} is {self.selora_format_version!r}; this selora reads "
                f"version {FORMAT_VERSION}"
            )
        self.peft_type = SeloraPeftType(PEFT_TYPE)
        self.xlora_config()

    def xlora_config(self) -> XLoRAConfig:
        """Return the equivalent :class:`~selora.xlora.XLoRAConfig`.

        Returns:
            The config (``checkpoints`` from a mapping ``experts``).
        """
        experts: Any = self.experts
        return XLoRAConfig(
            experts=dict(experts) if isinstance(experts, dict) else list(experts),
            layerwise=self.layerwise,
            temperature=self.temperature,
            top_k=self.top_k,
            renormalize=self.renormalize,
            enable_softmax=self.enable_softmax,
            classifier_depth=self.classifier_depth,
            classifier_width=self.classifier_width,
            hidden_size=self.hidden_size,
            freeze_experts=self.freeze_experts,
        )


class XLoRASeloraModel(BaseTuner):
    """PEFT tuner wrapping a model as :class:`~selora.xlora.XLoRAModel` does.

    Created by PEFT (``get_peft_model``, ``PeftModel.from_pretrained``).
    Its children are the model (``model``) and the classifier
    (``selora_xlora_classifier``). Only one X-LoRA adapter per model.

    Args:
        model: the model to wrap (experts injected already, or named by path
            or by ``expert_configs`` in the config).
        config: ``{adapter_name: XLoRASeloraConfig}`` or the config.
        adapter_name: the X-LoRA adapter's name.
        **kwargs: PEFT's further arguments (ignored).
    """

    prefix: str = PREFIX

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
        if conf.expert_configs is not None:
            data = {"experts": list(conf.experts), EXPERT_CONFIGS: conf.expert_configs}
            devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
            for name, adapter in expert_adapters(data, "XLoRASeloraConfig").items():
                with torch.random.fork_rng(devices=devices):  # the checkpoint gives the tensors
                    inject(model, adapter, name=name)
        wrapped = XLoRAModel(model, conf.xlora_config())
        self.model = model
        self.__dict__["xlora"] = wrapped  # not a child: its modules are ours already
        self.add_module(CLASSIFIER_ATTR, wrapped.classifier)
        fields = config_fields(wrapped.xlora_config, model)
        conf.experts = list(wrapped.experts)
        conf.expert_configs = fields[EXPERT_CONFIGS]
        if conf.inference_mode:
            for unit in self._units():
                unit.requires_grad_(False)
            wrapped.classifier.requires_grad_(False)
        self.model.peft_config = self.peft_config

    def _units(self) -> Iterator[nn.Module]:
        names = self.xlora_model.experts
        for module in self.model.modules():
            if isinstance(module, SpectralLayer):
                yield from (module.selora_units[n] for n in names if n in module.selora_units)

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

    @staticmethod
    def _prepare_adapter_config(peft_config: PeftConfig, model_config: dict[str, Any]) -> Any:
        return peft_config

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("XLoRASeloraModel adds no layers: its experts are selora adapters")

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> bool:
        return False

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Nothing to do: the construction set the flags (PEFT's hook)."""

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Refuse ``adapter_names``: X-LoRA mixes its experts per token itself.

        Raises:
            ValueError: for ``adapter_names``.
        """
        if kwargs.get("adapter_names") is not None:
            raise ValueError("X-LoRA mixes its experts per token itself; adapter_names is refused")
        yield

    def disable_adapter_layers(self) -> None:
        """Make every expert layer compute its frozen output (PEFT's ``disable_adapter``)."""
        for layer in self.xlora_model.expert_layers:
            layer.disabled = True

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`."""
        for layer in self.xlora_model.expert_layers:
            layer.disabled = False

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Keep the one X-LoRA adapter active (there is no other).

        Raises:
            ValueError: for another name.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != list(self.peft_config):
            raise ValueError(f"this X-LoRA model holds only {list(self.peft_config)}")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Refuse (per-token weights).

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(MERGE_ERROR)

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Refuse (per-token weights).

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(MERGE_ERROR)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, Tensor]:
        """PEFT's saving hook: the checkpoint of :mod:`selora.xlora.checkpoint`.

        Returns:
            The tensors keyed as the file stores them.
        """
        tuner = _tuner(model)
        wrapped = tuner.xlora_model
        return checkpoint_tensors(tuner.model, wrapped.xlora_config, wrapped.classifier)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Keep the key: the file's keys carry expert names, never the X-LoRA adapter's."""
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """PEFT's loading hook: check everything, apply the locations, return model keys.

        Raises:
            AdapterCheckpointError: naming the key or module; nothing was changed.
        """
        tuner = _tuner(model)
        wrapped = tuner.xlora_model
        where = f"the X-LoRA checkpoint of adapter {adapter_name!r}"
        plan = load_plan(tuner.model, wrapped.xlora_config, wrapped.classifier, state_dict, where)
        plan.apply_locations()
        keys = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        out: dict[str, Tensor] = {}
        for key, target, source in plan.copies:
            model_key = keys.get(id(target))
            if model_key is None:  # a bare tuner: keys from the tuner itself
                model_key = key.replace(CLASSIFIER_PREFIX, f"{CLASSIFIER_ATTR}.")
            out[model_key] = source
        return out


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
    from peft import mapping

    configs: dict[Any, Any] = mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuners: dict[Any, Any] = mapping.PEFT_TYPE_TO_TUNER_MAPPING
    prefixes: dict[Any, Any] = mapping.PEFT_TYPE_TO_PREFIX_MAPPING
    if configs.get(PEFT_TYPE) is XLoRASeloraConfig:
        return
    if PEFT_TYPE in configs or PEFT_TYPE in tuners or PREFIX in prefixes.values():
        raise KeyError(f"PEFT already has a method called {PEFT_TYPE!r} or prefix {PREFIX!r}")
    prefixes[PEFT_TYPE] = PREFIX
    configs[PEFT_TYPE] = XLoRASeloraConfig
    tuners[PEFT_TYPE] = XLoRASeloraModel


register()
