r"""X-LoRA: a mixture of spectral LoRA experts gated per token (Buehler & Buehler, 2024).

Each adapted layer holds :math:`K` LoRA experts :math:`(\tilde A_i, \tilde B_i)`
(each its own coefficients; experts of one basis share the locations) and computes

.. math::

    y = W_0 x + b + \sum_{i=1}^{K} g_i(x)\, \frac{\alpha_i}{r}\, \tilde B_i \tilde A_i x,

where :math:`g(x)` are per-token weights given by :class:`XLoRAClassifier`
from the last hidden states of a first pass of the model in which every
expert contributes nothing.

Cost: **two forward passes per step**. Calling the model runs (1) a scoring
pass under ``torch.no_grad()`` with ``output_hidden_states=True``, the adapters
off, ``labels`` dropped (and, where the forward takes them, ``use_cache=False``
and ``logits_to_keep=1``), then the classifier, then (2) the real pass, where
each layer weights its experts. The scoring pass stores no activations for
the backward pass, so a training step costs about one extra forward (roughly
+30 to +50% of a LoRA step), and the K experts of a layer cost K low-rank
products. With a KV cache (``generate``) the scoring pass extends a history
of its own (the base model's keys and values), kept as extra entries of the
model's ``transformers.Cache.layers`` so that ``generate``'s beam reorders and
crops edit both alike: cached generation equals uncached generation at the
price of a second history. A cache that already holds tokens but no such
history is refused (use ``use_cache=False``), never approximated.

The two passes are wired by a forward pre-hook and a forward hook on the model
given to :func:`selora.inject` (a Hugging Face causal LM or encoder: it needs
``config.hidden_size``, or the ``hidden_size`` option, and a forward taking
``output_hidden_states``); the classifier is the submodule
``model.selora_xlora_classifier``, so checkpoints and optimizers find it.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from selora.adapters.checkpoint_format import AdapterCheckpointError
from selora.adapters.config import SpectralAdapter
from selora.adapters.model import ADAPTERS_ATTR, unload
from selora.adapters.registry import AdaptationBase, Update, register_base
from selora.adapters.unit import AdapterUnit
from selora.adapters.xlora_classifier import (
    CLASSIFIER_ATTR,
    MERGE_ERROR,
    XLoRAClassifier,
    XLoRALayer,
    get_xlora_classifier,
    xlora_layers,
)
from selora.adapters.xlora_passes import attach_classifier, model_hidden_size

if TYPE_CHECKING:
    from selora.adapters.checkpoint_read import Checkpoint

__all__ = [
    "CLASSIFIER_ATTR",
    "XLoRA",
    "XLoRAClassifier",
    "XLoRALayer",
    "get_xlora_classifier",
    "xlora_layers",
]

_EXPERT_FIELDS = ("basis", "r", "alpha", "sparse_ratio", "n_coeffs", "seed", "dropout", "scale")
_DEFAULTS: dict[str, Any] = {
    "n_experts": None,
    "layerwise": False,
    "temperature": 1.0,
    "top_k": None,
    "renormalize": False,
    "enable_softmax": True,
    "hidden_size": None,
    "classifier_depth": 1,
    "classifier_hidden_size": None,
    "experts": None,
    "expert_adapters": None,
    "freeze_experts": None,
}
# --------------------------------------------------------------------------- options


def _positive_int(options: dict[str, Any], key: str, *, optional: bool) -> None:
    value = options[key]
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "None or " if optional else ""
        raise ValueError(f"{key} must be {allowed}an integer >= 1; got {value!r}")
    options[key] = int(value)


def _flag(options: dict[str, Any], key: str) -> None:
    if not isinstance(options[key], bool):
        raise ValueError(f"{key} must be True or False; got {options[key]!r}")


def _expert_spec(data: Any, index: int) -> dict[str, Any]:
    """Check one entry of ``expert_adapters`` and return it as a plain dict."""
    if not isinstance(data, dict) or not set(data) <= set(_EXPERT_FIELDS):
        raise ValueError(
            f"expert_adapters[{index}] must be a dict with keys among {list(_EXPERT_FIELDS)}; "
            f"got {data!r}"
        )
    if not isinstance(data.get("basis", "fft"), (str, type(None))):
        raise ValueError(
            f"expert_adapters[{index}]: basis must be a registered name or None "
            f"(the options are saved as JSON); got {data['basis']!r}"
        )
    try:
        SpectralAdapter(base="lora", **data)
    except ValueError as exc:
        raise ValueError(f"expert_adapters[{index}]: {exc}") from None
    return dict(data)


def _spec_of(adapter: SpectralAdapter) -> dict[str, Any]:
    """Return the expert fields of an adapter, JSON-serialisable (basis by name)."""
    data = adapter.to_dict()
    return {key: data[key] for key in _EXPERT_FIELDS}


def _expert_adapter(spec: dict[str, Any]) -> SpectralAdapter:
    return SpectralAdapter(base="lora", **spec)


# --------------------------------------------------------------------------- experts from files


_Source = tuple[str, SpectralAdapter, "Checkpoint"]


def _read_expert(path: str, index: int, adapter: SpectralAdapter) -> _Source:
    from selora.adapters.io import read_checkpoint

    where = f"base_options experts[{index}] ({path})"
    try:
        checkpoint = read_checkpoint(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read the adapter: {exc}") from None
    saved = checkpoint.adapter
    if saved.base != "lora":
        raise ValueError(f"{where}: an X-LoRA expert must be a 'lora' adapter; got {saved.base!r}")
    if saved.r != adapter.r:
        raise ValueError(
            f"{where}: rank r={saved.r} differs from the X-LoRA adapter's r={adapter.r}"
        )
    return path, saved, checkpoint


def _load_experts(layers: list[XLoRALayer], sources: list[_Source]) -> None:
    """Copy each saved adapter into its expert, all layers checked before anything changes."""
    from selora.adapters.io import unit_plan

    plans = []
    for index, (path, _, checkpoint) in enumerate(sources):
        units = {layer.name: layer.units()[index] for layer in layers}
        where = f"base_options experts[{index}] ({path})"
        try:
            plans.append(unit_plan(checkpoint, units, where, owner="the X-LoRA adapter"))
        except AdapterCheckpointError as exc:
            raise ValueError(str(exc)) from None
    for plan in plans:
        plan.apply_locations()
        plan.apply_copies()
    for layer in layers:
        for unit in layer.units():
            unit.train(unit.training)  # drop the factor caches


# --------------------------------------------------------------------------- the base


@register_base("xlora")
class XLoRA(AdaptationBase):
    r"""X-LoRA: :math:`K` spectral LoRA experts per layer, mixed per token by a classifier.

    .. math::

        y = W_0 x + b + \sum_{i=1}^{K} g_i(x)\, \frac{\alpha_i}{r}\, \tilde B_i \tilde A_i x,
        \qquad g(x) = \operatorname{top}_k\!\big(\operatorname{softmax}(z(h) / \tau)\big),

    with :math:`h` the last hidden state of the token in a first, no-grad pass
    where the experts contribute nothing, and :math:`z` a small MLP
    (:class:`XLoRAClassifier`). See :mod:`selora.adapters.xlora` for the two
    passes and their cost. Every spectral basis composes with it; experts
    loaded from saved adapters may each have their own basis and budget.

    ``base_options`` (all JSON-serialisable; defaults filled in):

    * ``n_experts`` (int >= 1; default ``len(experts)``, else 2): :math:`K`.
    * ``layerwise`` (bool, False): one set of :math:`K` weights per adapted
      layer, ``(batch, seq, L, K)``, rather than one shared ``(batch, seq, K)``.
    * ``temperature`` (float > 0, 1.0): :math:`\tau` of the softmax.
    * ``top_k`` (None or 1..K, None): keep the ``k`` largest weights per token.
    * ``renormalize`` (bool, False): re-normalise the kept weights to sum to one.
    * ``enable_softmax`` (bool, True): without it the raw scores are the weights.
    * ``hidden_size`` (None or int): overrides ``model.config.hidden_size``.
    * ``classifier_depth`` (int >= 1, 1) and ``classifier_hidden_size``
      (None or int; None is the hidden size): the MLP, ``depth`` linear layers.
    * ``experts`` (None or K paths): adapters saved by
      :func:`selora.adapters.io.save_adapter`, loaded into the experts; each
      must be a ``lora`` adapter of the same ``r`` over the same modules, and
      keeps its own basis, budget, seed, scale, ``alpha`` and dropout. After
      injection the model's config records them inline in
      ``expert_adapters`` (and ``experts`` becomes None), so a checkpoint of
      the X-LoRA model is self-contained.
    * ``expert_adapters`` (None or K dicts of ``basis``, ``r``, ``alpha``,
      ``sparse_ratio``, ``n_coeffs``, ``seed``, ``dropout``, ``scale``): each
      expert's description (without ``scale``, the adapter's); None derives
      every expert from the adapter itself.
    * ``freeze_experts`` (bool; default True when loading ``experts``, else
      False): train only the classifier, X-LoRA's usual recipe.

    Merging is impossible (``mergeable = False``): :func:`selora.merge` raises,
    and :func:`selora.unload` returns the plain base layers, unmerged.
    """

    mergeable: ClassVar[bool] = False

    def __init__(self) -> None:
        self._specs: list[SpectralAdapter] | None = None
        self._sources: list[_Source] = []

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Check X-LoRA's options and fill in their defaults (see the class docstring).

        Args:
            options: a mutable copy of ``base_options``.

        Raises:
            ValueError: naming the option, for an unknown option or a bad value.
        """
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown X-LoRA options {unknown}; known: {sorted(_DEFAULTS)}")
        for key, value in _DEFAULTS.items():
            options.setdefault(key, value)
        experts, specs = options["experts"], options["expert_adapters"]
        if experts is not None:
            if isinstance(experts, (str, os.PathLike)) or not isinstance(experts, Sequence):
                raise ValueError(f"experts must be None or a list of paths; got {experts!r}")
            if not experts or not all(isinstance(p, (str, os.PathLike)) and p for p in experts):
                raise ValueError(f"experts must be a non-empty list of paths; got {experts!r}")
            if specs is not None:
                raise ValueError("give experts (paths) or expert_adapters, not both")
            options["experts"] = [os.fspath(p) for p in experts]
        if specs is not None:
            if not isinstance(specs, Sequence) or isinstance(specs, str) or not specs:
                raise ValueError(f"expert_adapters must be None or a non-empty list; got {specs!r}")
            options["expert_adapters"] = [_expert_spec(s, i) for i, s in enumerate(specs)]
        given = options["experts"] or options["expert_adapters"]
        if options["n_experts"] is None:
            options["n_experts"] = len(given) if given else 2
        _positive_int(options, "n_experts", optional=False)
        if given and len(given) != options["n_experts"]:
            key = "experts" if options["experts"] else "expert_adapters"
            raise ValueError(f"{key} has {len(given)} entries but n_experts={options['n_experts']}")
        for key in ("layerwise", "renormalize", "enable_softmax"):
            _flag(options, key)
        if options["freeze_experts"] is None:
            options["freeze_experts"] = options["experts"] is not None
        _flag(options, "freeze_experts")
        temperature = options["temperature"]
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not 0 < float(temperature) < float("inf")
        ):
            raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
        options["temperature"] = float(temperature)
        _positive_int(options, "top_k", optional=True)
        if options["top_k"] is not None and options["top_k"] > options["n_experts"]:
            raise ValueError(
                f"top_k must lie in 1..n_experts={options['n_experts']}; got {options['top_k']}"
            )
        if options["renormalize"] and not options["enable_softmax"]:
            raise ValueError("renormalize needs enable_softmax=True (weights must be positive)")
        for key in ("hidden_size", "classifier_hidden_size"):
            _positive_int(options, key, optional=True)
        _positive_int(options, "classifier_depth", optional=False)

    def forward(
        self, unit: AdapterUnit, x: Tensor, base_out: Tensor, weight0: Tensor, bias: Tensor | None
    ) -> Tensor:
        """Not used: X-LoRA's experts are ``lora`` units mixed by :class:`XLoRALayer`.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("X-LoRA mixes its experts in XLoRALayer; no unit uses base 'xlora'")

    def update(self, unit: AdapterUnit, weight0: Tensor | None) -> Update:
        """Refuse (see :meth:`XLoRALayer.merge`).

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(MERGE_ERROR)

    def _expert_specs(self, adapter: SpectralAdapter) -> list[SpectralAdapter]:
        """Describe the K experts, reading the saved ones once (on the first layer)."""
        if self._specs is not None:
            return self._specs
        options = adapter.base_options
        if options["experts"] is not None:
            self._sources = [
                _read_expert(path, i, adapter) for i, path in enumerate(options["experts"])
            ]
            specs = [_expert_adapter(_spec_of(saved)) for _, saved, _ in self._sources]
        elif options["expert_adapters"] is not None:
            # an expert without a scale (saved before the option) takes the adapter's
            specs = [
                _expert_adapter({"scale": adapter.scale, **s}) for s in options["expert_adapters"]
            ]
            for i, spec in enumerate(specs):
                if spec.r != adapter.r:
                    raise ValueError(
                        f"base_options expert_adapters[{i}]: rank r={spec.r} differs from "
                        f"the X-LoRA adapter's r={adapter.r}"
                    )
        else:
            own = dataclasses.replace(adapter, base="lora", base_options={})
            specs = [own] * int(options["n_experts"])
        self._specs = specs
        return specs

    def wrap(self, name: str, module: nn.Module, adapter: SpectralAdapter) -> nn.Module:
        """Return an :class:`XLoRALayer` holding the K experts."""
        return XLoRALayer(
            module,
            adapter,
            self._expert_specs(adapter),
            name=name,
            freeze_experts=bool(adapter.base_options["freeze_experts"]),
        )

    def prepare_model(self, model: nn.Module, adapter: SpectralAdapter) -> None:
        """Load saved experts, attach the classifier and hook the two passes onto ``model``.

        On any error the injection is undone (the base layers are put back;
        the model's parameters stay frozen, as :func:`selora.inject` left them).

        Args:
            model: the adapted model.
            adapter: the adapter description.

        Raises:
            TypeError: if ``model`` is not a Hugging Face-like model (see the
                module docstring for what is needed).
            ValueError: if a saved expert does not fit the model.
        """
        try:
            self._prepare(model, adapter)
        except Exception:
            unload(model, merge_weights=False)
            raise

    def _prepare(self, model: nn.Module, adapter: SpectralAdapter) -> None:
        options = adapter.base_options
        hidden_size = model_hidden_size(model, options["hidden_size"])
        if CLASSIFIER_ATTR in model._modules:
            raise ValueError(f"{type(model).__name__} already has a {CLASSIFIER_ATTR}")
        layers = xlora_layers(model)
        for index, layer in enumerate(layers):
            layer.layer_index = index
        if self._sources:
            _load_experts(layers, self._sources)
            self._sources = []  # the tensors are copied; do not keep them alive
            recorded = dict(options)
            recorded["experts"] = None
            recorded["expert_adapters"] = [_spec_of(spec) for spec in self._expert_specs(adapter)]
            registry = model.__dict__[ADAPTERS_ATTR]  # X-LoRA is the model's only adapter
            for name in registry:
                registry[name] = dataclasses.replace(adapter, base_options=recorded)
        classifier = XLoRAClassifier(
            hidden_size,
            int(options["n_experts"]),
            len(layers),
            layerwise=bool(options["layerwise"]),
            temperature=float(options["temperature"]),
            top_k=options["top_k"],
            renormalize=bool(options["renormalize"]),
            enable_softmax=bool(options["enable_softmax"]),
            depth=int(options["classifier_depth"]),
            width=options["classifier_hidden_size"],
        )
        weight = next(iter(model.parameters()), None)
        if weight is not None:
            classifier.to(weight.device)
        classifier.train(model.training)
        attach_classifier(model, classifier)
