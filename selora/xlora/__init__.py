r"""X-LoRA: a model-level mixture of named spectral adapters (Buehler & Buehler, 2024).

The experts are named adapters of the shared :class:`~selora.SpectralLayer`
(any basis, base lora / dora / hira each), added with :func:`selora.inject` or
:func:`selora.load_adapter`. :class:`XLoRAModel` wraps the whole model: a small
classifier reads the last hidden states of a first, no-grad pass with the
adapters off and gives per-token (optionally per-layer) weights :math:`g`; the
second pass computes, in every layer,

.. math::

    y = W_0 x + b + \sum_i g_i(x)\,\big(f_i(x) - (W_0 x + b)\big).

The weights travel with the call (:mod:`selora.adapters.routing`), never on
the shared layers, so concurrent forwards are safe::

    import selora
    from selora import xlora

    for name, basis in [("a", "fft"), ("b", "dct")]:
        selora.inject(model, selora.SpectralAdapter(basis=basis, r=8), name=name)
    # ... or selora.load_adapter(model, "ckpt/a", name="a") ...
    xmodel = xlora.wrap(model, xlora.XLoRAConfig(experts=["a", "b"], top_k=1))
    loss = xmodel(input_ids=ids, labels=ids).loss
    xmodel.save_pretrained("out")                  # experts + classifier, one checkpoint
    xmodel = xlora.load(fresh_base, "out")

Through PEFT: ``import selora.xlora.peft`` registers the method ``SELORA_XLORA``
(:class:`~selora.xlora.peft.XLoRASeloraConfig`) for ``get_peft_model``,
``save_pretrained`` and ``PeftModel.from_pretrained``; both doors write and read
the one checkpoint of :mod:`selora.xlora.checkpoint`.
"""

from selora.xlora.checkpoint import from_pretrained, load, save
from selora.xlora.classifier import CLASSIFIER_ATTR, XLoRAClassifier
from selora.xlora.config import XLoRAConfig
from selora.xlora.model import XLoRAModel, wrap

__all__ = [
    "CLASSIFIER_ATTR",
    "XLoRAClassifier",
    "XLoRAConfig",
    "XLoRAModel",
    "from_pretrained",
    "load",
    "save",
    "wrap",
]
