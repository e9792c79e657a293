"""`milton briefing`: the 08:00 and 20:00 summary of what happened since the last one.

New alerts, what the training jobs did (trained, promoted, rejected and why), failed jobs,
open tasks, the backup, memory highlights (new long-term memories, top topics), and what needs
attention first. It reads the store read-only (like `milton status`); the briefing itself is
kept as the ``briefing`` job run's metrics (markdown included), so "since the last briefing"
and `milton briefing --last` need no table of their own. Sent through ntfy as Markdown.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from milton.core.config import Settings
from milton.core.store import connect_readonly
from milton.core.text import safe
from milton.core.timeutil import iso, parse_timestamp

JOB = "briefing"
TRAINING_JOBS = ("train-lora", "evolve", "train-anomaly")
DEFAULT_LOOKBACK_H = 12.0  # the first briefing covers the last half day


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}


def last_briefing(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The newest successful briefing run: {"run_id", "started", "metrics"}, or None."""
    if "job_runs" not in _tables(conn):
        return None
    row = conn.execute("select id, started, metrics from job_runs where job = ? and status = 'ok' "
                       "order by id desc limit 1", (JOB,)).fetchone()
    if row is None:
        return None
    return {"run_id": row[0], "started": row[1], "metrics": json.loads(row[2]) if row[2] else {}}


def _since(conn: sqlite3.Connection, now: datetime) -> datetime:
    last = last_briefing(conn)
    if last is not None:
        return parse_timestamp(last["metrics"].get("now") or last["started"])
    return now - timedelta(hours=DEFAULT_LOOKBACK_H)


def _alerts(conn: sqlite3.Connection, tables: set[str], since: float) -> dict[str, Any]:
    if "alerts" not in tables or "acked_at" not in {r[1] for r in conn.execute("pragma table_info(alerts)")}:
        return {"new": 0, "open": 0, "items": []}
    items = [{"id": i, "host": h, "name": n, "username": u, "count": c, "reasons": json.loads(r or "[]")}
             for i, h, n, u, c, r in conn.execute(
                 "select id, host, name, username, count, reasons from alerts where first_ts >= ? "
                 "order by score desc, id limit 10", (since,))]
    new = conn.execute("select count(*) from alerts where first_ts >= ?", (since,)).fetchone()[0]
    open_ = conn.execute("select count(*) from alerts where acked_at is null").fetchone()[0]
    return {"new": new, "open": open_, "items": items}


def _jobs(conn: sqlite3.Connection, tables: set[str], since: str) -> tuple[list[dict], list[dict], dict]:
    """(training results, failed runs, run counts per job) since ``since`` (ISO)."""
    if "job_runs" not in tables:
        return [], [], {}
    results, failed, counts = [], [], Counter()
    # ``now`` is the job's (possibly replayed, --now) time; started the wall clock.
    for job, started, status, metrics, error in conn.execute(
            "select job, coalesce(now, started), status, metrics, error from job_runs "
            "where coalesce(now, started) >= ? and job != ? order by id", (since, JOB)):
        counts[job] += 1
        m = json.loads(metrics) if metrics else {}
        if status == "failed":
            failed.append({"job": job, "started": started, "error": (error or "")[:300]})
        elif job in TRAINING_JOBS and status == "ok":
            results.append({"job": job, "started": started, "outcome": m.get("status_detail") or "trained",
                            "version": m.get("version"), "reason": m.get("reason")})
        elif job in TRAINING_JOBS and status == "skipped":
            results.append({"job": job, "started": started, "outcome": "skipped",
                            "version": None, "reason": m.get("reason")})
    anomaly = [r for r in results if r["job"] == "train-anomaly"]
    # The hourly detector retraining: its latest result only (the run count says how many).
    results = [r for r in results if r["job"] != "train-anomaly"] + anomaly[-1:]
    return results, failed, dict(counts)


def _tasks(conn: sqlite3.Connection, tables: set[str]) -> list[dict[str, Any]]:
    if "tasks" not in tables:
        return []
    return [{"id": i, "status": s, "title": c[:200]} for i, s, c in conn.execute(
        "select t.memory_id, t.status, m.content from tasks t join memories m on m.id = t.memory_id "
        "where t.status in ('pending', 'active', 'blocked') "
        "order by case t.status when 'active' then 0 when 'blocked' then 1 else 2 end, t.updated "
        "limit 20")]


def _memory(conn: sqlite3.Connection, tables: set[str], since: float) -> dict[str, Any]:
    if "memories" not in tables:
        return {"new_long_term": 0, "highlights": [], "topics": []}
    highlights = [c[:200] for (c,) in conn.execute(
        "select content from memories where tier = 'long' and created >= ? "
        "order by importance desc, created desc limit 5", (since,))]
    new = conn.execute("select count(*) from memories where tier = 'long' and created >= ?",
                       (since,)).fetchone()[0]
    topics: Counter[str] = Counter()
    if "sessions" in tables:
        for (raw,) in conn.execute("select topics from sessions where last_activity >= ? "
                                   "and topics is not null", (since,)):
            try:
                topics.update(t for t in json.loads(raw) if isinstance(t, str))
            except ValueError:
                continue
    return {"new_long_term": new, "highlights": highlights,
            "topics": [t for t, _n in topics.most_common(5)]}


