"""A ``transformers.Trainer`` whose checkpoints hold only the selora adapter.

``Trainer`` saves a plain (non-PEFT) model in full: every frozen base weight
goes to disk with each checkpoint. :class:`SeloraTrainer` trains a model
adapted with :func:`selora.inject` and writes its checkpoints with
:func:`selora.adapters.io.save_adapter` (the adapter's tensors and config,
never a base weight); resuming and ``load_best_model_at_end`` read them back
with :func:`~selora.adapters.io.load_adapter`. A model adapted through the
PEFT bridge needs none of this: ``Trainer`` already saves a ``PeftModel``'s
adapter only.

Example::

    model = selora.inject(AutoModelForCausalLM.from_config(cfg), SpectralAdapter("dct"))
    trainer = SeloraTrainer(model=model, args=TrainingArguments("out"), train_dataset=ds)
    trainer.train()                       # out/checkpoint-*/adapter_model.safetensors
    selora.adapters.io.load_adapter(AutoModelForCausalLM.from_config(cfg), "out/checkpoint-10")
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from selora.adapters.io import load_adapter, save_adapter
from selora.adapters.model import adapter_config

__all__ = ["SeloraTrainer"]


class SeloraTrainer(Trainer):
    """``transformers.Trainer`` for a model adapted with :func:`selora.inject`.

    Takes the arguments of ``Trainer``. The model must hold a selora adapter.
    With activation (gradient) checkpointing on, the model's input embeddings
    are made to require grad (``enable_input_require_grads``), so that a
    re-entrant checkpoint still reaches the adapters under frozen embeddings.

    Args:
        *args: passed to ``Trainer``.
        **kwargs: passed to ``Trainer``.

    Raises:
        ValueError: if the model holds no selora adapter.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        adapter_config(self._plain_model())  # raises if the model has no adapter
        checkpointing = getattr(self.args, "activation_checkpointing", None) or getattr(
            self.args, "gradient_checkpointing", False
        )
        enable = getattr(self.model, "enable_input_require_grads", None)
        if checkpointing and callable(enable):
            enable()

    def _plain_model(self) -> Any:
        """Return the trained model without its accelerate / DDP wrappers."""
        return self.accelerator.unwrap_model(self.model)

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        """Write the adapter (not the base model) and the training arguments.

        Args:
            output_dir: the checkpoint directory (``args.output_dir`` if ``None``).
            state_dict: ignored: the adapter's tensors are read from the model.
        """
        target = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save or target is None:
            return
        os.makedirs(target, exist_ok=True)
        save_adapter(self._plain_model(), target)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(target)
        torch.save(self.args, os.path.join(target, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load the adapter of a checkpoint written by :meth:`_save` (resuming).

        Args:
            resume_from_checkpoint: the checkpoint directory.
            model: the model to load into (the trained model if ``None``).
        """
        load_adapter(model if model is not None else self._plain_model(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """Load the adapter of the best checkpoint (``load_best_model_at_end``)."""
        best = self.state.best_model_checkpoint
        if best is not None:
            load_adapter(self._plain_model(), best)
