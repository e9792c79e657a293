"""``milton alerts ...``: a thin wrapper over :mod:`milton.anomaly.alerts`.

It takes the settings getter from the caller (``register(app, settings)``) instead of
importing ``milton.cli``: nothing imports the CLI package.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from milton.core.config import Settings
from milton.core.text import literal

out = Console(markup=False, highlight=False)
_settings: Callable[[], Settings] | None = None

alerts_app = typer.Typer(
    help="Alerts from the detector: one per process and day; acknowledge, mute, list.",
    invoke_without_command=True, no_args_is_help=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
HostOpt = Annotated[Optional[str], typer.Option("--host", help="Only this host.")]


def _get_settings() -> Settings:
    if _settings is None:
        from milton.core.config import load_settings

        return load_settings().settings
    return _settings()


@contextlib.contextmanager
def _store() -> Iterator[Any]:
    """The store, holding ``store.lock`` shared (a restore never swaps the file under us)."""
    from milton.core.jobs import STORE_LOCK, job_lock
    from milton.core.store import open_store

    settings = _get_settings()
    with job_lock(settings.locks_dir, STORE_LOCK, shared=True):
        db = open_store(settings.db_path, settings.store.busy_timeout_ms)
        try:
            yield db
        finally:
            db.close()


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


def _now() -> float:
    from milton.core.timeutil import utcnow

    return utcnow().timestamp()


@alerts_app.callback()
def alerts_cmd(
    ctx: typer.Context,
    since: Annotated[Optional[str], typer.Option(
        "--since", help="Only alerts seen since (ISO-8601, epoch, or e.g. -1d).")] = None,
    host: HostOpt = None,
    include_acked: Annotated[bool, typer.Option("--all", help="Acknowledged alerts too.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Open alerts, most recently seen first (with --all, acknowledged ones too)."""
    if ctx.invoked_subcommand is not None:
        return
    from milton.anomaly.alerts import list_alerts
    from milton.core.timeutil import parse_timestamp

    cutoff = None if since is None else parse_timestamp(since, field="--since").timestamp()
    with _store() as db:
        rows = list_alerts(db.conn, since=cutoff, host=host, include_acked=include_acked)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("No open alerts." if not include_acked else "No alerts.")
        return
    table = Table(title=f"{len(rows)} alert(s)", title_justify="left")
    for col in ("id", "host", "name", "user", "parent", "seen", "last seen", "", "reasons"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["id"]), literal(r["host"]), literal(r["name"]), literal(r["username"]),
                      literal(r["parent"]), f"{r['count']}x", _when(r["last_ts"]),
                      "open" if r["open"] else "acked", literal("; ".join(r["reasons"])))
    out.print(table)


@alerts_app.command("ack")
def ack_cmd(
    ids: Annotated[Optional[list[int]], typer.Argument(help="Alert id(s) (see `milton alerts`).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Acknowledge every open alert.")] = False,
) -> None:
    """Acknowledge alerts: they leave the open list (the same process today is counted, not re-alerted)."""
    from milton.anomaly.alerts import acknowledge
    from milton.core.errors import InputError

    if bool(ids) == every:
        raise InputError("alerts ack: give alert id(s) or --all (not both)")
    with _store() as db:
        n = acknowledge(db, None if every else ids, _now())
    out.print(f"Acknowledged {n} alert(s).")


@alerts_app.command("mute")
def mute_cmd(
    name: Annotated[str, typer.Argument(help="Process name to stop alerting about.")],
    host: Annotated[Optional[str], typer.Option("--host", help="Only on this host (default: every host).")] = None,
) -> None:
    """Stop new alerts for a process name (kept in the store; `milton alerts unmute` undoes it)."""
    from milton.anomaly.alerts import mute

    with _store() as db:
        added = mute(db, name, host, _now())
    where = f"on {host}" if host else "on every host"
    out.print(literal(f"{'Muted' if added else 'Already muted'}: {name} {where}"))


@alerts_app.command("unmute")
def unmute_cmd(
    name: Annotated[str, typer.Argument(help="A muted process name.")],
    host: Annotated[Optional[str], typer.Option("--host", help="The host it was muted on.")] = None,
) -> None:
    """Remove a mute."""
    from milton.anomaly.alerts import unmute
    from milton.core.errors import InputError

    with _store() as db:
        if not unmute(db, name, host):
            raise InputError(f"not muted: {name!r}" + (f" on {host!r}" if host else " on every host"))
    out.print(literal(f"Unmuted: {name}"))


@alerts_app.command("mutes")
def mutes_cmd(as_json: JsonOpt = False) -> None:
    """The mute list."""
    from milton.anomaly.alerts import list_mutes

    with _store() as db:
        rows = list_mutes(db.conn)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("Nothing muted.")
        return
    table = Table()
    for col in ("name", "host", "since"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(literal(r["name"]), literal(r["host"] or "(every host)"), _when(r["created"]))
    out.print(table)


def register(app: typer.Typer, settings: Callable[[], Settings]) -> None:
    """Add ``milton alerts`` (idempotent: the docs generator may register twice)."""
    global _settings
    _settings = settings
    if getattr(app, "_milton_alerts", False):
        return
    app.add_typer(alerts_app, name="alerts")
    app._milton_alerts = True  # type: ignore[attr-defined]
