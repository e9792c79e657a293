"""`milton status`: everything a user needs to trust an unattended install, in one place.

:func:`gather_status` only reads: it never creates the store, takes no lock and works while
jobs and serve are writing. :func:`attention` turns the picture into the short list of things
a person should look at; ``milton status --check`` exits 1 on them and notifies.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from milton.core.artifacts import ArtifactStore, known_kinds
from milton.core.config import Settings
from milton.core.serve_state import read_serve_state
from milton.core.store import connect_readonly
from milton.core.timeutil import iso, parse_timestamp, utcnow

#: The metric that says most about a job's run, first match wins.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "ingest": ("rows", "inserted", "accepted"),
    "train-anomaly": ("train_rows", "records"),
    "ingest-documents": ("chunks_added", "files_changed", "documents"),
    "ingest-conversations": ("messages_added", "sessions_added"),
    "compress-memory": ("summaries_written", "short_term_removed"),
    "backup": ("size_bytes", "files"),
    "train-lora": ("status_detail", "candidate_eval_ppl"),
    "evolve": ("status_detail", "candidate_size_mb"),
    "agent": ("sent", "pending"),
    "briefing": ("new_alerts",),
}
_SKIP_METRICS = {"duration_s", "source", "rejected_rows", "reason", "summarizer", "groups"}
GIB = 1024**3


@dataclass
class Attention:
    """One thing a person should look at. ``event`` is the notification switch it maps to."""

    level: str  # "warning" | "critical"
    message: str
    event: str


# -- reading the store without touching it ---------------------------------------------
def _connect_readonly(path: Path) -> sqlite3.Connection | None:
    """A read-only connection, or None when there is no store yet (status must not create one)."""
    if not path.exists():
        return None
    try:
        conn = connect_readonly(path)
        conn.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        return None
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}


def key_metric(job: str, metrics: dict[str, Any]) -> str | None:
    """``name=value`` for the metric that best summarises a run."""
    for name in KEY_METRICS.get(job, ()):
        if metrics.get(name) is not None:
            return f"{name}={metrics[name]}"
    for name, value in metrics.items():
        if name not in _SKIP_METRICS and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return f"{name}={value}"
    return None


def _job_rows(conn: sqlite3.Connection, streak_window: int,
              locks_dir: Path) -> dict[str, dict[str, Any]]:
    from milton.core.jobs import owner_gone

    jobs: dict[str, dict[str, Any]] = {}
    from milton.core.jobs import job_names

    names = job_names(conn)
    for name in names:
        row = conn.execute(
            "select id, started, finished, status, metrics, error, host, pid from job_runs "
            "where job = ? order by id desc limit 1", [name]).fetchone()
        if row[3] == "running" and owner_gone(locks_dir, name, row[6], row[7]):
            # Killed (kill -9, OOM, power loss): the row stays 'running' until the job's
            # next run closes it, which for a weekly job is a week of a false "running".
            row = (*row[:3], "interrupted", row[4],
                   f"interrupted: pid {row[7]} on {row[6]} died before finishing", *row[6:])
        try:
            metrics = json.loads(row[4]) if row[4] else {}
        except json.JSONDecodeError:
            metrics = {}
        # Skipped runs (busy, nothing to do) neither break nor extend a failure streak.
        outcomes = [r[0] for r in conn.execute(
            "select status from job_runs where job = ? and status in ('ok', 'failed') "
            "order by id desc limit ?", [name, streak_window])]
        streak = 0
        for status in outcomes:
            if status != "failed":
                break
            streak += 1
        last_ok = conn.execute("select max(started) from job_runs where job = ? and status = 'ok'",
                               [name]).fetchone()[0]
        jobs[name] = {
            "job": name, "last_status": row[3], "last_started": row[1], "last_finished": row[2],
            "duration_s": metrics.get("duration_s"), "key_metric": key_metric(name, metrics),
            "error": row[5], "failure_streak": streak, "last_ok": last_ok,
            "runs": conn.execute("select count(*) from job_runs where job = ?", [name]).fetchone()[0],
        }
    return jobs


def _memory_counts(conn: sqlite3.Connection) -> dict[str, Any] | None:
    if "memories" not in _tables(conn):
        return None
    tiers = dict(conn.execute("select tier, count(*) from memories group by tier").fetchall())
    return {
        "tiers": {t: tiers.get(t, 0) for t in ("short", "working", "long")},
        "sessions_active": conn.execute(
            "select count(*) from sessions where status = 'open'").fetchone()[0],
        "messages": conn.execute("select count(*) from messages").fetchone()[0],
        "documents": conn.execute("select count(*) from documents").fetchone()[0],
    }


# -- schedule ------------------------------------------------------------------------------
#: How long a long-running reader (serve's dashboard) reuses systemd's answer: asking costs two
#: systemctl processes, and a timer's next elapse only changes when it fires.
SYSTEMD_CACHE_S = 30.0
_systemd_cache: dict[tuple[str, ...], tuple[float, dict[str, datetime]]] = {}


def _systemd_next(units: list[str]) -> dict[str, datetime]:
    """NEXT elapse per timer from a running systemd (user, then system); {} when unavailable.
    Remembered for ``SYSTEMD_CACHE_S`` within one process."""
    key = tuple(units)
    cached = _systemd_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < SYSTEMD_CACHE_S:
        return cached[1]
    found = _ask_systemd(units)
    _systemd_cache[key] = (time.monotonic(), found)
    return found


def _ask_systemd(units: list[str]) -> dict[str, datetime]:
    for scope in (["--user"], []):
        try:
            proc = subprocess.run(
                ["systemctl", *scope, "show", *units, "-p", "Id", "-p", "NextElapseUSecRealtime",
                 "--timestamp=unix"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if proc.returncode != 0:
            continue
        found: dict[str, datetime] = {}
        for block in proc.stdout.strip().split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            value = props.get("NextElapseUSecRealtime", "")
            if props.get("Id") and value.startswith("@"):
                found[props["Id"]] = datetime.fromtimestamp(float(value[1:]), tz=timezone.utc)
        if found:
            return found
    return {}


def _schedule(now: datetime, *, use_systemd: bool) -> dict[str, dict[str, Any]]:
    from milton.ops.schedule import scheduled_jobs

    jobs = scheduled_jobs()
    live = _systemd_next([j.unit for j in jobs]) if use_systemd else {}
    out = {}
    for job in jobs:
        if job.unit in live:
            nxt, source = live[job.unit], "systemd"
        else:
            nxt, source = job.next_after(now), "calendar"
        out[job.name] = {"calendar": job.calendar, "next_run": iso(nxt), "next_source": source}
    return out


# -- the whole picture ---------------------------------------------------------------------
def _artifacts(settings: Settings) -> list[dict[str, Any]]:
    rows = []
    for kind in known_kinds(settings.paths.checkpoints_dir):
        store = ArtifactStore(settings.paths.checkpoints_dir, kind)
        current = store.current()
        gate = (current.manifest.get("gate") or {}) if current else {}
        rows.append({
            "kind": kind,
            "current": current.name if current else None,
            "created": current.created if current else None,
            # the promotion gate's verdict on it (train-lora, evolve); None for kinds without one
            "decision": current.metrics.get("decision") if current else None,
            "reason": gate.get("reason") if isinstance(gate, dict) else None,
            "versions": len(store.version_names()),
            "pinned": sorted(store.pins()),
        })
    return rows


def _backups(settings: Settings, now: datetime) -> dict[str, Any]:
    from milton.ops.backup.retention import list_backups

    archives = list_backups(settings)
    if not archives:
        return {"count": 0, "newest": None, "newest_created": None, "age_days": None}
    newest = archives[-1]
    return {
        "count": len(archives),
        "newest": newest.name,
        "newest_created": iso(newest.created),
        "age_days": round((now - newest.created).total_seconds() / 86400, 2),
        "total_bytes": sum(a.size_bytes for a in archives),
    }


def _disk(path: Path) -> dict[str, Any]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"path": str(probe), "free_bytes": usage.free, "total_bytes": usage.total,
            "free_percent": round(100 * usage.free / usage.total, 1) if usage.total else 0.0}


def gather_status(settings: Settings, *, now: datetime | None = None,
                  use_systemd: bool = True) -> dict[str, Any]:
    """Read-only snapshot of jobs, schedule, artifacts, memory, store, disk and backups."""
    now = now or utcnow()
    db_path = settings.db_path
    wal = db_path.with_name(db_path.name + "-wal")
    store: dict[str, Any] = {
        "path": str(db_path), "exists": db_path.exists(),
        "size_bytes": db_path.stat().st_size if db_path.exists() else 0,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        "schema_version": None,
    }
    jobs: dict[str, dict[str, Any]] = {}
    memory = None
    detector: dict[str, Any] = {"alerts": None, "hosts": []}
    conn = _connect_readonly(db_path)
    if conn is not None:
        try:
            tables = _tables(conn)
            if "_migrations" in tables:
                store["schema_version"] = conn.execute("select count(*) from _migrations").fetchone()[0]
            if "job_runs" in tables:
                jobs = _job_rows(conn, streak_window=max(settings.status.failure_streak, 10),
                                 locks_dir=settings.locks_dir)
            memory = _memory_counts(conn)
            if {"alerts", "snapshots"} <= tables:
                from milton.ops.fleet_status import alert_summary, host_summary

                detector = {"alerts": alert_summary(conn), "hosts": host_summary(conn, now.timestamp())}
        finally:
            conn.close()
    elif db_path.exists():
        store["error"] = "cannot be read as SQLite"
    schedule = _schedule(now, use_systemd=use_systemd)
    for name, info in schedule.items():
        jobs.setdefault(name, {"job": name, "last_status": None, "runs": 0, "failure_streak": 0})
        jobs[name].update(info)
    ordered = sorted(jobs.values(), key=lambda j: (j["job"] not in schedule, j["job"]))
    report = {
        "now": iso(now),
        "home": str(settings.paths.home),
        "store": store,
        "disk": _disk(settings.paths.data_dir),
        "jobs": ordered,
        "artifacts": _artifacts(settings),
        "memory": memory,
        "backups": _backups(settings, now),
        "serve": read_serve_state(settings.paths.data_dir),
        **detector,
    }
    report["attention"] = [asdict(a) for a in attention(report, settings)]
    return report


def attention(report: dict[str, Any], settings: Settings) -> list[Attention]:
    """What needs a person: failing jobs, a stale or missing backup, a nearly full disk."""
    cfg = settings.status
    items: list[Attention] = []
    for job in report["jobs"]:
        if job.get("last_status") == "interrupted":
            items.append(Attention("warning", f"{job['job']}: {job.get('error')}; the next run "
                                   "starts over", "failure"))
        if job.get("failure_streak", 0) >= cfg.failure_streak:
            items.append(Attention(
                "critical", f"{job['job']} failed its last {job['failure_streak']} runs: "
                f"{job.get('error') or 'see journalctl'}", "failure"))
    backups = report["backups"]
    if backups["count"] == 0:
        if report["store"]["exists"]:
            items.append(Attention("warning", "no backup yet: run `milton backup`", "stale_backup"))
    elif backups["age_days"] is not None and backups["age_days"] > cfg.backup_max_age_days:
        items.append(Attention(
            "critical", f"newest backup is {backups['age_days']:.1f} days old "
            f"(limit {cfg.backup_max_age_days:g}): {backups['newest']}", "stale_backup"))
    disk = report["disk"]
    if disk["free_percent"] < cfg.min_free_disk_percent or disk["free_bytes"] < cfg.min_free_disk_gb * GIB:
        items.append(Attention(
            "critical", f"disk nearly full at {disk['path']}: {disk['free_bytes'] / GIB:.1f} GiB "
            f"free ({disk['free_percent']:.1f}%)", "failure"))
    serve = report.get("serve")
    if serve and serve.get("running") and serve.get("chat") == "degraded":
        items.append(Attention("critical", f"serve runs degraded: {serve.get('chat_error')}",
                               "failure"))
    alerts = report.get("alerts")
    if alerts and alerts["open"]:
        from milton.core.text import safe

        hosts = ", ".join(f"{safe(h)} {n}" for h, n in alerts["hosts"].items())
        items.append(Attention("warning", f"{alerts['open']} open alert(s) ({hosts}): "
                               "`milton alerts`, then `milton alerts ack`", "alert"))
    if report["store"].get("error"):
        items.append(Attention("critical", f"store {report['store']['path']} "
                               f"{report['store']['error']}", "failure"))
    return items


def check(settings: Settings, report: dict[str, Any]) -> int:
    """Notify about each attention item (``milton status --check``); the exit status to use."""
    from milton.core.notify import notify

    items = report["attention"]
    for item in items:
        notify(settings, item["event"], f"milton: {item['level']}", item["message"],
               priority="high" if item["level"] == "critical" else None, tags=("warning",))
    return 1 if items else 0


def age(value: str | None, now: datetime) -> str:
    """'3h ago' / 'in 12m' for a timestamp, '-' for none."""
    if not value:
        return "-"
    seconds = (parse_timestamp(value) - now).total_seconds()
    future, seconds = seconds > 0, abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds / size:.0f}{unit}" if unit != "d" else f"{seconds / size:.1f}d"
            break
    else:
        text = f"{seconds:.0f}s"
    return f"in {text}" if future else f"{text} ago"
