"""``milton alerts ...``: a thin wrapper over :mod:`milton.anomaly.alerts`."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Optional

import typer
from rich.table import Table

from milton.cli.common import JsonOpt, open_cli_store, out, print_json
from milton.core.text import literal

alerts_app = typer.Typer(
    help="Alerts from the detector: one per process and day; acknowledge, mute, list.",
    invoke_without_command=True, no_args_is_help=False)

HostOpt = Annotated[Optional[str], typer.Option("--host", help="Only this host.")]


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
    with open_cli_store() as db:
        rows = list_alerts(db.conn, since=cutoff, host=host, include_acked=include_acked)
    if as_json:
        print_json(rows)
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
    with open_cli_store() as db:
        n = acknowledge(db, None if every else ids, _now())
    out.print(f"Acknowledged {n} alert(s).")


@alerts_app.command("mute")
def mute_cmd(
    name: Annotated[str, typer.Argument(help="Process name to stop alerting about.")],
    host: Annotated[Optional[str], typer.Option("--host", help="Only on this host (default: every host).")] = None,
) -> None:
    """Stop new alerts for a process name (kept in the store; `milton alerts unmute` undoes it)."""
    from milton.anomaly.alerts import mute

    with open_cli_store() as db:
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

    with open_cli_store() as db:
        if not unmute(db, name, host):
            raise InputError(f"not muted: {name!r}" + (f" on {host!r}" if host else " on every host"))
    out.print(literal(f"Unmuted: {name}"))


@alerts_app.command("mutes")
def mutes_cmd(as_json: JsonOpt = False) -> None:
    """The mute list."""
    from milton.anomaly.alerts import list_mutes

    with open_cli_store() as db:
        rows = list_mutes(db.conn)
    if as_json:
        print_json(rows)
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


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
