"""Configs of the tiny randomly initialised transformers models the tests build.

One place for the sizes (hidden 32, 2 layers, 4 heads, MLP 64): every suite
builds its LLaMA, GPT-2 and BERT from these, with its own vocabulary or
position count as overrides. Nothing is ever downloaded.
"""

from __future__ import annotations

from typing import Any

HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64


def llama_config(**overrides: Any) -> Any:
    """A LlamaConfig: hidden 32, 2 layers, 4 heads (2 key/value heads), MLP 64."""
    from transformers import LlamaConfig

    values: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
    }
    return LlamaConfig(**(values | overrides))


def gpt2_config(**overrides: Any) -> Any:
    """A GPT2Config (projections are transformers' ``Conv1D``): n_embd 32, 2 layers, 4 heads."""
    from transformers import GPT2Config

    values: dict[str, Any] = {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS}
    return GPT2Config(**(values | overrides))


def bert_config(**overrides: Any) -> Any:
    """A BertConfig: hidden 32, 2 layers, 4 heads, intermediate 64."""
    from transformers import BertConfig

    values: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
    }
    return BertConfig(**(values | overrides))
