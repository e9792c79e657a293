"""``milton status``: a thin wrapper over :mod:`milton.ops.status`."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from milton.cli.common import State, out, parse_now, print_json

_STYLE = {"ok": "green", "failed": "red", "skipped": "yellow", "running": "cyan",
          "interrupted": "red"}


def _iso(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render(report: dict[str, Any]) -> Group:
    """The one-screen view: attention first, then jobs, models, memory, store."""
    from milton.core.timeutil import parse_timestamp
    from milton.ops.status import age

    now = parse_timestamp(report["now"])
    parts: list[Any] = []
    if report["attention"]:
        for item in report["attention"]:
            style = "bold red" if item["level"] == "critical" else "yellow"
            parts.append(Text(f"! {item['message']}", style=style))
    else:
        parts.append(Text("All good: nothing needs attention.", style="green"))

    jobs = Table(title="Jobs", title_justify="left", expand=False)
    for col in ("job", "last run", "status", "took", "key metric", "next run"):
        jobs.add_column(col, overflow="fold")
    for job in report["jobs"]:
        status = job.get("last_status") or "never run"
        if job.get("failure_streak", 0) > 1:
            status += f" x{job['failure_streak']}"
        took = job.get("duration_s")
        nxt = job.get("next_run")
        next_text = f"{age(nxt, now)}" + (f" ({job['calendar']})" if job.get("calendar") else "")
        jobs.add_row(job["job"], age(job.get("last_started"), now),
                     Text(status, style=_STYLE.get(job.get("last_status") or "", "dim")),
                     f"{took:.1f}s" if isinstance(took, (int, float)) else "-",
                     job.get("key_metric") or "-", next_text if nxt else "-")
    parts.append(jobs)

    models = Table(title="Models", title_justify="left")
    for col in ("kind", "current", "promoted", "versions", "pinned"):
        models.add_column(col)
    for a in report["artifacts"]:
        models.add_row(a["kind"], a["current"] or "-", age(a["created"], now), str(a["versions"]),
                       ", ".join(a["pinned"]) or "-")
    if not report["artifacts"]:
        models.add_row("-", "none yet", "-", "0", "-")
    parts.append(models)

    store, disk, backups, memory = report["store"], report["disk"], report["backups"], report["memory"]
    facts = Table(title="Store", title_justify="left", show_header=False)
    facts.add_column("what")
    facts.add_column("value", overflow="fold")
    facts.add_row("database", f"{store['path']} ({_size(store['size_bytes'])}, WAL "
                  f"{_size(store['wal_bytes'])}, schema v{store['schema_version'] or '-'})"
                  if store["exists"] else f"{store['path']} (not created yet)")
    if memory:
        tiers = memory["tiers"]
        facts.add_row("memories", f"short {tiers['short']}, working {tiers['working']}, "
                      f"long {tiers['long']}; {memory['messages']} messages, "
                      f"{memory['sessions_active']} active sessions, {memory['documents']} documents")
    facts.add_row("free disk", f"{_size(disk['free_bytes'])} of {_size(disk['total_bytes'])} "
                  f"({disk['free_percent']:.1f}%) at {disk['path']}")
    facts.add_row("newest backup", f"{backups['newest']} ({age(backups['newest_created'], now)}, "
                  f"{backups['count']} kept)" if backups["count"] else "none")
    if report.get("hosts"):
        from milton.core.text import literal

        alerts = (report.get("alerts") or {}).get("hosts", {})
        facts.add_row("hosts", literal(", ".join(
            f"{h['host']} (last snapshot {age(_iso(h['last_snapshot_ts']), now)}, "
            f"{alerts.get(h['host'], 0)} open alerts)" for h in report["hosts"])))
    serve = report.get("serve")
    if serve and serve.get("running"):
        chat = serve.get("chat") or "-"
        if chat == "degraded":
            chat += f": {serve.get('chat_error')}"
        facts.add_row("serve", Text(f"running (pid {serve.get('pid')}), chat {chat}"))
    else:
        facts.add_row("serve", "not running")
    parts.append(facts)
    return Group(*parts)


def status_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Exit 1 when something needs attention and send notifications for it "
        "(the daily milton-check timer runs this).")] = False,
    now: Annotated[Optional[str], typer.Option(
        "--now", help="Pretend it is this time (ISO-8601, epoch, or e.g. -2h).")] = None,
) -> None:
    """One screen: each job's last and next run, models, memory, store, disk, backups."""
    from milton.ops.status import check as check_and_notify
    from milton.ops.status import gather_status

    settings = State.settings()
    report = gather_status(settings, now=parse_now(now))
    if as_json:
        print_json(report)
    else:
        out.print(render(report))
    if check:
        raise typer.Exit(check_and_notify(settings, report))


def register(app: typer.Typer) -> None:
    app.command("status")(status_cmd)
