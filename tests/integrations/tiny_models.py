"""Tiny randomly initialised transformers models and helpers shared by the integration tests.

Nothing is downloaded: every model is built from a config.
"""

from __future__ import annotations

import os
from pathlib import Path

import tiny_transformers as tt
import torch
from torch import Tensor, nn

import selora

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 100


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tt.llama_config(vocab_size=VOCAB)).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = tt.bert_config(vocab_size=VOCAB, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tt.gpt2_config(vocab_size=VOCAB, n_positions=32)).eval()


BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def inputs(seed: int = 0, batch: int = 2, length: int = 7) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        out: Tensor = model(input_ids=ids).logits
    return out


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor away from its init (B = 0 would hide the adapter)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def peft_to_selora_name(name: str, adapter_name: str = "default") -> str:
    """Map a PEFT-path parameter name to the name of the same tensor under selora.inject."""
    name = name.removeprefix("base_model.model.")
    name = name.replace(f".selora_units.{adapter_name}.", ".selora_units.default.")
    return name.replace(f".modules_to_save.{adapter_name}.", ".")


@torch.no_grad()
def copy_selora_into_peft(selora_model: nn.Module, peft_model: nn.Module, adapter: str) -> None:
    """Copy every trainable tensor of an injected model into the PEFT model's adapter."""
    source = dict(selora_model.named_parameters())
    copied = 0
    for name, p in peft_model.named_parameters():
        if f".{adapter}." not in name:
            continue
        key = peft_to_selora_name(name, adapter)
        assert key in source, f"{name} -> {key} has no counterpart"
        assert p.shape == source[key].shape, (name, p.shape, source[key].shape)
        p.copy_(source[key])
        copied += 1
    trainable = [n for n, p in selora_model.named_parameters() if p.requires_grad]
    assert copied == len(trainable), (copied, trainable)


def subprocess_env() -> dict[str, str]:
    """Environment of a child Python: the repo importable, one thread, offline, localhost."""
    env = dict(os.environ)
    # tests/ too: tiny_models imports tiny_transformers from there
    paths = (str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def adapted_pair(
    kind: str, adapter: selora.SpectralAdapter, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """Return (selora.inject model, PEFT model) from the same base weights and coefficients."""
    from peft import get_peft_model

    from selora.integrations.peft import SeloraConfig

    injected = selora.inject(BUILDERS[kind](seed), adapter)
    perturb(injected, seed=seed + 1)
    task = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}[kind]
    config = SeloraConfig.from_spectral_adapter(adapter, task_type=task)
    peft_model = get_peft_model(BUILDERS[kind](seed), config)
    copy_selora_into_peft(injected, peft_model, "default")
    return injected.eval(), peft_model.eval()
