"""benchmarks/finetune.py: which methods each table runs, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from selora.demo.model import HIDDEN_SIZE

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "finetune.py"


@pytest.fixture(scope="module")
def finetune() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _adapter_params(r: int, keep: float | None = None) -> int:
    """Per adapted layer (d x d): A is r x d, B is d x r; SeLoRA keeps floor(keep * size) each."""
    size = r * HIDDEN_SIZE
    return 2 * (size if keep is None else math.floor(keep * size))


def test_matched_rank_is_the_closest_dense_rank(finetune: ModuleType) -> None:
    for selora_rank, ratio in [(32, 0.6), (16, 0.5), (64, 0.9), (8, 0.0)]:
        target = _adapter_params(selora_rank, 1 - ratio)
        brute = min(range(1, 200), key=lambda r: abs(_adapter_params(r) - target))
        assert finetune.matched_rank(selora_rank, ratio, HIDDEN_SIZE, HIDDEN_SIZE) == brute


def test_base_learning_rates(finetune: ModuleType) -> None:
    assert finetune.base_learning_rates(["hira=1e-2", "dora=3e-4"]) == {"hira": 1e-2, "dora": 3e-4}
    for bad in ["hira", "hira=", "=1e-2", "hira=abc", "hira=0", "hira=-1", "hira=nan"]:
        with pytest.raises(SystemExit, match="--base-lr"):
            finetune.base_learning_rates([bad])


def test_table_c_adds_own_learning_rate_rows(finetune: ModuleType) -> None:
    args = finetune.parse_args(["--tables", "c", "--lr", "2e-3"])
    runs = finetune.methods_for("c", args)[0]
    shared = [(m.label, lr) for m, lr in runs if lr == 2e-3]
    own = [(m.label, lr) for m, lr in runs if lr != 2e-3]
    assert [label for label, _ in shared] == [
        "dora", "dora+fft", "dora+coif", "hira", "hira+fft", "hira+coif",
    ]  # fmt: skip
    assert own == [("hira lr=0.01", 1e-2), ("hira+fft lr=0.01", 1e-2), ("hira+coif lr=0.01", 1e-2)]
    none = finetune.parse_args(["--tables", "c", "--base-lr"])
    assert all(lr == none.lr for _, lr in finetune.methods_for("c", none)[0])


def test_table_d_has_a_dense_lora_reference_per_rank(finetune: ModuleType) -> None:
    args = finetune.parse_args(["--sweep-ranks", "4", "16", "--sweep-bases", "dct"])
    methods = [m for m, _ in finetune.methods_for("d", args)[0]]
    assert [(m.basis, m.r, m.n_coeffs) for m in methods] == [
        (None, 4, None), (None, 16, None), ("dct", 4, 1024), ("dct", 16, 1024),
    ]  # fmt: skip
    off = finetune.parse_args(["--sweep-ranks", "4", "--sweep-lora-ranks", "0"])
    assert all(m.basis is not None for m, _ in finetune.methods_for("d", off)[0])


def test_tiny_run_writes_json_png_markdown_and_replots(
    finetune: ModuleType, tmp_path: Path
) -> None:
    argv = [
        "--tables", "c", "--adapter-bases", "hira", "--spectral-bases", "fft",
        "--seeds", "0", "--epochs", "1", "--max-train", "48", "--max-test", "48",
        "--threads", "1", "--no-progress", "--out-dir", str(tmp_path),
    ]  # fmt: skip
    assert finetune.main(argv) == 0
    payload = json.loads((tmp_path / "finetune_bases_of_adaptation.json").read_text())
    lrs = {run["method"]: run["spec"]["lr"] for run in payload["runs"]}
    assert lrs == {"hira": 1e-3, "hira+fft": 1e-3, "hira lr=0.01": 1e-2, "hira+fft lr=0.01": 1e-2}
    assert {s["method"] for s in payload["summaries"]} == set(lrs)
    assert payload["meta"]["n_train"] == 48
    png = tmp_path / "finetune_bases_of_adaptation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "finetune.md").read_text()
    assert "| hira+fft lr=0.01 |" in markdown
    assert "assets/results/finetune_bases_of_adaptation.png" in markdown
    png.unlink()
    assert finetune.main(["--replot", "--tables", "c", "--out-dir", str(tmp_path)]) == 0
    assert png.is_file()
