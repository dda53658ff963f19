"""Trainable-parameter counts against the papers' arithmetic (models built on the meta device).

Percent = trainable / all parameters including the adapter (PEFT's
``print_trainable_parameters`` convention), rounded to 2 decimals.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

import selora
from selora import SpectralAdapter

transformers = pytest.importorskip("transformers")

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
R = 32


def _llama(kind: str) -> nn.Module:
    if kind == "llama2-7b":
        config = transformers.LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=32000,
        )
    else:
        config = transformers.LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


# Base sizes as published: LLaMA-2-7B 6,738,415,616; LLaMA-3-8B 8,030,261,248.
BASE_PARAMS = {"llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248}
# (d_in, d_out) of q, k, v, up, down.
SHAPES = {
    "llama2-7b": [(4096, 4096)] * 3 + [(4096, 11008), (11008, 4096)],
    "llama3-8b": [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 14336), (14336, 4096)],
}


def _expected_trainable(kind: str, ratio: float | None) -> int:
    per_layer = 0
    for d_in, d_out in SHAPES[kind]:
        for size in (R * d_in, d_out * R):
            per_layer += size if ratio is None else math.floor((1 - ratio) * size)
    return 32 * per_layer


@pytest.mark.parametrize(
    ("kind", "basis", "ratio", "percent"),
    [
        ("llama2-7b", None, None, 0.83),
        ("llama3-8b", None, None, 0.70),
        ("llama2-7b", "fft", 0.4, 0.50),
        ("llama3-8b", "fft", 0.6, 0.28),
        ("llama2-7b", "db4", 0.4, 0.50),
        ("llama3-8b", "dct", 0.6, 0.28),
    ],
)
def test_llama_percentages(
    kind: str, basis: str | None, ratio: float | None, percent: float
) -> None:
    model = _llama(kind)
    assert sum(p.numel() for p in model.parameters()) == BASE_PARAMS[kind]
    budget = {} if ratio is None else {"sparse_ratio": ratio}
    adapter = SpectralAdapter(basis=basis, base="lora", r=R, target_modules=TARGETS, **budget)  # type: ignore[arg-type]
    start = time.perf_counter()
    selora.inject(model, adapter)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"inject on the meta device took {elapsed:.1f} s"
    assert len(list(selora.adapter_layers(model))) == 32 * 5
    assert all(p.is_meta for p in model.parameters())
    trainable = selora.trainable_parameters(model)
    assert trainable == _expected_trainable(kind, ratio)
    total = sum(p.numel() for p in model.parameters())
    assert total == BASE_PARAMS[kind] + trainable
    assert round(100 * trainable / total, 2) == percent
    summary = selora.parameter_summary(model)
    assert f"trainable params: {trainable:,d}" in summary


def test_dora_adds_one_magnitude_per_output_row() -> None:
    model = _llama("llama3-8b")
    selora.inject(model, SpectralAdapter(basis=None, base="dora", r=R, target_modules=TARGETS))
    rows = 32 * sum(d_out for _, d_out in SHAPES["llama3-8b"])
    assert selora.trainable_parameters(model) == _expected_trainable("llama3-8b", None) + rows


def test_roberta_base_query_value_fora_budget() -> None:
    config = transformers.RobertaConfig()
    assert (config.num_hidden_layers, config.hidden_size) == (12, 768)
    with torch.device("meta"):
        model = transformers.RobertaModel(config)
    selora.inject(
        model, SpectralAdapter(basis="fft", r=8, n_coeffs=500, target_modules=("query", "value"))
    )
    assert len(list(selora.adapter_layers(model))) == 24
    assert selora.trainable_parameters(model) == 24_000


def test_meta_layers_skip_calibration_and_keep_the_shared_locations() -> None:
    model = _llama("llama2-7b")
    selora.inject(
        model, SpectralAdapter(basis="fft", r=R, sparse_ratio=0.4, target_modules=TARGETS)
    )
    layers = [layer for _, layer in selora.adapter_layers(model)]
    q0, q1 = layers[0].adapter.lora_A, layers[5].adapter.lora_A
    assert isinstance(q0, selora.SparseSpectrum) and isinstance(q1, selora.SparseSpectrum)
    assert q0.coefficients.is_meta
    # Same shape, same seed: the same locations (on the meta device they carry no values).
    assert q0.indices.shape == q1.indices.shape == (math.floor(0.6 * R * 4096),)
