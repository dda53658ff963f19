"""MkDocs hook: publish the benchmark and demo plots from ``benchmarks/results/``.

The PNGs are written by ``benchmarks/finetune.py`` (and the demo) next to their
JSON; this hook adds them to the site under ``assets/results/`` so that the
pages can embed them without keeping copies inside ``docs/``. A page that
embeds a plot which does not exist fails ``mkdocs build --strict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files: Files, config: Any) -> Files:
    """Add every PNG under ``benchmarks/results/`` as ``assets/results/<name>``."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"assets/results/{png.name}", abs_src_path=str(png)))
    return files
