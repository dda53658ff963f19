"""The documentation's code runs: the custom-basis tutorial and the quickstart snippets."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

import selora

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_custom_basis_tutorial_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["custom_basis.py"])
    try:
        runpy.run_path(str(DOCS / "examples" / "custom_basis.py"), run_name="__main__")
        assert "dst" in selora.list_bases()
    finally:
        if "dst" in selora.list_bases():
            selora.unregister_basis("dst")


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def test_quickstart_snippets_run() -> None:
    blocks = _python_blocks(DOCS / "quickstart.md")
    assert len(blocks) >= 3
    namespace: dict[str, object] = {"__name__": "quickstart"}
    exec(compile("\n".join(blocks), "quickstart.md", "exec"), namespace)
