"""One layer, many named adapters, PEFT's semantics, through both front doors.

Every check runs through ``selora.inject`` ("native") and through PEFT's
``get_peft_model`` ("peft"): the two build the same ``SpectralLayer``, so the
numbers must agree with the dense float64-free oracles below (the forward of
the unmerged model is the reference for merging; running each row alone is
the reference for a mixed batch).
"""

from __future__ import annotations

import threading

import pytest
import tiny_transformers as tt
import torch
from torch import nn

import selora
from selora import SpectralAdapter
from selora.integrations.peft import SeloraConfig

peft = pytest.importorskip("peft")

DOORS = ("native", "peft")
BASES_OF_ADAPTATION = ("lora", "dora", "hira")
SPECTRAL = (None, *selora.list_bases())
MODELS = ("mlp", "llama", "gpt2")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return out


def _model(kind: str) -> tuple[nn.Module, torch.Tensor, list[str]]:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(), torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), ["fc1", "fc2"]
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    if kind == "llama":
        config = tt.llama_config(vocab_size=64, max_position_embeddings=32)
        return LlamaForCausalLM(config).float(), ids, ["q_proj", "v_proj", "down_proj"]
    config = tt.gpt2_config(vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config).float(), ids, ["c_attn", "c_fc"]


def _out(model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    result = model(x, **kwargs) if x.is_floating_point() else model(input_ids=x, **kwargs)
    logits = result if isinstance(result, torch.Tensor) else result.logits
    assert isinstance(logits, torch.Tensor)
    return logits


def _adapter(basis: str | None, base: str, targets: list[str], seed: int = 0) -> SpectralAdapter:
    return SpectralAdapter(basis=basis, base=base, r=4, alpha=8, seed=seed, target_modules=targets)


def _adapt(model: nn.Module, door: str, adapters: dict[str, SpectralAdapter]) -> nn.Module:
    names = list(adapters)
    if door == "native":
        for name in names:
            selora.inject(model, adapters[name], name=name)
        return model
    first = SeloraConfig.from_spectral_adapter(adapters[names[0]])
    wrapped = peft.get_peft_model(model, first, adapter_name=names[0])
    for name in names[1:]:
        wrapped.add_adapter(name, SeloraConfig.from_spectral_adapter(adapters[name]))
    return wrapped


def _layers(model: nn.Module) -> list[selora.SpectralLayer]:
    return [m for m in model.modules() if isinstance(m, selora.SpectralLayer)]


def _set_active(model: nn.Module, door: str, names: list[str]) -> None:
    if door == "native":
        selora.set_adapter(model, names)
    else:
        model.base_model.set_adapter(names)


def _merge(model: nn.Module, door: str, names: list[str] | None, safe: bool = False) -> None:
    if door == "native":
        selora.merge(model, names, safe=safe)
    else:
        model.base_model.merge_adapter(names, safe_merge=safe)


def _unmerge(model: nn.Module, door: str) -> None:
    if door == "native":
        selora.unmerge(model)
    else:
        model.base_model.unmerge_adapter()


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in _layers(model):
        for name, p in sorted(layer.selora_units.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
            p.add_(noise.to(p.dtype))
            assert name  # every unit parameter moves, so B != 0


def _weights(model: nn.Module) -> dict[int, torch.Tensor]:
    return {id(layer): layer.weight.detach().clone() for layer in _layers(model)}


# ------------------------------------------------------------------ merging equals the forward


PAIRS = [("lora", "dora"), ("dora", "hira"), ("hira", "lora"), ("dora", "dora")]


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("basis", SPECTRAL)
def test_merge_then_unmerge_equals_the_forward_one_and_several(
    door: str, kind: str, basis: str | None
) -> None:
    for combo in [(b,) for b in BASES_OF_ADAPTATION] + PAIRS:
        model, x, targets = _model(kind)
        model.eval()
        adapters = {f"a{i}": _adapter(basis, base, targets, seed=i) for i, base in enumerate(combo)}
        model = _adapt(model, door, adapters)
        _perturb(model)
        _set_active(model, door, list(adapters))
        with torch.no_grad():
            expected = _out(model, x)
            w0 = _weights(model)
            _merge(model, door, None)
            assert all(layer.merged_adapters == list(adapters) for layer in _layers(model))
            merged = _out(model, x)
            torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5, msg=str(combo))
            _unmerge(model, door)
            assert not any(layer.merged for layer in _layers(model))
            torch.testing.assert_close(_out(model, x), expected, rtol=1e-5, atol=1e-5)
            if len(combo) == 1:
                # several adapters: W0 = (W - sum C) / (1 + sum S) cancels, so a few entries
                # round further (the outputs above still agree); one adapter stays tight
                for layer in _layers(model):
                    w = layer.weight
                    torch.testing.assert_close(w, w0[id(layer)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("door", DOORS)
def test_merging_one_adapter_then_another_equals_merging_both(door: str) -> None:
    model, x, targets = _model("mlp")
    adapters = {"a": _adapter("dct", "dora", targets), "b": _adapter("haar", "hira", targets, 1)}
    model = _adapt(model, door, adapters).eval()
    _perturb(model)
    _set_active(model, door, ["a", "b"])
    with torch.no_grad():
        expected = _out(model, x)
        _merge(model, door, ["a"])
        _merge(model, door, ["b"])
        torch.testing.assert_close(_out(model, x), expected, rtol=1e-5, atol=1e-5)


def test_a_float64_layer_merges_in_float64_through_both_doors() -> None:
    for door in DOORS:
        model, x, targets = _model("mlp")
        model = model.double()
        model = _adapt(model, door, {"a": _adapter("fft", "dora", targets)}).eval()
        _perturb(model)
        with torch.no_grad():
            expected = _out(model, x.double())
            w0 = _weights(model)
            _merge(model, door, None)
            torch.testing.assert_close(_out(model, x.double()), expected, rtol=1e-12, atol=1e-12)
            _unmerge(model, door)
            for layer in _layers(model):
                torch.testing.assert_close(layer.weight, w0[id(layer)], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ safe merge


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_a_non_finite_delta_and_changes_nothing(
    door: str, kind: str, bad: float
) -> None:
    for basis in SPECTRAL:
        for base in BASES_OF_ADAPTATION:
            model, _, targets = _model(kind)
            model = _adapt(model, door, {"a": _adapter(basis, base, targets)}).eval()
            _perturb(model)
            layer = _layers(model)[-1]
            factor = layer.unit("a").lora_B
            with torch.no_grad():
                tensor = factor.weight if basis is None else factor.coefficients
                tensor.view(-1)[0] = bad
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(ValueError, match="NaN or inf"):
                _merge(model, door, None, safe=True)
            after = model.state_dict()
            assert before.keys() == after.keys()
            assert all(
                torch.equal(before[k], after[k]) or not torch.isfinite(before[k]).all()
                for k in before
            ), (basis, base)
            assert not any(layer.merged for layer in _layers(model)), (basis, base)


# ------------------------------------------------------------------ mixed batches


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("kind", MODELS)
def test_a_mixed_batch_equals_each_row_alone(door: str, kind: str) -> None:
    model, x, targets = _model(kind)
    adapters = {
        "a": _adapter("fft", "lora", targets),
        "b": _adapter("db4", "dora", targets, 1),
        "c": _adapter(None, "hira", targets[:1], 2),
    }
    model = _adapt(model, door, adapters).eval()
    _perturb(model)
    names = ["b", "__base__", "a", "c"]
    with torch.no_grad():
        mixed = _out(model, x, adapter_names=names)
        for row, name in enumerate(names):
            if name == "__base__":
                ctx = (
                    selora.disable_adapters(model) if door == "native" else model.disable_adapter()
                )
                with ctx:
                    alone = _out(model, x[row : row + 1])
            else:
                _set_active(model, door, [name])
                alone = _out(model, x[row : row + 1])
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(mixed[0], mixed[2])  # the adapters differ: the check can fail


@pytest.mark.parametrize("door", DOORS)
def test_mixed_batches_follow_peft_rules(door: str) -> None:
    model, x, targets = _model("mlp")
    model = _adapt(model, door, {"a": _adapter("dct", "lora", targets)})
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        _out(model, x, adapter_names=["a"] * 4)
    model.eval()
    with pytest.raises(ValueError, match="non-existing adapter"):
        _out(model, x, adapter_names=["a", "zz", "a", "a"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        _out(model, x, adapter_names=["a", "a"])
    _merge(model, door, None)
    with pytest.raises(ValueError, match="merged adapters"):
        _out(model, x, adapter_names=["a"] * 4)


def test_mixed_batches_from_four_threads_equal_single_threaded() -> None:
    model, x, targets = _model("mlp")
    for i, name in enumerate("abc"):
        selora.inject(model, _adapter("fft", "lora", targets, i), name=name)
    model.eval()
    _perturb(model)
    routings = [list("abca"), list("cbaa"), ["__base__", "a", "b", "c"], list("bbbb")]
    with torch.no_grad():
        expected = [_out(model, x, adapter_names=r) for r in routings]
        plain = _out(model, x)
    errors: list[str] = []

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(25):
                if not torch.equal(_out(model, x, adapter_names=routings[i]), expected[i]):
                    errors.append(f"thread {i}: routed output differs")
                if not torch.equal(_out(model, x), plain):
                    errors.append(f"thread {i}: unrouted output differs")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# ------------------------------------------------------------------ set, delete, disable, train


@pytest.mark.parametrize("door", DOORS)
def test_set_delete_disable_and_training_moves_only_the_active_adapter(door: str) -> None:
    model, x, targets = _model("gpt2")
    base_out = _out(model.eval(), x).detach()
    model = _adapt(
        model, door, {"a": _adapter("fft", "dora", targets), "b": _adapter("haar", "lora", targets)}
    )
    _perturb(model)
    model.eval()
    with torch.no_grad():
        only_a = _out(model, x)
        _set_active(model, door, ["b"])
        only_b = _out(model, x)
        assert not torch.allclose(only_a, only_b)
        ctx = selora.disable_adapters(model) if door == "native" else model.disable_adapter()
        with ctx:
            torch.testing.assert_close(_out(model, x), base_out, rtol=0, atol=0)
    # training: one step moves exactly the active adapter's tensors
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".selora_units.b." in n for n in trainable), sorted(trainable)[:3]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _out(model, x).square().mean().backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= trainable
    # delete: the other adapter stays and computes what it computed
    if door == "native":
        selora.delete_adapter(model, "b")
        assert selora.active_adapters(model) == ["a"]
    else:
        model.delete_adapter("b")
        model.set_adapter("a")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(model, x), only_a, rtol=0, atol=0)
    assert all(list(layer.selora_units) == ["a"] for layer in _layers(model))


def test_deleting_the_last_native_adapter_restores_the_plain_model() -> None:
    model, x, targets = _model("llama")
    model.eval()
    expected = _out(model, x).detach()
    selora.inject(model, _adapter("dct", "lora", targets))
    selora.delete_adapter(model, "default")
    assert not _layers(model) and not hasattr(model, "selora_adapters")
    torch.testing.assert_close(_out(model, x), expected, rtol=0, atol=0)


# ------------------------------------------------------------------ dtype


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_on_and_off(door: str, autocast: bool) -> None:
    model, x, targets = _model("llama")
    model = model.to(torch.bfloat16)
    adapter = SpectralAdapter(
        basis="fft", r=4, target_modules=targets, autocast_adapter_dtype=autocast
    )
    model = _adapt(model, door, {"a": adapter})
    dtypes = {p.dtype for layer in _layers(model) for p in layer.selora_units.parameters()}
    assert dtypes == {torch.float32 if autocast else torch.bfloat16}
    _perturb(model)
    model.eval()
    with torch.no_grad():
        out = _out(model, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_init_weights_false_changes_the_output_and_true_does_not() -> None:
    for init in (True, False):
        model, x, targets = _model("mlp")
        model.eval()
        expected = _out(model, x).detach()
        adapter = SpectralAdapter(basis="dct", r=4, target_modules=targets, init_weights=init)
        selora.inject(model, adapter)
        with torch.no_grad():
            same = torch.equal(_out(model, x), expected)
        assert same == init


# ------------------------------------------------------------------ PEFT habits


def test_get_peft_model_failing_midway_leaves_the_model_unwrapped() -> None:
    model = nn.Sequential()
    model.add_module("big", nn.Linear(64, 64))
    model.add_module("small", nn.Linear(8, 6))
    flags = [p.requires_grad for p in model.parameters()]
    attributes = [
        (m, set(vars(m)), {k: len(v) for k, v in vars(m).items() if isinstance(v, dict)})
        for m in model.modules()
    ]
    config = SeloraConfig(basis="fft", r=4, n_coeffs=100, target_modules=["big", "small"])
    with pytest.raises(ValueError, match="small"):
        peft.get_peft_model(model, config)
    assert isinstance(model.big, nn.Linear) and isinstance(model.small, nn.Linear)
    assert not _layers(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    for module, names, sizes in attributes:  # no attribute, hook or registry left behind
        assert set(vars(module)) == names
        assert {k: len(v) for k, v in vars(module).items() if isinstance(v, dict)} == sizes


def test_default_targets_follow_peft_table_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.utils import constants

    table = dict(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    table["llama"] = ["o_proj"]
    monkeypatch.setattr(constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", table)
    model, _, _ = _model("llama")
    wrapped = peft.get_peft_model(model, SeloraConfig(basis="fft", r=4, target_modules=None))
    names = {
        n.rpartition(".")[2]
        for n, m in wrapped.named_modules()
        if isinstance(m, nn.Module) and isinstance(m, selora.SpectralLayer)
    }
    assert names == {"o_proj"}


def test_save_pretrained_of_an_injected_model_is_refused_before_writing(tmp_path) -> None:
    model, _x, targets = _model("llama")
    selora.inject(model, _adapter("fft", "lora", targets))
    with pytest.raises(RuntimeError, match=r"selora\.save_adapter.*selora\.unload"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    selora.unload(model)
    model.save_pretrained(tmp_path / "out")  # a plain model again
    assert (tmp_path / "out" / "config.json").exists()


# ------------------------------------------------------------------ PEFT's own test suite, found


def test_merging_twice_warns_as_peft_does() -> None:
    model, _, targets = _model("mlp")
    model = _adapt(model, "peft", {"a": _adapter("fft", "lora", targets)})
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()


def test_a_layer_added_to_an_eval_model_follows_its_mode() -> None:
    model, x, _targets = _model("mlp")
    model = _adapt(model, "peft", {"a": _adapter("fft", "lora", ["fc1"])}).eval()
    model.add_adapter("b", SeloraConfig.from_spectral_adapter(_adapter("dct", "lora", ["fc2"])))
    assert not any(layer.training for layer in _layers(model))
    _perturb(model)
    with torch.no_grad():
        mixed = _out(model, x, adapter_names=["a", "b", "__base__", "b"])
    assert mixed.shape == (4, 4)


def test_a_mixed_batch_while_merged_names_peft_s_method() -> None:
    model, x, targets = _model("mlp")
    model = _adapt(model, "peft", {"a": _adapter("fft", "lora", targets)}).eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        _out(model, x, adapter_names=["a"] * 4)


def test_saving_sees_through_wrapper_modules() -> None:
    """FSDP / activation checkpointing insert modules that state_dict() leaves out of keys."""
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model, _, targets = _model("llama")
    model = _adapt(model, "peft", {"default": _adapter("fft", "dora", targets)})
    layers = model.base_model.model.model.layers
    layers[0] = checkpoint_wrapper(layers[0])
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    saved = get_peft_model_state_dict(model)
    coefficients = [k for k in saved if k.endswith("coefficients")]
    expected = sum(1 for n, _ in model.named_parameters() if n.endswith("coefficients"))
    assert len(coefficients) == expected > 0
    assert any(".layers.0." in k for k in coefficients)
