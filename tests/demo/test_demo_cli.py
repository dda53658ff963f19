"""A smoke run of ``python -m selora.demo`` on a tiny subset, and the pieces it uses."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import selora
from selora.demo.cli import build_methods, build_parser, main
from selora.demo.model import HIDDEN_SIZE, N_LAYERS
from selora.demo.train import Method, SentimentTask, TrainConfig, run

HEAD = HIDDEN_SIZE + 1  # nn.Linear(384, 1)
TARGETS = 2  # query and value in each layer


def lora_count(r: int) -> int:
    """Dense LoRA: A (r x 384) and B (384 x r) per adapted layer."""
    return 2 * r * HIDDEN_SIZE * TARGETS * N_LAYERS + HEAD


def selora_count(r: int, sparse_ratio: float) -> int:
    """SeLoRA: floor((1 - eta) * size) coefficients per factor."""
    per_factor = math.floor((1 - sparse_ratio) * r * HIDDEN_SIZE)
    return 2 * per_factor * TARGETS * N_LAYERS + HEAD


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("method",) and not set(cells[0]) <= {"-", ":"}:
            rows[cells[0]] = cells
    return rows


def test_smoke_run_prints_table_and_writes_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png, js = tmp_path / "plot" / "demo.png", tmp_path / "demo.json"
    argv = ["--max-train", "64", "--max-test", "48", "--epochs", "1", "--rank", "4"]
    argv += ["--output", str(png), "--json", str(js), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out

    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    rows = _rows(out)
    assert list(rows) == ["head only", "lora", "lora+fft", "lora+coif"]
    trainable = {name: int(cells[1].replace(",", "")) for name, cells in rows.items()}
    assert trainable == {
        "head only": HEAD,
        "lora": lora_count(4),  # 2 * 4 * 384 * 2 * 6 + 385 = 37,249
        "lora+fft": selora_count(4, 0.6),
        "lora+coif": selora_count(4, 0.6),
    }
    for cells in rows.values():
        for value in cells[2:6]:
            assert re.fullmatch(r"-?\d\.\d{4}", value), value
        assert 0.0 <= float(cells[4]) <= 1.0  # sign accuracy

    payload = json.loads(js.read_text())
    assert [r["method"] for r in payload["runs"]] == list(rows)
    assert all(len(r["epoch_losses"]) == 1 for r in payload["runs"])
    assert payload["meta"]["config"]["epochs"] == 1


def test_only_the_adapter_and_head_train() -> None:
    task = SentimentTask(max_train=8, max_test=8)
    model = task.fresh_model()
    method = Method(basis="fft", r=8, sparse_ratio=0.6)
    selora.inject(model, method.adapter(seed=0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    encoder = [n for n in names if not n.startswith("head")]
    assert encoder and all(re.search(r"\.(query|value)\.", n) for n in encoder)
    assert selora.trainable_parameters(model) == selora_count(8, 0.6)
    # the adapted model equals the base model at init (B = 0)
    base = task.fresh_model()
    base.head.load_state_dict(model.head.state_dict())
    ids, mask, _ = task.test.batch(torch.arange(8))
    model.eval()
    base.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), base(ids, mask))


def test_build_methods_and_budgets() -> None:
    methods = build_methods(["none", "fft"], ["lora", "dora"], 16, n_coeffs=500)
    assert [m.label for m in methods] == ["head only", "lora", "lora+fft", "dora", "dora+fft"]
    assert methods[2].n_coeffs == 500 and methods[2].sparse_ratio is None
    default = build_methods(["coif"], ["lora"], 8, head_only=False)
    assert [m.sparse_ratio for m in default] == [0.6]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--sparse-ratio", "0.5", "--n-coeffs", "10"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--sparse-ratio", "1.5"])


def test_one_learning_rate_for_every_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a transformers.Trainer user: no per-parameter learning rates (selora's
    # coefficients are on LoRA's scale, so none are needed).
    assert "lr_scaling" not in TrainConfig.__dataclass_fields__
    assert not hasattr(selora.demo, "coefficient_lr_multiplier")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lr-scaling", "none"])
    optimizers: list[torch.optim.Optimizer] = []
    adamw = torch.optim.AdamW

    def recording(*args: object, **kwargs: object) -> torch.optim.Optimizer:
        optimizer = adamw(*args, **kwargs)  # type: ignore[arg-type]
        optimizers.append(optimizer)
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    task = SentimentTask(max_train=8, max_test=8)
    config = TrainConfig(epochs=1, lr=3e-3, batch_size=8, progress=False)
    result = run(task, Method(basis="fft", r=4, sparse_ratio=0.6), 0, config)
    assert len(optimizers) == 1
    (group,) = optimizers[0].param_groups
    assert group["initial_lr"] == 3e-3
    assert sum(p.numel() for p in group["params"]) == result.trainable == selora_count(4, 0.6)
