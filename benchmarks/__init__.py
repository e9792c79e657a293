"""Benchmarks (process anomalies, memory): ``python -m benchmarks [--quick] [NAME ...]``.

Each ``bench_<name>.py`` module exposes ``run(quick: bool) -> dict`` returning figures, targets
and parameters; ``__main__`` runs them, prints a table and writes ``benchmarks/results/``.
"""

NAMES = ("ingest", "train", "score", "reload", "memory", "backup", "train_lora", "swap", "serve", "agent",
         "evolve", "ui", "chunking", "secrets", "chat", "learning", "evolve_month")
