"""``milton ingest ...``: the group, and ``ingest processes`` (a thin wrapper over
:mod:`milton.ingest.jobs`). ``ingest conversations`` and ``ingest documents`` come from
:mod:`milton.cli.sessions`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from milton.cli.common import NowOpt, err, run_as_job
from milton.core.errors import InputError
from milton.core.text import safe

ingest_app = typer.Typer(help="Bring data into the store.", no_args_is_help=True)


@ingest_app.command("processes")
def ingest_processes_cmd(
    from_file: Annotated[
        Optional[str],
        typer.Option("--from", help="JSONL or CSV snapshot file from another host's agent; - for stdin."),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Reject the whole file if any row is bad.")] = False,
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl or csv (default: by extension/content).")] = None,
    now: NowOpt = None,
) -> None:
    """Snapshot this host's processes (or ingest a file), then apply retention."""
    from milton.ingest.jobs import ingest_processes_job

    if fmt not in (None, "jsonl", "csv"):
        raise InputError("--format: expected jsonl or csv")
    metrics = run_as_job("ingest", ingest_processes_job(from_file, strict=strict, fmt=fmt), now)
    rejected = metrics.get("rejected_rows") or []
    for line, reason in rejected:
        err.print(safe(f"{metrics.get('source')}:{line}: {reason}"), markup=False, highlight=False)
    total = metrics.get("rejected", len(rejected))
    if total > len(rejected):
        err.print(f"... and {total - len(rejected)} more rejected rows")


def register(app: typer.Typer) -> None:
    app.add_typer(ingest_app, name="ingest")
