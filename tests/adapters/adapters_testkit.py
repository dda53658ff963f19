"""Helpers shared by the adapter tests: tiny models (never downloaded) and oracles.

Import it as ``from adapters_testkit import ...`` (pytest puts this folder on
``sys.path``; the name is unique so it clashes with no other test folder).
conftest.py exposes the model factories as fixtures too. Kept stable:

* ``tiny_llama()``, ``tiny_gpt2()``, ``tiny_bert()``: random-init Hugging Face
  models, hidden size 32, 2 layers, float32, eval mode off (``train()``).
* ``TinyMLP``: a three-layer plain-torch model (``fc1``, ``act``, ``fc2``,
  ``head``) with a ``conv`` layer that selora must refuse.
* ``perturb(model, scale)``: add noise to every adapter parameter, so that
  ``B != 0`` and the adapter contributes.
* ``reference_factor(factor)``: the dense factor built straight from the
  formulas of design.md (numpy / scipy / pywt on the scattered coefficients).
* ``BASES`` (``list_bases()`` and ``None``), ``ADAPTATION_BASES``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_transformers as tt
import torch
from basis_oracles import ORACLES
from torch import nn

import selora
from selora.adapters import DenseFactor
from selora.spectral_bases import SparseSpectrum

BUILTIN_ADAPTATION_BASES = ("lora", "dora", "hira")
ADAPTATION_BASES = BUILTIN_ADAPTATION_BASES
SPECTRAL_BASES: tuple[str, ...] = tuple(selora.list_bases())
BASES: tuple[str | None, ...] = (None, *SPECTRAL_BASES)

# The wavelet behind each built-in wavelet basis (design.md, "The built-in bases").
WAVELETS = {"haar": "haar", "db4": "db4", "bior": "bior2.2", "coif": "coif1"}

TINY = {"hidden": tt.HIDDEN, "layers": tt.LAYERS, "heads": tt.HEADS, "vocab": 64}


def _hf_ready(model: nn.Module) -> nn.Module:
    model.float()
    model.train()
    return model


def tiny_llama(**overrides: object) -> nn.Module:
    """A random LLaMA: hidden 32, 2 layers, 4 heads (2 key/value heads), vocab 64."""
    from transformers import LlamaForCausalLM

    config = tt.llama_config(vocab_size=TINY["vocab"], max_position_embeddings=64, **overrides)
    return _hf_ready(LlamaForCausalLM(config))


def tiny_gpt2(**overrides: object) -> nn.Module:
    """A random GPT-2 (its projections are transformers' ``Conv1D``): n_embd 32, 2 layers."""
    from transformers import GPT2LMHeadModel

    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = tt.gpt2_config(vocab_size=TINY["vocab"], n_positions=64, **(no_dropout | overrides))
    return _hf_ready(GPT2LMHeadModel(config))


def tiny_bert(**overrides: object) -> nn.Module:
    """A random BERT encoder: hidden 32, 2 layers, 4 heads, vocab 64, no dropout."""
    from transformers import BertModel

    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = tt.bert_config(
        vocab_size=TINY["vocab"], max_position_embeddings=64, **(no_dropout | overrides)
    )
    return _hf_ready(BertModel(config))


class TinyMLP(nn.Module):
    """``fc1 -> act -> fc2 -> head`` on 8 features, plus a ``conv`` selora cannot adapt."""

    def __init__(self, d: int = 8, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out)
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.act(self.fc2(self.act(self.fc1(x)))))
        return out


def token_batch(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids for the tiny models."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab"], (batch, length), generator=gen)


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.5, seed: int = 0) -> nn.Module:
    """Add Gaussian noise to every adapter parameter (so B != 0); returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in selora.adapter_layers(model):
        for p in layer.selora_units.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_((scale * noise).to(p.dtype))
    return model


def scatter_numpy(
    indices: torch.Tensor, coefficients: torch.Tensor, shape: tuple[int, int]
) -> np.ndarray:
    """``F = zeros; F.flat[indices] = coefficients`` in float64 numpy."""
    spectrum = np.zeros(shape, dtype=np.float64)
    spectrum.flat[indices.cpu().numpy()] = coefficients.detach().double().cpu().numpy()
    return spectrum


def inverse_numpy(basis: str, spectrum: np.ndarray) -> np.ndarray:
    """The oracle inverse transform of design.md, in float64 numpy (``tests/basis_oracles``)."""
    oracle = ORACLES.get(basis)
    if oracle is None:
        pytest.fail(f"no float64 oracle for basis {basis!r}: add one to tests/basis_oracles.py")
    return np.asarray(oracle(spectrum))


def reference_factor(factor: nn.Module) -> torch.Tensor:
    """The dense factor in float64, computed without calling the module."""
    if isinstance(factor, DenseFactor):
        return factor.weight.detach().double().clone()
    assert isinstance(factor, SparseSpectrum)
    spectrum = scatter_numpy(factor.indices, factor.coefficients, factor.shape)
    matrix = factor.scale_factor * inverse_numpy(factor.basis.label(), spectrum)  # M = c T(F)
    return torch.from_numpy(matrix.copy())


def basis_matrix(basis: str, shape: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
    """The ``(m*n, k)`` float64 matrix of the oracle transform restricted to the active set.

    Column ``j`` is ``T(e_{indices[j]})`` flattened, so ``M.flatten() = basis_matrix @ s``:
    a differentiable float64 reference independent of the module.
    """
    k = indices.numel()
    columns = []
    for j in range(k):
        unit = torch.zeros(k, dtype=torch.float64)
        unit[j] = 1.0
        columns.append(inverse_numpy(basis, scatter_numpy(indices, unit, shape)).reshape(-1))
    return torch.from_numpy(np.stack(columns, axis=1))
