"""The bridge into Hugging Face PEFT: spectral adapters as the PEFT method ``SELORA``.

Importing this module registers the method with PEFT's method registry (the
four ``peft.mapping.PEFT_TYPE_TO_*`` tables that ``register_peft_method``
fills), after which PEFT's own entry points work on it::

    import selora.integrations.peft  # registers "SELORA" with PEFT
    from peft import PeftModel, get_peft_model
    from selora.integrations.peft import SeloraConfig

    model = get_peft_model(base, SeloraConfig(basis="dct", base="dora", r=8))
    model.print_trainable_parameters()
    model.save_pretrained("out")            # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(fresh_base, "out")   # import this module first
    merged = model.merge_and_unload()

Every targeted layer becomes a :class:`~selora.integrations.peft_layer.SeloraLinear`
that holds one :class:`~selora.adapters.AdapterUnit` per adapter name, so the
maths stays in selora's bases. See ``docs/peft.md`` for what the bridge relies
on in PEFT and what breaks if PEFT changes it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

from selora.adapters.config import SpectralAdapter
from selora.adapters.layer_types import (
    is_quantized_layer,
    is_supported_layer,
    quantized_layer_error,
)
from selora.adapters.registry import AdaptationBase, get_adapter_base
from selora.integrations.peft_layer import UNITS_ATTR, SeloraLayer, SeloraLinear
from selora.spectral_bases import get_basis

__all__ = [
    "PEFT_TYPE",
    "PREFIX",
    "SeloraConfig",
    "SeloraPeftType",
    "SeloraLayer",
    "SeloraLinear",
    "SeloraModel",
    "register",
]


class SeloraPeftType(str):
    """The ``peft_type`` of selora: a string that also answers like a member of PEFT's enum.

    PEFT's ``PeftType`` is a ``str`` enum that cannot gain members from outside,
    so selora's type is the plain string ``"SELORA"`` (equal to and hashing as
    that string, so PEFT's tables find it, and written to JSON as it). Code in
    PEFT and transformers that reads ``config.peft_type.value`` or ``.name``
    (model cards, ``PreTrainedModel.load_adapter``) gets the string too.
    """

    __slots__ = ()

    @property
    def value(self) -> str:
        """The string itself, as ``PeftType.X.value``."""
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The string itself, as ``PeftType.X.name``."""
        return str.__str__(self)


PEFT_TYPE = SeloraPeftType("SELORA")
"""The ``peft_type`` written to ``adapter_config.json`` (see :class:`SeloraPeftType`)."""

PREFIX = "selora_"
"""The method's unique PEFT prefix; every adapter attribute of a layer starts with it."""

_DEFAULT_TARGETS: dict[str, list[str]] = {
    model_type: list(names)
    for model_type, names in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()
}

_SPECTRAL_FIELDS = (
    "basis",
    "base",
    "r",
    "alpha",
    "sparse_ratio",
    "n_coeffs",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "dropout",
    "seed",
    "base_options",
    "scale",
)


def _check_wrappable(base: str) -> None:
    base_cls = get_adapter_base(base)
    if base_cls.wrap is not AdaptationBase.wrap or (
        base_cls.prepare_model is not AdaptationBase.prepare_model
    ):
        raise ValueError(
            f"SeloraConfig.base: base {base!r} builds its own per-layer structure "
            "(it overrides AdaptationBase.wrap or prepare_model); the PEFT bridge holds one "
            "AdapterUnit per adapter name and cannot host it. Use selora.inject instead."
        )