def gather_briefing(settings: Settings, now: datetime) -> dict[str, Any]:
    """Everything the briefing says, as data (read-only; works while jobs and serve write)."""
    from milton.ops.status import gather_status

    report = gather_status(settings, now=now, use_systemd=False)
    out: dict[str, Any] = {"now": iso(now), "since": None, "alerts": {"new": 0, "open": 0, "items": []},
                           "training": [], "failed_jobs": [], "job_runs": {}, "tasks": [],
                           "memory": {"new_long_term": 0, "highlights": [], "topics": []},
                           "backup": report["backups"], "attention": []}
    path = settings.db_path
    if path.exists():
        conn = connect_readonly(path)
        try:
            tables = _tables(conn)
            since = _since(conn, now)
            out["since"] = iso(since)
            out["alerts"] = _alerts(conn, tables, since.timestamp())
            out["training"], out["failed_jobs"], out["job_runs"] = _jobs(conn, tables, iso(since) or "")
            out["tasks"] = _tasks(conn, tables)
            out["memory"] = _memory(conn, tables, since.timestamp())
        finally:
            conn.close()
    out["attention"] = _attention_first(out, report)
    return out


def _attention_first(data: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """Most urgent first: critical status items, new alerts, failed jobs, then warnings."""
    items = [a["message"] for a in report["attention"] if a["level"] == "critical"]
    if data["alerts"]["new"]:
        first = data["alerts"]["items"][0] if data["alerts"]["items"] else None
        items.append(f"{data['alerts']['new']} new alert(s)"
                     + (f", first {first['name']} on {first['host']}" if first else "")
                     + ": `milton alerts`")
    for f in data["failed_jobs"][:3]:
        items.append(f"{f['job']} failed: {f['error'] or 'see journalctl'}")
    items += [a["message"] for a in report["attention"]
              if a["level"] != "critical" and a["event"] != "alert"]
    return items


def render_markdown(data: dict[str, Any]) -> str:
    """The briefing as Markdown (ntfy renders it); text from outside is made literal."""
    now = parse_timestamp(data["now"])
    lines = [f"**Since {_short(data['since'], now)}**", ""]
    lines.append("**Needs attention first**")
    lines += [f"- {safe(a)}" for a in data["attention"]] or ["- nothing"]
    alerts = data["alerts"]
    lines += ["", f"**Alerts**: {alerts['new']} new, {alerts['open']} open"]
    for a in alerts["items"][:5]:
        why = "; ".join(safe(r) for r in a["reasons"]) or "flagged"
        lines.append(f"- #{a['id']} `{safe(a['host'])}` `{safe(a['name'])}` x{a['count']}: {why}")
    lines += ["", "**Jobs**"]
    for t in data["training"]:
        lines.append(f"- {t['job']}: {t['outcome']}" + (f" {t['version']}" if t.get("version") else "")
                     + (f" ({safe(t['reason'])})" if t.get("reason") else ""))
    for f in data["failed_jobs"]:
        lines.append(f"- {f['job']} FAILED at {_short(f['started'], now)}: {safe(f['error'])}")
    runs = ", ".join(f"{j} {n}" for j, n in sorted(data["job_runs"].items()))
    lines.append(f"- runs: {runs}" if runs else "- no job ran")
    backup = data["backup"]
    lines += ["", "**Backup**: " + (f"{backup['newest']} ({backup['age_days']:.1f} days old, "
                                    f"{backup['count']} kept)" if backup.get("count") else "none yet")]
    tasks = data["tasks"]
    lines += ["", f"**Tasks open**: {len(tasks)}"]
    lines += [f"- [{t['status']}] {safe(t['title'])}" for t in tasks[:8]]
    memory = data["memory"]
    lines += ["", f"**Memory**: {memory['new_long_term']} new long-term"
              + (f"; topics: {', '.join(safe(t) for t in memory['topics'])}" if memory["topics"] else "")]
    lines += [f"- {safe(h)}" for h in memory["highlights"]]
    return "\n".join(lines) + "\n"


def _short(value: str | None, now: datetime) -> str:
    if not value:
        return "the start"
    dt = parse_timestamp(value)
    return dt.strftime("%Y-%m-%d %H:%M UTC" if (now - dt).days >= 1 else "%H:%M UTC")


def title_for(data: dict[str, Any]) -> str:
    hour = parse_timestamp(data["now"]).astimezone().hour
    part = "Morning" if hour < 12 else "Evening"
    alerts = data["alerts"]["new"]
    return f"Milton: {part} briefing" + (f": {alerts} new alert(s)" if alerts else "")


def briefing_job(ctx: Any) -> dict[str, Any]:
    """The job (``run_job("briefing", briefing_job, ...)``): gather, render, send. The metrics,
    markdown included, are the stored briefing."""
    from milton.core.notify import enabled, notify

    data = gather_briefing(ctx.settings, ctx.now)
    markdown = render_markdown(data)
    title = title_for(data)
    sent = False
    if enabled(ctx.settings, "briefing"):
        sent = notify(ctx.settings, "briefing", title, markdown, markdown=True)
    return {"now": data["now"], "since": data["since"], "title": title, "sent": sent,
            "new_alerts": data["alerts"]["new"], "failed_jobs": len(data["failed_jobs"]),
            "open_tasks": len(data["tasks"]), "markdown": markdown, "data": data}

