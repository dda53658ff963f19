"""Helpers of the X-LoRA tests: tiny models (never downloaded), experts, outputs.

Import it as ``from xlora_testkit import ...`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tiny_transformers as tt
import torch
from torch import Tensor, nn

import selora
from selora import SpectralAdapter
from selora.xlora import XLoRAConfig, XLoRAModel

VOCAB = 64

#: Three experts of different bases and bases of adaptation.
EXPERTS: dict[str, SpectralAdapter] = {
    "fourier": SpectralAdapter(basis="fft", r=4, alpha=8.0, seed=0),
    "wave": SpectralAdapter(basis="haar", base="dora", r=4, alpha=8.0, seed=1),
    "dense": SpectralAdapter(basis=None, base="hira", r=4, seed=2),
}


def _ready(model: nn.Module) -> nn.Module:
    return model.float().train()


def tiny_llama() -> nn.Module:
    """A random LLaMA: hidden 32, 2 layers."""
    from transformers import LlamaForCausalLM

    return _ready(LlamaForCausalLM(tt.llama_config(vocab_size=VOCAB, max_position_embeddings=64)))


def tiny_gpt2() -> nn.Module:
    """A random GPT-2 (Conv1D projections), no dropout."""
    from transformers import GPT2LMHeadModel

    config = tt.gpt2_config(
        vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return _ready(GPT2LMHeadModel(config))


def tiny_bert() -> nn.Module:
    """A random BERT encoder, no dropout."""
    from transformers import BertModel

    config = tt.bert_config(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _ready(BertModel(config))


def token_batch(batch: int = 2, length: int = 7, seed: int = 0) -> Tensor:
    """A fixed batch of token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def base_model(build: Callable[[], nn.Module] = tiny_llama, seed: int = 0) -> nn.Module:
    """A fresh random model, the same for the same seed."""
    torch.manual_seed(seed)
    return build()


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Move every adapter tensor away from its init (so that each expert contributes)."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in selora.adapter_layers(model):
        for p in layer.selora_units.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def with_experts(
    model: nn.Module, experts: dict[str, SpectralAdapter] | None = None, seed: int = 0
) -> nn.Module:
    """``model`` with ``experts`` injected as named adapters, perturbed."""
    for name, adapter in (experts or EXPERTS).items():
        selora.inject(model, adapter, name=name)
    return perturb(model, seed=seed)


def xlora_model(
    build: Callable[[], nn.Module] = tiny_llama,
    experts: dict[str, SpectralAdapter] | None = None,
    **options: object,
) -> XLoRAModel:
    """A tiny X-LoRA model over perturbed experts."""
    model = with_experts(base_model(build), experts)
    names: Sequence[str] = list(experts or EXPERTS)
    return XLoRAModel(model, XLoRAConfig(experts=names, **options))  # type: ignore[arg-type]


def outputs(model: nn.Module, tokens: Tensor | None = None) -> Tensor:
    """Logits (or the last hidden state) without gradients."""
    with torch.no_grad():
        out = model(input_ids=token_batch() if tokens is None else tokens)
    result = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert isinstance(result, Tensor)
    return result
