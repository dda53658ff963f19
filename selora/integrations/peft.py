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
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType, register_peft_method

from selora.adapters.checkpoint_format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    SPECTRAL_FIELDS,
    VERSION_FIELD,
    AdapterCheckpointError,
    check_config_keys,
    rebuild_basis,
    refuse_legacy,
    spectral_config,
)
from selora.adapters.config import SpectralAdapter
from selora.adapters.patterns import PATTERN_FIELDS, check_layer_selection, task_heads
from selora.integrations.peft_layer import SeloraLayer, SeloraLinear
from selora.integrations.peft_model import CHECKPOINT_DIR_ATTR, PREFIX, SeloraModel
from selora.spectral_bases import basis_spec, get_basis

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

_SPECTRAL_FIELDS = SPECTRAL_FIELDS
"""The fields of :class:`~selora.SpectralAdapter` on :class:`SeloraConfig`."""


def _directory_being_read() -> str | None:
    """The local directory ``PeftConfig.from_pretrained`` is reading, if it is the caller.

    transformers' ``PreTrainedModel.load_adapter`` reads the config with
    ``PeftConfig.from_pretrained`` (not :meth:`SeloraConfig.from_pretrained`) and
    the tensors with its own loader, which never calls PEFT's loading hook. The
    directory, found from the documented arguments of that public call, lets
    :class:`~selora.integrations.peft_model.SeloraModel` check the checkpoint
    and apply its stored locations before transformers loads anything.
    """
    target = PeftConfig.from_pretrained.__func__.__code__  # type: ignore[attr-defined]
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is target:
                name = frame.f_locals.get("pretrained_model_name_or_path")
                sub = frame.f_locals.get("subfolder")
                if not isinstance(name, (str, os.PathLike)):
                    return None
                directory = os.path.join(os.fspath(name), sub if isinstance(sub, str) else "")
                return directory if os.path.isdir(directory) else None
            frame = frame.f_back
        return None
    finally:
        del frame


