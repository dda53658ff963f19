"""``unload()`` with a user base registered with ``mergeable=False`` (issue 12)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch
from adapters_testkit import TinyMLP, perturb
from torch import Tensor

import selora
from selora import AdaptationBase, SpectralAdapter, SpectralLayer
from selora.adapters import AdapterUnit, Update


@pytest.fixture
def unmergeable() -> Iterator[str]:
    @selora.register_base("unmergeable_test")
    class Gated(AdaptationBase):
        """:math:`y = W_0 x + b + \\tanh(s B A x)`: not a fixed matrix, so not mergeable."""

        mergeable: ClassVar[bool] = False

        def forward(
            self,
            unit: AdapterUnit,
            x: Tensor,
            base_out: Tensor,
            weight0: Tensor,
            bias: Tensor | None,
        ) -> Tensor:
            a, b = unit.factors(x.dtype)
            return base_out + torch.tanh(unit.scaling * (x @ a.T) @ b.T)

        def update(self, unit: AdapterUnit, weight0: Tensor | None) -> Update:
            raise RuntimeError("never called: not mergeable")

    try:
        yield "unmergeable_test"
    finally:
        selora.unregister_base("unmergeable_test")


def test_unload_puts_back_plain_layers_unmerged(unmergeable: str) -> None:
    torch.manual_seed(0)
    base = TinyMLP().eval()
    x = torch.randn(3, 8)
    targets = ["fc1", "fc2"]
    model = copy.deepcopy(base)
    selora.inject(
        model, SpectralAdapter(basis="fft", base=unmergeable, r=2, target_modules=targets)
    )
    selora.inject(model, SpectralAdapter(basis="dct", r=2, target_modules=targets), name="lora")
    perturb(model)
    selora.set_adapter(model, ["default", "lora"])
    with selora.disable_adapters(model):
        assert torch.equal(model(x), base(x))
    only_lora = copy.deepcopy(model)
    selora.set_adapter(only_lora, "lora")
    expected = only_lora(x)
    with pytest.warns(UserWarning, match=r"\['default'\] cannot be merged"):
        assert selora.unload(model) is model
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())
    torch.testing.assert_close(model(x), expected)  # the mergeable one merged, the other dropped
    plain = selora.inject(copy.deepcopy(base), SpectralAdapter(base=unmergeable, r=2))
    perturb(plain)
    with pytest.warns(UserWarning, match="cannot be merged"):
        selora.unload(plain)
    assert torch.equal(plain(x), base(x))
