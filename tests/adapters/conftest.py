"""Fixtures shared by the adapter tests (the helpers live in adapters_testkit.py).

Fixtures: ``tiny_llama``, ``tiny_gpt2``, ``tiny_bert`` (factories: call them to
get a fresh random model, hidden 32, 2 layers, never downloaded) and
``registered_base_cleanup`` (a list; base names appended to it are
unregistered after the test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import adapters_testkit as kit
import pytest
from torch import nn

import selora

ModelFactory = Callable[..., nn.Module]


@pytest.fixture
def tiny_llama() -> ModelFactory:
    return kit.tiny_llama


@pytest.fixture
def tiny_gpt2() -> ModelFactory:
    return kit.tiny_gpt2


@pytest.fixture
def tiny_bert() -> ModelFactory:
    return kit.tiny_bert


@pytest.fixture
def registered_base_cleanup() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        if name in selora.list_adapter_bases():
            selora.unregister_base(name)
