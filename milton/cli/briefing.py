"""``milton briefing``: a thin wrapper over :mod:`milton.ops.briefing`."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from milton.cli.common import JsonOpt, State

# The briefing is Markdown with long lines: printed literally and never re-wrapped.
out = Console(markup=False, highlight=False, soft_wrap=True)


def briefing_cmd(
    last: Annotated[bool, typer.Option("--last", help="Show the last briefing again (nothing is sent).")] = False,
    as_json: JsonOpt = False,
    now: Annotated[Optional[str], typer.Option(
        "--now", help="Pretend it is this time (ISO-8601, epoch, or e.g. -2h).")] = None,
) -> None:
    """Since the last briefing: new alerts, what training did, failed jobs, open tasks, the
    backup, memory highlights, and what needs attention first. Sent through ntfy (Markdown)
    and stored (the 08:00 and 20:00 timer runs this)."""
    from milton.core.errors import InputError
    from milton.core.jobs import run_job
    from milton.core.log import setup_logging
    from milton.core.store import connect_readonly
    from milton.core.text import safe
    from milton.core.timeutil import parse_timestamp
    from milton.ops.briefing import JOB, briefing_job, last_briefing

    settings = State.settings()
    if last:
        briefing = None
        if settings.db_path.exists():
            conn = connect_readonly(settings.db_path)
            try:
                briefing = last_briefing(conn)
            finally:
                conn.close()
        if briefing is None:
            raise InputError("no briefing yet: run `milton briefing`")
        metrics = briefing["metrics"]
    else:
        # Jobs log to stdout (journald) unless stdout carries the briefing itself.
        setup_logging(logging.getLevelName(logging.getLogger("milton").level), stream=sys.stderr)
        result = run_job(JOB, briefing_job, settings,
                         now=parse_timestamp(now) if now is not None else None)
        metrics = result.metrics
    if as_json:
        sys.stdout.write(json.dumps({k: v for k, v in metrics.items() if k != "markdown"} | {
            "markdown": metrics.get("markdown")}, indent=2, default=str) + "\n")
        return
    out.print(safe(metrics.get("title", "Milton briefing")))
    out.print(safe(metrics.get("markdown", ""), keep_newlines=True))


def register(app: typer.Typer) -> None:
    app.command("briefing")(briefing_cmd)
