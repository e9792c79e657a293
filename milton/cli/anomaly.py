"""``milton train-anomaly`` and ``milton detect``: thin wrappers over :mod:`milton.anomaly`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from milton.cli.common import (
    JsonOpt,
    NowOpt,
    State,
    out,
    parse_now,
    print_json,
    run_as_job,
)
from milton.core.text import literal


def train_anomaly_cmd(now: NowOpt = None) -> None:
    """Retrain the rare-process detector on the sliding window (hourly job)."""
    from milton.anomaly.train import train_anomaly

    run_as_job("train-anomaly", train_anomaly, now)


def detect_cmd(
    from_file: Annotated[Optional[str], typer.Option("--from", help="Score this JSONL/CSV file instead of the latest snapshot.")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="Show every process, not only flagged ones.")] = False,
    as_json: JsonOpt = False,
    now: NowOpt = None,
) -> None:
    """Score the latest snapshot (or a file) and print flagged processes with reasons."""
    from milton.anomaly.detect import detect

    result = detect(State.settings(), from_file=from_file, now=parse_now(now))
    shown = result["rows"] if all_rows else [r for r in result["rows"] if r["flagged"]]
    if as_json:
        print_json({**result, "rows": shown})
        return
    table = Table(title=f"{result['flagged']} of {result['scored']} processes flagged "
                        f"(model {result['model_version']}, threshold {result['threshold']:.3f})")
    for col in ("host", "pid", "name", "user", "score", "reasons"):
        table.add_column(col, overflow="fold")
    for row in shown:
        table.add_row(literal(row["host"]), str(row["pid"]), literal(row["name"]),
                      literal(row["username"]), f"{row['score']:.3f}", literal("; ".join(row["reasons"])))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("train-anomaly")(train_anomaly_cmd)
    app.command("detect")(detect_cmd)
