"""Run the demo tests single-threaded: their tensors are tiny, and on a shared or
oversubscribed CPU torch's intra-op threads spin-wait on each other."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
