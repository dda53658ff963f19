"""Numerics and speed contracts: bfloat16, the eval cache, checkpointing, torch.compile."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import adapters_testkit as kit
import pytest
import torch
from torch import Tensor, nn

import selora
from selora import SpectralAdapter
from selora.spectral_bases import SparseSpectrum


@contextmanager
def spy_transforms(model: nn.Module) -> Iterator[list[torch.dtype]]:
    """Record the dtype every layer's basis transforms in (``synthesize`` and ``inverse``)."""
    seen: list[torch.dtype] = []
    patched = []
    for _, layer in selora.adapter_layers(model):
        for factor in (layer.adapter.lora_A, layer.adapter.lora_B):
            if isinstance(factor, SparseSpectrum) and factor.basis not in [b for b, _ in patched]:
                inverse, synthesize = factor.basis.inverse, factor.basis.synthesize

                def spy_inverse(spectrum: Tensor, _original=inverse) -> Tensor:  # type: ignore[no-untyped-def]
                    seen.append(spectrum.dtype)
                    out: Tensor = _original(spectrum)
                    return out

                def spy_synthesize(coefficients, indices, shape, _original=synthesize):  # type: ignore[no-untyped-def]
                    seen.append(coefficients.dtype)
                    return _original(coefficients, indices, shape)

                factor.basis.inverse = spy_inverse  # type: ignore[method-assign]
                factor.basis.synthesize = spy_synthesize  # type: ignore[method-assign]
                patched.append((factor.basis, (inverse, synthesize)))
    try:
        yield seen
    finally:
        for basis, (inverse, synthesize) in patched:
            basis.inverse = inverse  # type: ignore[method-assign]
            basis.synthesize = synthesize  # type: ignore[method-assign]


def _causal_lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    loss: Tensor = model(ids, labels=ids).loss
    return loss


@pytest.mark.parametrize("basis", ["fft", "db4", None], ids=str)
@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_bfloat16_model_trains(base: str, basis: str | None) -> None:
    torch.manual_seed(0)
    model = kit.tiny_llama().to(torch.bfloat16)
    selora.inject(
        model, SpectralAdapter(basis=basis, base=base, r=4, target_modules=["q_proj", "v_proj"])
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    kit.perturb(model, 0.05)
    ids = kit.token_batch()
    with spy_transforms(model) as seen:
        layer = model.model.layers[0].self_attn.q_proj
        out = layer(torch.randn(2, 8, 32, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
        loss = _causal_lm_loss(model, ids)
    if basis is not None:
        assert seen and set(seen) == {torch.float32}
    assert loss.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(loss)
    loss.backward()
    for p in trainable:
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    opt = torch.optim.Adam(trainable, lr=1e-3)
    opt.step()
    assert torch.isfinite(_causal_lm_loss(model, ids))


@pytest.mark.parametrize("base", kit.ADAPTATION_BASES)
def test_eval_cache_matches_uncached_and_is_dropped_on_change(base: str) -> None:
    torch.manual_seed(0)
    model = kit.TinyMLP()
    selora.inject(model, SpectralAdapter(basis="fft", base=base, r=4, alpha=8))
    kit.perturb(model, 0.3)
    x = torch.randn(5, 8)
    uncached = model(x).detach()
    units = [layer.adapter for _, layer in selora.adapter_layers(model)]
    model.eval()
    with spy_transforms(model) as calls, torch.no_grad():
        first = model(x)
        n_first = len(calls)
        second = model(x)
        assert len(calls) == n_first > 0, "the second eval forward recomputed the factors"
    assert all(unit._cache is not None for unit in units)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)

    # An optimizer step (in eval mode) changes the coefficients in place: the cache must go.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after_step = model(x)
    with torch.enable_grad():
        fresh = model(x).detach()
    assert not torch.allclose(after_step, first)
    torch.testing.assert_close(after_step, fresh, rtol=0, atol=0)

    # load_state_dict copies in place too.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for unit in units:
            for p in unit.parameters():
                p.mul_(0.5)
        halved = model(x)
        model.load_state_dict(state)
        restored = model(x)
    assert not torch.allclose(halved, restored)
    torch.testing.assert_close(restored, after_step, rtol=0, atol=0)

    model.train()
    assert all(unit._cache is None for unit in units)


def test_no_cache_while_training_or_with_grad() -> None:
    model = selora.inject(kit.TinyMLP(), SpectralAdapter(basis="fft", r=4))
    units = [layer.adapter for _, layer in selora.adapter_layers(model)]
    x = torch.randn(3, 8)
    with torch.no_grad():
        model(x)  # training mode
    assert all(unit._cache is None for unit in units)
    model.eval()
    model(x)  # grad enabled
    assert all(unit._cache is None for unit in units)


def _checkpointing(model: nn.Module, reentrant: bool) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("base", ["lora", "dora"])
def test_gradient_checkpointing_gives_the_same_gradients(base: str, reentrant: bool) -> None:
    torch.manual_seed(0)
    model = kit.tiny_llama()
    selora.inject(
        model, SpectralAdapter(basis="haar", base=base, r=4, target_modules=["q_proj", "down_proj"])
    )
    kit.perturb(model, 0.1)
    ckpt = copy.deepcopy(model)
    _checkpointing(ckpt, reentrant)
    assert ckpt.is_gradient_checkpointing
    ids = kit.token_batch()
    loss = _causal_lm_loss(model, ids)
    loss_ckpt = _causal_lm_loss(ckpt, ids)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    loss_ckpt.backward()
    pairs = [
        (n, p, q)
        for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters(), strict=True)
        if p.requires_grad
    ]
    assert pairs
    for name, p, q in pairs:
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def _compile_and_compare(backend: str) -> None:
    torch.manual_seed(0)
    model = kit.TinyMLP()
    selora.inject(model, SpectralAdapter(basis="fft", base="dora", r=4, alpha=8))
    kit.perturb(model, 0.3)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(6, 8)
    eager = model(x)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    eager.square().sum().backward()
    out.square().sum().backward()
    named = zip(model.named_parameters(), compiled_model.named_parameters(), strict=True)
    for (name, p), (_, q) in named:
        if p.requires_grad:
            assert q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torch_compile_graph_capture_matches_eager() -> None:
    """Dynamo + AOTAutograd tracing (no C++ code generation): fast enough for every run."""
    torch._dynamo.reset()
    _compile_and_compare("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    """The full inductor build: several minutes on a small CPU machine, hence slow."""
    torch._dynamo.reset()
    _compile_and_compare("inductor")
