"""Fixtures for every test folder.

Each folder has no ``__init__.py``: pytest puts the folder (and this one) on
``sys.path``, so helper modules need names that are unique across folders
(``tiny_transformers``, ``adapters_testkit``, ``tiny_models``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The tensors here are tiny, so a second intra-op thread buys nothing, while
    # on a busy CPU each small multi-threaded op waits for its descheduled
    # partner at OpenMP's barrier (measured 8x slower on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