@dataclass
class SeloraConfig(PeftConfig):
    r"""PEFT configuration of a selora adapter, with every :class:`~selora.SpectralAdapter` field.

    The fields mean what they mean on :class:`~selora.SpectralAdapter`
    (validated by it at construction, so a bad value raises ``ValueError``
    naming the field). The budget is stored explicitly: with a basis and no
    budget, ``sparse_ratio`` is filled with selora's default, so a saved
    ``adapter_config.json`` does not depend on the selora version that reads it.
    ``to_dict()`` is the whole ``adapter_config.json`` of selora's checkpoint
    format (:mod:`selora.adapters.checkpoint_format`), which
    :func:`selora.save_adapter` writes too.

    Target matching is PEFT's, which agrees with selora's: a list matches a
    module whose name equals an entry or ends with ``"." + entry``; a string
    is a regular expression matched against the full name; ``"all-linear"``
    takes every linear layer but a Hugging Face model's output embedding
    (PEFT replaces it by the matched names on injection). ``exclude_modules``
    follows the same two rules. ``None`` targets take PEFT's LoRA defaults for
    the model type.

    Attributes:
        basis: a registered basis name (``"fft"``, ``"dct"``, ``"coif"``, ...) or
            ``None`` for dense factors. A basis with constructor options is
            given by name with ``basis_options`` (or through
            :meth:`from_spectral_adapter` from an instance).
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
        seed: seeds the spectral locations (a checkpoint stores the locations
            themselves; they are never regenerated at load).
        base_options: options of the base of adaptation.
        scale: ``"lora"`` or ``"paper"``, how the spectral factors are scaled
            (see :class:`~selora.SpectralAdapter`).
        init_weights: PEFT's convention: ``True``, :math:`\tilde B = 0` (the
            adapted model equals its base); ``False``, a random non-zero
            :math:`\tilde B`, for tests.
        autocast_adapter_dtype: ``True``, adapter parameters in float32
            (float64 for a float64 layer); ``False``, in the layer's dtype
            (the transform still computes in float32).
        rank_pattern: per-module ranks, name or regex -> ``r`` (PEFT's
            ``get_pattern_key`` rule; see :mod:`selora.adapters.patterns`).
        alpha_pattern: per-module alphas, matched likewise.
        sparse_ratio_pattern: per-module SeLoRA budgets, matched likewise.
        n_coeffs_pattern: per-module FoRA budgets, matched likewise.
        use_rslora: scale :math:`\alpha / \sqrt r` instead of :math:`\alpha / r`.
        layers_to_transform: layer indices to adapt (PEFT's rule; needs a list
            of target names).
        layers_pattern: the module list the layer index follows (``"layers"``).
        basis_class: the basis' class path ``module.QualName``, checked at load
            (``None`` for dense factors; filled from ``basis`` when not given).
        basis_options: the basis' constructor options (``None`` for dense
            factors; filled from ``basis`` when not given).
        selora_format_version: the checkpoint format version (2). A config read
            from a file without it (written before it existed, with no stored
            locations) is refused with :class:`~selora.AdapterCheckpointError`.

    Raises:
        ValueError: naming the field, for any invalid value.
        AdapterCheckpointError: for a config read from a file that is of
            another format version, or names a basis that is not registered or
            not of the saved class.
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
    scale: str = field(
        default="lora",
        metadata={"help": "'lora' (LoRA's lr carries over) or 'paper' (FoRA eq. 3)."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: B = 0 (the base model at init); False: random B."}
    )
    autocast_adapter_dtype: bool = field(
        default=True, metadata={"help": "Adapter parameters in float32 (True) or the layer dtype."}
    )
    rank_pattern: dict[str, int] | None = field(
        default_factory=dict, metadata={"help": "Per-module ranks: name or regex -> r."}
    )
    alpha_pattern: dict[str, float] | None = field(
        default_factory=dict, metadata={"help": "Per-module alphas: name or regex -> alpha."}
    )
    sparse_ratio_pattern: dict[str, float] | None = field(
        default_factory=dict, metadata={"help": "Per-module SeLoRA budgets (name or regex)."}
    )
    n_coeffs_pattern: dict[str, int] | None = field(
        default_factory=dict, metadata={"help": "Per-module FoRA budgets (name or regex)."}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised scale alpha / sqrt(r)."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt (PEFT's rule)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the module list the layer index follows."}
    )
    basis_class: str | None = field(
        default=None, metadata={"help": "Class path of the basis (filled in from basis)."}
    )
    basis_options: dict[str, Any] | None = field(
        default=None, metadata={"help": "Constructor options of the basis (filled in from basis)."}
    )
    selora_format_version: int | None = field(
        default=None, metadata={"help": "Checkpoint format version (filled in)."}
    )

    def __post_init__(self) -> None:
        """Set the PEFT type and format version, resolve the basis, validate all fields."""
        parent: Any = super()  # PeftConfig.__post_init__ is unannotated
        parent.__post_init__()
        read = self.peft_type is not None  # a config read back from a file carries its peft_type
        if read:
            directory = _directory_being_read()
            if directory is not None:
                # Not a field (never saved): SeloraModel checks this checkpoint at injection.
                self.__dict__[CHECKPOINT_DIR_ATTR] = directory
        if self.selora_format_version is None:
            if read:
                refuse_legacy({"peft_type": str(self.peft_type)}, CONFIG_NAME)
            self.selora_format_version = FORMAT_VERSION
        if self.selora_format_version != FORMAT_VERSION:
            raise AdapterCheckpointError(
                f"{CONFIG_NAME}: {VERSION_FIELD} is {self.selora_format_version!r}; this "
                f"selora reads version {FORMAT_VERSION}"
            )
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = list(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        self.base_options = dict(self.base_options)
        self._resolve_basis()
        adapter = self.to_spectral_adapter()
        self.sparse_ratio = adapter.sparse_ratio
        self.n_coeffs = adapter.n_coeffs
        self.base_options = dict(adapter.base_options)
        for name in PATTERN_FIELDS:
            setattr(self, name, dict(getattr(adapter, name)))
        if task_heads(adapter.task_type):
            # Before injection, so that PEFT's guard keeps the head out of the targets: PEFT
            # 0.21's PeftModelForTokenClassification adds it only after injecting.
            self.modules_to_save = list(adapter.modules_to_save)
        targets = self.target_modules
        layers, pattern = check_layer_selection(
            self.layers_to_transform,
            self.layers_pattern,
            targets if targets is None or isinstance(targets, str) else sorted(targets),
            "SeloraConfig",
        )
        self.layers_to_transform = None if layers is None else list(layers)
        self.layers_pattern = None if pattern is None else list(pattern)

    def _resolve_basis(self) -> None:
        """Fill ``basis_class`` / ``basis_options`` from the name, or rebuild the basis."""
        if self.basis is not None and not isinstance(self.basis, str):
            raise ValueError(
                f"SeloraConfig.basis: a name or None; got {self.basis!r} (give a basis instance "
                "through SeloraConfig.from_spectral_adapter)"
            )
        if self.basis is not None and self.basis_class is None:
            # a name, with or without constructor options: the spec of what they build
            # (an unknown name raises, naming the known ones)
            built = get_basis(self.basis, **dict(self.basis_options or {}))
            spec = basis_spec(built)
            self.basis_class, self.basis_options = spec["cls"], spec["options"]
        fields = {"basis": self.basis, "basis_class": self.basis_class}
        self._basis = rebuild_basis({**fields, "basis_options": self.basis_options}, CONFIG_NAME)

    def to_spectral_adapter(self) -> SpectralAdapter:
        """Return the equivalent :class:`~selora.SpectralAdapter`.

        A set of target names becomes a sorted tuple; ``None`` targets (not yet
        resolved by PEFT) become ``"all-linear"`` and the layer selection is
        then left out (PEFT applies it once it has resolved the targets). The
        basis is its name when it has no options, else the instance rebuilt
        from ``basis_options``.

        Returns:
            The adapter description that :func:`selora.inject` would take.
        """
        targets = self.target_modules or "all-linear"
        resolved = self.target_modules is not None
        return SpectralAdapter(
            basis=getattr(self, "_basis", self.basis),
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
            init_weights=self.init_weights,
            autocast_adapter_dtype=self.autocast_adapter_dtype,
            rank_pattern=dict(self.rank_pattern or {}),
            alpha_pattern=dict(self.alpha_pattern or {}),
            sparse_ratio_pattern=dict(self.sparse_ratio_pattern or {}),
            n_coeffs_pattern=dict(self.n_coeffs_pattern or {}),
            use_rslora=self.use_rslora,
            layers_to_transform=self.layers_to_transform if resolved else None,
            layers_pattern=self.layers_pattern if resolved else None,
            task_type=self.task_type,
        )

    @classmethod
    def from_spectral_adapter(cls, adapter: SpectralAdapter, **kwargs: Any) -> SeloraConfig:
        """Build the PEFT config of a :class:`~selora.SpectralAdapter`.

        The spectral part is :func:`~selora.adapters.checkpoint_format.spectral_config`,
        the one :func:`selora.save_adapter` writes: a basis instance is stored
        by name, class and declared options.

        Args:
            adapter: the adapter.
            **kwargs: further :class:`~peft.PeftConfig` fields (``task_type``,
                ``inference_mode``, ...).

        Returns:
            The config.

        Raises:
            BasisNotSavableError: if the basis cannot be rebuilt from its name
                and declared options (a ``ValueError``).
        """
        values = spectral_config(adapter)
        values.update(kwargs)
        return cls(**values)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Check a saved config's fields before PEFT builds it (``from_pretrained``).

        Every field of selora's format must be there: none is given a default.

        Args:
            **kwargs: the fields read from ``adapter_config.json``.

        Returns:
            ``kwargs``, as PEFT's own check returns them.

        Raises:
            AdapterCheckpointError: naming the missing field, or saying why a
                legacy config cannot load.
        """
        check_config_keys(kwargs, CONFIG_NAME)
        checked: dict[str, Any] = super().check_kwargs(**kwargs)  # type: ignore[no-untyped-call]
        return checked

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> Any:
        """PEFT's ``from_pretrained``, with a checkpoint error naming the directory read.

        Args:
            pretrained_model_name_or_path: a directory (or Hub id).
            subfolder: a subfolder of it.
            **kwargs: passed to PEFT.

        Returns:
            The config.

        Raises:
            AdapterCheckpointError: naming the directory, for a config of
                another format version, with a missing field, or naming a
                basis that cannot be rebuilt.
        """
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)
        except AdapterCheckpointError as exc:
            raise AdapterCheckpointError(f"{pretrained_model_name_or_path}: {exc}") from None
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(directory):
            # Not a field (never saved): SeloraModel checks this checkpoint at injection.
            config.__dict__[CHECKPOINT_DIR_ATTR] = directory
        return config

    def spectral_fields(self) -> dict[str, Any]:
        """Return the spectral fields (those of :class:`~selora.SpectralAdapter`) by name.

        Returns:
            A dict of the fields (:data:`~selora.adapters.checkpoint_format.SPECTRAL_FIELDS`).
        """
        data = dataclasses.asdict(self)
        return {name: data[name] for name in _SPECTRAL_FIELDS}


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

    configs: dict[Any, Any] = mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    if PEFT_TYPE in PeftType.__members__ and configs.get(PEFT_TYPE) is not SeloraConfig:
        register_peft_method(
            name=PEFT_TYPE.lower(), config_cls=SeloraConfig, model_cls=SeloraModel, prefix=PREFIX
        )
        return
    register_tables(PEFT_TYPE, PREFIX, SeloraConfig, SeloraModel)


def register_tables(peft_type: str, prefix: str, config_cls: type, tuner_cls: type) -> None:
    """Fill PEFT's method tables under the plain string ``peft_type`` (idempotent).

    Raises:
        KeyError: if another method already holds the name or the prefix.
    """
    from peft import mapping

    # Keyed by PeftType members in PEFT's annotations; a str key hashes and compares equal.
    configs: dict[Any, Any] = mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuners: dict[Any, Any] = mapping.PEFT_TYPE_TO_TUNER_MAPPING
    prefixes: dict[Any, Any] = mapping.PEFT_TYPE_TO_PREFIX_MAPPING
    if configs.get(peft_type) is config_cls:
        return
    if peft_type in configs or peft_type in tuners:
        raise KeyError(f"PEFT already has a method called {peft_type!r}")
    if prefix in prefixes.values():
        raise KeyError(f"PEFT already has a method with the prefix {prefix!r}")
    prefixes[peft_type] = prefix
    configs[peft_type] = config_cls
    tuners[peft_type] = tuner_cls


register()
