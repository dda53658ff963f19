"""The transformers behaviour that X-LoRA's cached generation relies on, one test each.

X-LoRA's scoring pass keeps its own KV history inside the model's cache object
(``selora.xlora.passes``). That is correct only while transformers
behaves as these tests check. When an upstream release changes one of them,
the failing test names the behaviour, instead of generation silently giving
other tokens.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
from torch import nn
from xlora_testkit import tiny_llama, token_batch

from selora.xlora.passes import CACHE_KEYWORDS

transformers = pytest.importorskip("transformers")
from transformers import Cache, DynamicCache  # noqa: E402

UPSTREAM = f"transformers {transformers.__version__} changed a behaviour X-LoRA relies on: "


def model() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama().eval()


def cache_keyword(net: nn.Module) -> str:
    params = inspect.signature(net.forward).parameters
    names = [name for name in CACHE_KEYWORDS if name in params]
    assert names, (
        UPSTREAM + f"the forward takes the KV cache under none of {CACHE_KEYWORDS} "
        f"(it takes {list(params)}); add the new name to CACHE_KEYWORDS"
    )
    return names[0]


def filled_cache(net: nn.Module, length: int = 5, batch: int = 2) -> Cache:
    cache = DynamicCache()
    with torch.no_grad():
        net(input_ids=token_batch(batch, length, seed=1), **{cache_keyword(net): cache})
    return cache


def keys(cache: Cache, layers: slice) -> list[torch.Tensor]:
    return [layer.keys.clone() for layer in cache.layers[layers]]


def test_generate_passes_the_cache_by_keyword() -> None:
    net = model()
    seen: list[dict[str, Any]] = []
    net.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True)
    net.generate(token_batch(1, 4), max_new_tokens=2, do_sample=False, pad_token_id=0)
    for call in seen:
        given = [name for name in CACHE_KEYWORDS if isinstance(call.get(name), Cache)]
        assert len(given) == 1, (
            UPSTREAM + f"generate no longer passes the KV cache to the model's forward as one "
            f"keyword of {CACHE_KEYWORDS} holding a transformers.Cache (keywords: {list(call)})"
        )


def test_forward_extends_and_returns_the_cache_object_it_is_given() -> None:
    net = model()
    cache = DynamicCache()
    with torch.no_grad():
        out = net(input_ids=token_batch(2, 5), **{cache_keyword(net): cache}, use_cache=True)
    returned = [getattr(out, name, None) for name in CACHE_KEYWORDS]
    assert any(r is cache for r in returned), (
        UPSTREAM + "the forward no longer returns the very cache object it was given, so the "
        "scoring history X-LoRA appends to it would be lost"
    )
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize(
    ("edit", "argument"),
    [
        ("reorder_cache", torch.tensor([1, 0])),
        ("crop", -2),
        ("batch_select_indices", torch.tensor([1])),
        ("batch_repeat_interleave", 2),
    ],
)
def test_cache_edits_walk_every_entry_of_layers(edit: str, argument: Any) -> None:
    """``generate`` edits the cache (beams, crops) through public methods that walk ``layers``."""
    cache = filled_cache(model())
    n = len(cache.layers)
    cache.layers.extend([copy.deepcopy(layer) for layer in cache.layers])  # a twin history
    getattr(cache, edit)(argument)
    for own, twin in zip(keys(cache, slice(0, n)), keys(cache, slice(n, None)), strict=True):
        assert torch.equal(own, twin), (
            UPSTREAM + f"Cache.{edit} no longer edits every entry of Cache.layers alike, so "
            "X-LoRA's scoring history would drift from the model's"
        )


def test_beam_search_reorders_through_cache_reorder_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.Tensor] = []
    original = Cache.reorder_cache

    def spy(self: Cache, beam_idx: torch.Tensor) -> None:
        calls.append(beam_idx)
        original(self, beam_idx)

    monkeypatch.setattr(Cache, "reorder_cache", spy)
    net = model()
    prompt = token_batch(2, 4, seed=3)
    net.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert calls, (
        UPSTREAM + "beam search no longer reorders the KV cache through Cache.reorder_cache, "
        "which is what reorders X-LoRA's scoring history with the model's"
    )


def test_a_shallow_copy_over_other_layers_is_a_working_cache() -> None:
    """The scoring pass runs on ``copy.copy(cache)`` whose ``layers`` are other layer objects."""
    net = model()
    keyword = cache_keyword(net)
    cache = filled_cache(net)
    view = copy.copy(cache)
    view.layers = [copy.deepcopy(layer) for layer in cache.layers]
    step = token_batch(2, 1, seed=4)
    with torch.no_grad():
        through_view = net(input_ids=step, **{keyword: view}).logits
        reference = net(input_ids=step, **{keyword: filled_cache(net)}).logits
    torch.testing.assert_close(through_view, reference, rtol=0, atol=0)
    assert view.layers[0].get_seq_length() == 6 and cache.get_seq_length() == 5, (
        UPSTREAM + "a shallow copy of a Cache with its own layers list no longer extends those "
        "layers in place, leaving the original cache alone"
    )
