"""transformers.Trainer on adapted tiny models: selora.inject (SeloraTrainer) and PEFT."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import VOCAB, inputs, logits, tiny_llama
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

import selora
from selora.adapters.io import load_adapter
from selora.integrations.peft import SeloraConfig
from selora.integrations.trainer import SeloraTrainer

# PeftModel reads transformers' deprecated is_gradient_checkpointing
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

STEPS = 12
ADAPTER = selora.SpectralAdapter(basis="dct", base="dora", r=4, seed=3)


class Copying(torch.utils.data.Dataset[dict[str, Tensor]]):
    """Short sequences that repeat one pattern: a causal LM learns them fast."""

    def __init__(self, n: int = 16, length: int = 12) -> None:
        gen = torch.Generator().manual_seed(0)
        pattern = torch.randint(0, VOCAB, (4,), generator=gen)
        starts = torch.randint(0, 4, (n,), generator=gen)
        self.items = [pattern[(torch.arange(length) + int(s)) % 4] for s in starts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.items[i], "labels": self.items[i]}


def training_args(output_dir: Path, **extra: Any) -> TrainingArguments:
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 renamed gradient_checkpointing (kept as a deprecated alias)
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": STEPS,
        "use_cpu": True,
        "report_to": [],
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        checkpointing: True,
    }
    values.update(extra)
    return TrainingArguments(**values)


def losses(trainer: Trainer) -> list[float]:
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def assert_loss_falls(trainer: Trainer) -> None:
    history = losses(trainer)
    assert len(history) == STEPS
    assert sum(history[-3:]) / 3 < 0.95 * sum(history[:3]) / 3, history


def assert_checkpointing_was_on(model: nn.Module) -> None:
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def test_selora_trainer_saves_only_the_adapter(tmp_path: Path) -> None:
    model = selora.inject(tiny_llama(), ADAPTER)
    trainer = SeloraTrainer(model=model, args=training_args(tmp_path), train_dataset=Copying())
    trainer.train()
    assert_loss_falls(trainer)
    assert_checkpointing_was_on(model)

    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    names = {p.name for p in checkpoint.iterdir()}
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    weight_files = [p for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin")]
    weight_files = [p for p in weight_files if p.name != "training_args.bin"]
    assert [p.name for p in weight_files] == ["adapter_model.safetensors"]
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    base_keys = set(tiny_llama().state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the one format: PEFT's keys (prefix, no adapter name), location sets and the config hash
    tensors = {
        k.removeprefix("base_model.model.").replace(".selora_units.", ".selora_units.default."): v
        for k, v in saved.items()
        if not k.startswith("selora.")
    }
    assert {k for k in saved if k.startswith("selora.")} >= {"selora.config_sha256"}
    for key in tensors:
        assert key not in base_keys, key
        assert key in trainable, key
    assert trainable <= set(tensors)
    # the optimizer state covers the adapter only
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(trainable)

    model.eval()
    ids = inputs()
    expected = logits(model, ids)
    reloaded = load_adapter(tiny_llama(), checkpoint)
    assert torch.equal(logits(reloaded, ids), expected)

    # resuming reads the adapter back through SeloraTrainer._load_from_checkpoint
    fresh = selora.inject(tiny_llama(), ADAPTER)
    resumed = SeloraTrainer(
        model=fresh, args=training_args(tmp_path / "resume"), train_dataset=Copying()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))  # no step left to take
    assert resumed.state.global_step == STEPS
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), tensors[name]), name


def test_selora_trainer_needs_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inject"):
        SeloraTrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=Copying())


def test_trainer_with_peft_bridge(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), SeloraConfig.from_spectral_adapter(ADAPTER))
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=Copying())
    trainer.train()
    assert_loss_falls(trainer)
    assert_checkpointing_was_on(model)

    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    tensors = load_file(str(checkpoint / "adapter_model.safetensors"))
    units = {k: v for k, v in tensors.items() if not k.startswith("selora.")}
    assert units and all(".selora_units." in k for k in units)
    assert sum(t.numel() for t in units.values()) == model.get_nb_trainable_parameters()[0]

    model.eval()
    ids = inputs()
    expected = logits(model, ids)
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(checkpoint))
    assert torch.equal(logits(reloaded, ids), expected)