@dataclass
class SeloraConfig(PeftConfig):
    """PEFT configuration of a selora adapter, with every :class:`~selora.SpectralAdapter` field.

    The fields mean what they mean on :class:`~selora.SpectralAdapter`
    (validated by it at construction, so a bad value raises ``ValueError``
    naming the field). The budget is stored explicitly: with a basis and no
    budget, ``sparse_ratio`` is filled with selora's default, so a saved
    ``adapter_config.json`` does not depend on the selora version that reads it.

    Target matching is PEFT's, which agrees with selora's: a list matches a
    module whose name equals an entry or ends with ``"." + entry``; a string
    is a regular expression matched against the full name; ``"all-linear"``
    takes every linear layer but a Hugging Face model's output embedding
    (PEFT replaces it by the matched names on injection). ``exclude_modules``
    follows the same two rules. ``None`` targets take PEFT's LoRA defaults for
    the model type.

    Attributes:
        basis: a registered basis name (``"fft"``, ``"dct"``, ``"coif"``, ...) or
            ``None`` for dense factors.
        base: a registered base of adaptation (``"lora"``, ``"dora"``, ``"hira"``).
        r: the rank.
        alpha: the scale numerator (``None``: scale 1).
        sparse_ratio: SeLoRA's budget.
        n_coeffs: FoRA's budget.
        target_modules: the modules to adapt.
        exclude_modules: modules never adapted (names, or a regex).
        modules_to_save: modules trained and saved besides the adapter (PEFT's
            ``ModulesToSaveWrapper``).
        dropout: dropout on the adapter's input.
        seed: seeds the spectral locations.
        base_options: options of the base of adaptation.
        scale: ``"lora"`` or ``"paper"``, how the spectral factors are scaled
            (see :class:`~selora.SpectralAdapter`). ``None`` resolves at
            construction: to ``"lora"`` for a new config, and to ``"paper"``
            for one read back from a file (it carries a ``peft_type``) that has
            no ``scale``, a checkpoint saved before the option existed, so it
            computes what it computed then.
    """

    basis: str | None = field(default="fft", metadata={"help": "Registered basis name or None."})
    base: str = field(default="lora", metadata={"help": "Base of adaptation: lora, dora, hira."})
    r: int = field(default=8, metadata={"help": "Rank of the factors."})
    alpha: float | None = field(default=None, metadata={"help": "Scale numerator (alpha / r)."})
    sparse_ratio: float | None = field(default=None, metadata={"help": "SeLoRA budget."})
    n_coeffs: int | None = field(default=None, metadata={"help": "FoRA budget."})
    target_modules: list[str] | set[str] | str | None = field(
        default="all-linear", metadata={"help": "Names, a regex, or 'all-linear'."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules to skip."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved besides the adapter."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    seed: int = field(default=0, metadata={"help": "Seed of the spectral locations."})
    base_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Options of the base of adaptation."}
    )
    scale: str | None = field(
        default=None, metadata={"help": "'lora' (LoRA's lr carries over) or 'paper' (FoRA eq. 3)."}
    )

    def __post_init__(self) -> None:
        """Set the PEFT type, normalise the containers and validate through SpectralAdapter."""
        parent: Any = super()  # PeftConfig.__post_init__ is unannotated
        parent.__post_init__()
        if self.scale is None:  # a saved config always carries its peft_type
            self.scale = "lora" if self.peft_type is None else "paper"
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = list(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        self.base_options = dict(self.base_options)
        if isinstance(self.basis, str):
            get_basis(self.basis)  # an unknown name raises here, naming the known ones
        _check_wrappable(self.base)
        adapter = self._spectral_adapter(self.target_modules or "all-linear")
        self.sparse_ratio = adapter.sparse_ratio
        self.n_coeffs = adapter.n_coeffs
        self.base_options = dict(adapter.base_options)

    def _spectral_adapter(self, targets: str | set[str] | list[str]) -> SpectralAdapter:
        return SpectralAdapter(
            basis=self.basis,
            base=self.base,
            r=self.r,
            alpha=self.alpha,
            sparse_ratio=self.sparse_ratio,
            n_coeffs=self.n_coeffs,
            target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
            exclude_modules=self.exclude_modules
            if isinstance(self.exclude_modules, str)
            else tuple(self.exclude_modules or ()),
            # PeftModelForSequenceClassification extends the list in place with
            # "classifier" and "score" on every construction, so duplicates appear.
            modules_to_save=tuple(dict.fromkeys(self.modules_to_save or ())),
            dropout=self.dropout,
            seed=self.seed,
            base_options=dict(self.base_options),
            scale=self.scale,  # type: ignore[arg-type]  # validated by SpectralAdapter
        )

    def to_spectral_adapter(self) -> SpectralAdapter:
        """Return the equivalent :class:`~selora.SpectralAdapter`.

        A set of target names becomes a sorted tuple; ``None`` targets (not yet
        resolved by PEFT) become ``"all-linear"``.

        Returns:
            The adapter description that :func:`selora.inject` would take.
        """
        return self._spectral_adapter(self.target_modules or "all-linear")

    @classmethod
    def from_spectral_adapter(cls, adapter: SpectralAdapter, **kwargs: Any) -> SeloraConfig:
        """Build the PEFT config of a :class:`~selora.SpectralAdapter`.

        Args:
            adapter: the adapter; its basis must be registered (a PEFT
                checkpoint stores the basis by name).
            **kwargs: further :class:`~peft.PeftConfig` fields (``task_type``,
                ``inference_mode``, ...).

        Returns:
            The config.

        Raises:
            ValueError: if the basis is an instance no registered name gives back.
        """
        values = adapter.to_dict()
        label = values["basis"]
        if label is not None:
            try:
                get_basis(label)
            except KeyError:
                raise ValueError(
                    f"basis {label!r} is not registered; register it to store it in a PEFT config"
                ) from None
        targets = values["target_modules"]
        values["exclude_modules"] = values["exclude_modules"] or None
        values["modules_to_save"] = values["modules_to_save"] or None
        values["target_modules"] = targets if isinstance(targets, str) else list(targets)
        values.update(kwargs)
        return cls(**values)

    def spectral_fields(self) -> dict[str, Any]:
        """Return the spectral fields (those of :class:`~selora.SpectralAdapter`) by name.

        Returns:
            A dict of the thirteen fields.
        """
        data = dataclasses.asdict(self)
        return {name: data[name] for name in _SPECTRAL_FIELDS}


class SeloraModel(BaseTuner):
    """PEFT tuner that injects :class:`~selora.integrations.peft_layer.SeloraLinear` layers.

    Created by PEFT (``get_peft_model``, ``PeftModel.from_pretrained``,
    ``add_adapter``), not directly.

    Attributes:
        prefix: PEFT's method prefix, ``"selora_"``.
        tuner_layer_cls: :class:`~selora.integrations.peft_layer.SeloraLayer`.
        target_module_mapping: default targets per model type (LoRA's).
    """

    prefix: str = PREFIX
    tuner_layer_cls = SeloraLayer
    target_module_mapping = _DEFAULT_TARGETS

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
                selora layer, or is quantized (bitsandbytes and the like; the
                message names the module and its type).
        """
        if not isinstance(peft_config, SeloraConfig):
            raise TypeError(f"expected a SeloraConfig; got {type(peft_config).__name__}")
        if parameter_name is not None:
            raise TypeError("the selora PEFT bridge adapts modules, not parameters")
        if isinstance(target, SeloraLinear):
            target.update_layer(adapter_name, peft_config)
            return
        if is_quantized_layer(target):
            raise quantized_layer_error(target, current_key)
        if isinstance(target, BaseTunerLayer) or not is_supported_layer(target):
            raise TypeError(
                f"target {current_key!r} is a {type(target).__name__}; the selora PEFT bridge "
                "adapts nn.Linear and transformers' Conv1D (narrow target_modules)"
            )
        new_module = SeloraLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

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
            safe_merge: check first (see :meth:`SeloraLinear.merge`).

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
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Map a model state-dict key to its checkpoint key by dropping the adapter name.

        ``...q_proj.selora_units.<adapter>.lora_A.coefficients`` becomes
        ``...q_proj.selora_units.lora_A.coefficients``; PEFT inverts this on
        load (``_remap_adapter_state_dict_for_load``), which may put the
        weights under another adapter name.

        Args:
            key: a key of the model's state dict.
            adapter_name: the adapter being saved or loaded.

        Returns:
            The checkpoint key.
        """
        pattern = rf"(^|\.){re.escape(UNITS_ATTR)}\.{re.escape(adapter_name)}\."
        new_key, count = re.subn(pattern, rf"\g<1>{UNITS_ATTR}.", key, count=1)
        if count:
            return new_key
        default: str = super()._remove_adapter_name_from_key(key, adapter_name)
        return default


def register() -> None:
    """Register ``SELORA`` with PEFT (idempotent; done on import of this module).

    Uses ``peft.utils.register_peft_method`` when ``PeftType`` has a ``SELORA``
    member. PEFT 0.21's ``PeftType`` is a closed enum, so otherwise the same
    four tables are filled directly under the plain string key ``"SELORA"``,
    which is how PEFT itself looks up a ``peft_type`` read back from JSON.

    Raises:
        KeyError: if another method already holds the name or the prefix.
    """
    from peft import mapping

    # Keyed by PeftType members in PEFT's annotations; a str key hashes and compares equal.
    configs: dict[Any, Any] = mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuners: dict[Any, Any] = mapping.PEFT_TYPE_TO_TUNER_MAPPING
    prefixes: dict[Any, Any] = mapping.PEFT_TYPE_TO_PREFIX_MAPPING
    if configs.get(PEFT_TYPE) is SeloraConfig:
        return
    if PEFT_TYPE in PeftType.__members__:
        register_peft_method(
            name=PEFT_TYPE.lower(), config_cls=SeloraConfig, model_cls=SeloraModel, prefix=PREFIX
        )
        return
    if PEFT_TYPE in configs or PEFT_TYPE in tuners:
        raise KeyError(f"PEFT already has a method called {PEFT_TYPE!r}")
    if PREFIX in prefixes.values():
        raise KeyError(f"PEFT already has a method with the prefix {PREFIX!r}")
    prefixes[PEFT_TYPE] = PREFIX
    configs[PEFT_TYPE] = SeloraConfig
    tuners[PEFT_TYPE] = SeloraModel


register()
