"""Fixtures of the integration tests (PEFT bridge, Trainer)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

# tiny_models.py is imported by the tests and by the scripts they run in new processes.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _restore_rng() -> Iterator[None]:
    # The model builders seed torch's global RNG; keep other tests independent of it.
    with torch.random.fork_rng():
        yield
