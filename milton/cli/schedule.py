"""``milton schedule``: a thin wrapper over :mod:`milton.ops.schedule`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from milton.cli.common import State, logging_level, out


def schedule_cmd(
    only: Annotated[Optional[list[str]], typer.Option(
        "--only", help="Run only this job (repeatable), e.g. --only ingest.")] = None,
    once: Annotated[bool, typer.Option(
        "--once", help="Run what is due or was missed now, wait for it, exit (for cron); exit 1 if a job failed.")] = False,
    serve: Annotated[bool, typer.Option(
        "--serve", help="Also run `milton serve` and restart it if it crashes.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the jobs, their calendars and next runs; run nothing.")] = False,
) -> None:
    """Run the systemd timers' schedule in the foreground, for machines without systemd.

    Same calendar (read from the shipped .timer files), same locks, catch-up of missed runs
    like Persistent=true, failures notified. SIGTERM/SIGINT stop it cleanly.
    """
    from rich.table import Table

    from milton.core.errors import InputError
    from milton.core.log import setup_logging
    from milton.core.timeutil import utcnow
    from milton.ops import schedule

    settings = State.settings()
    jobs = schedule.select(schedule.scheduled_jobs(), only or ())
    if dry_run:
        now = utcnow()
        table = Table(title=f"milton schedule: {len(jobs)} job(s), times in local time")
        for col in ("job", "calendar", "next run", "last run", "command"):
            table.add_column(col, overflow="fold")
        for row in schedule.plan(settings, jobs, now):
            nxt = _local(row["next_run"]) + (" (missed: runs at start)" if row["catch_up"] else "")
            table.add_row(row["job"], row["calendar"], nxt, _local(row["last_run"]),
                          " ".join(row["command"]))
        out.print(table)
        return
    if once and serve:
        raise InputError("--serve runs until stopped; it cannot be combined with --once")
    import sys

    level = logging_level()
    setup_logging(level, stream=sys.stdout)
    opts = schedule.global_options(State.config_path, level)
    code = schedule.Scheduler(settings, jobs, global_opts=opts, serve=serve).run(once=once)
    raise typer.Exit(code)


def _local(value: str | None) -> str:
    if not value:
        return "-"
    from milton.core.timeutil import parse_timestamp

    return parse_timestamp(value).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def register(app: typer.Typer) -> None:
    app.command("schedule")(schedule_cmd)
