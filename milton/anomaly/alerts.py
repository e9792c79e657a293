"""Alerts people can use: one open alert per process identity per day, acknowledged, muted,
listed, and notified (rate-limited) when new.

Serve scores a snapshot a minute; a flagged process used to add a row every minute. Here a
sighting of an identity (host, name, user, exe) that already has an alert for that UTC day
raises the alert's ``count`` and ``last_ts`` instead. Acknowledging closes it for the day;
muting a name (on one host or all) stops new alerts for it. Everything lives in the store, so
the CLI, serve and status see the same state, and a crash mid-write leaves the last commit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlite_utils

from milton.core.errors import InputError

_SEP = "\x00"
COLUMNS = ("id", "host", "name", "username", "exe", "parent", "score", "reasons", "model_version",
           "day", "first_ts", "last_ts", "count", "acked_at", "notified_at", "pid", "snapshot_id")


def identity(host: str, name: str, username: str | None, exe: str | None) -> str:
    return _SEP.join((host, name, username or "", exe or ""))


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


# -- mutes ----------------------------------------------------------------------------------
def mute(db: sqlite_utils.Database, name: str, host: str | None, now: float) -> bool:
    """Mute ``name`` (on ``host``, or everywhere). False if it already was."""
    if not name or len(name) > 1024 or "\x00" in name:
        raise InputError("mute: NAME must be 1-1024 characters without NUL")
    with db.atomic():
        cursor = db.conn.execute(
            "insert or ignore into alert_mutes (name, host, created) values (?, ?, ?)",
            (name, host or "", now))
    return cursor.rowcount > 0


def unmute(db: sqlite_utils.Database, name: str, host: str | None) -> bool:
    with db.atomic():
        cursor = db.conn.execute("delete from alert_mutes where name = ? and host = ?",
                                 (name, host or ""))
    return cursor.rowcount > 0


def list_mutes(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [{"name": n, "host": h or None, "created": c} for n, h, c in conn.execute(
        "select name, host, created from alert_mutes order by name, host")]


def _muted(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    return {(n, h) for n, h in conn.execute("select name, host from alert_mutes")}


# -- recording --------------------------------------------------------------------------------
def record(db: sqlite_utils.Database, scored: Sequence[dict[str, Any]], *,
           snapshot_id: str | None, model_version: str | None) -> list[dict[str, Any]]:
    """Store the flagged rows of one scored snapshot; return the alerts that are new.

    ``scored`` rows are :func:`milton.anomaly.detect.score_rows` dicts. One transaction: an
    alert is either counted or not, never half-written.
    """
    flagged = [r for r in scored if r["flagged"]]
    if not flagged:
        return []
    new: list[dict[str, Any]] = []
    conn = db.conn
    with db.atomic():
        muted = _muted(conn)
        for r in flagged:
            if (r["name"], "") in muted or (r["name"], r["host"]) in muted:
                continue
            ident = identity(r["host"], r["name"], r["username"], r["exe"])
            day, ts = utc_day(r["ts"]), float(r["ts"])
            reasons = json.dumps(r["reasons"])
            cursor = conn.execute(
                "update alerts set count = count + 1, last_ts = max(last_ts, ?), "
                "score = max(score, ?), reasons = ?, model_version = ?, pid = ?, "
                "snapshot_id = ?, parent = ? where ident = ? and day = ?",
                (ts, r["score"], reasons, model_version, r["pid"], snapshot_id,
                 r.get("parent"), ident, day))
            if cursor.rowcount:
                continue
            cursor = conn.execute(
                "insert into alerts (ts, host, snapshot_id, pid, name, username, exe, score, "
                "model_version, reasons, ident, day, first_ts, last_ts, count, parent) "
                "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                (ts, r["host"], snapshot_id, r["pid"], r["name"], r["username"], r["exe"],
                 r["score"], model_version, reasons, ident, day, ts, ts, r.get("parent")))
            new.append({"id": cursor.lastrowid, "host": r["host"], "name": r["name"],
                        "username": r["username"], "exe": r["exe"], "parent": r.get("parent"),
                        "score": r["score"], "reasons": r["reasons"], "ts": ts})
    return new


# -- reading and acknowledging ---------------------------------------------------------------
def _row(values: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(COLUMNS, values))
    out["reasons"] = json.loads(out["reasons"]) if out["reasons"] else []
    out["open"] = out["acked_at"] is None
    return out


def list_alerts(conn: sqlite3.Connection, *, since: float | None = None, host: str | None = None,
                include_acked: bool = False, limit: int = 500) -> list[dict[str, Any]]:
    """Alerts, most recently seen first: open ones only unless ``include_acked``."""
    where, args = [], []
    if not include_acked:
        where.append("acked_at is null")
    if since is not None:
        where.append("last_ts >= ?")
        args.append(since)
    if host is not None:
        where.append("host = ?")
        args.append(host)
    sql = (f"select {', '.join(COLUMNS)} from alerts"
           + (f" where {' and '.join(where)}" if where else "")
           + " order by last_ts desc, id desc limit ?")
    return [_row(v) for v in conn.execute(sql, [*args, max(0, limit)])]


def acknowledge(db: sqlite_utils.Database, ids: Iterable[int] | None, now: float) -> int:
    """Acknowledge these alerts (or every open one with ``ids=None``); returns how many.

    Unknown ids are an error and nothing is acknowledged.
    """
    with db.atomic():
        if ids is None:
            return db.conn.execute("update alerts set acked_at = ? where acked_at is null",
                                   (now,)).rowcount
        wanted = sorted(set(ids))
        known = {i for (i,) in db.conn.execute(
            f"select id from alerts where id in ({', '.join('?' * len(wanted))})", wanted)}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise InputError("no such alert: " + ", ".join(map(str, missing)) + " (nothing acknowledged)")
        return db.conn.execute(
            f"update alerts set acked_at = ? where acked_at is null and id in "
            f"({', '.join('?' * len(wanted))})", [now, *wanted]).rowcount


def alerts_per_day(conn: sqlite3.Connection, since: float) -> dict[str, list[tuple[str, int]]]:
    """Alerts first seen per host and UTC day since ``since`` (epoch), oldest day first: the
    dashboard's timeline, bounded by the ts index and the window."""
    out: dict[str, list[tuple[str, int]]] = {}
    for host, day, n in conn.execute(
            "select host, date(ts, 'unixepoch') as d, count(*) from alerts where ts >= ? "
            "group by host, d order by host, d", (since,)):
        out.setdefault(host, []).append((day, n))
    return out


def open_summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Open alerts in all and per host, and the newest few, for `milton status` and briefings."""
    per_host = dict(conn.execute(
        "select host, count(*) from alerts where acked_at is null group by host order by host"))
    newest = [{"id": i, "host": h, "name": n, "count": c, "last_ts": t} for i, h, n, c, t in conn.execute(
        "select id, host, name, count, last_ts from alerts where acked_at is null "
        "order by last_ts desc limit 5")]
    return {"open": sum(per_host.values()), "hosts": per_host, "newest": newest}


# -- notifying ------------------------------------------------------------------------------
def describe(alert: dict[str, Any]) -> str:
    """One line: what, where, as whom, why (text from outside made literal)."""
    from milton.core.text import safe

    who = f" as {safe(alert['username'])}" if alert.get("username") else ""
    parent = f" (parent {safe(alert['parent'])})" if alert.get("parent") else ""
    why = "; ".join(safe(r) for r in alert.get("reasons") or []) or "flagged"
    return f"#{alert['id']} {safe(alert['host'])}: {safe(alert['name'])}{who}{parent}: {why}"


def notify_new(settings: Any, db: sqlite_utils.Database, new: Sequence[dict[str, Any]],
               now: float) -> int:
    """Notify about new alerts through ntfy, at most ``notify.alerts_per_hour`` messages an
    hour (counted in the store, so restarts don't reset it). Alerts over the limit stay
    un-notified and are summed up in the next message the limit allows. Returns messages sent.
    """
    from milton.core.notify import enabled, notify

    if not enabled(settings, "alert"):
        return 0
    conn = db.conn
    sent_last_hour = conn.execute(
        "select count(distinct notified_at) from alerts where notified_at >= ?",
        (now - 3600,)).fetchone()[0]
    if sent_last_hour >= settings.notify.alerts_per_hour:
        return 0
    pending = list_pending(conn)
    if not pending and not new:
        return 0
    alerts = pending or list(new)
    title = (f"Milton: new alert on {alerts[0]['host']}: {alerts[0]['name']}" if len(alerts) == 1
             else f"Milton: {len(alerts)} new alerts on "
                  f"{', '.join(sorted({a['host'] for a in alerts}))}")
    lines = [describe(a) for a in alerts[:10]]
    if len(alerts) > 10:
        lines.append(f"... and {len(alerts) - 10} more: milton alerts")
    if not notify(settings, "alert", title, "\n".join(lines), priority="high"):
        return 0
    with db.atomic():
        conn.executemany("update alerts set notified_at = ? where id = ?",
                         [(now, a["id"]) for a in alerts])
    return 1


def list_pending(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Open alerts not notified yet, oldest first."""
    return [_row(v) for v in conn.execute(
        f"select {', '.join(COLUMNS)} from alerts where notified_at is null and acked_at is null "
        "order by first_ts, id limit 200")]


def record_and_notify(settings: Any, scored: Sequence[dict[str, Any]], snapshot_id: str | None,
                      model_version: str | None) -> list[dict[str, Any]]:
    """Serve's path (live snapshots and pushed ones): record the flagged rows of one scored
    snapshot, then notify about the new alerts. Returns the new alerts."""
    import time

    from milton.core.store import open_store

    if not any(r["flagged"] for r in scored):
        return []
    db = open_store(settings.db_path, settings.store.busy_timeout_ms)
    try:
        new = record(db, scored, snapshot_id=snapshot_id, model_version=model_version)
        if new:
            notify_new(settings, db, new, time.time())
        return new
    finally:
        db.close()


def alert_on_rows(settings: Any, model: Any, model_version: str | None,
                  rows: Sequence[tuple]) -> list[dict[str, Any]]:
    """Score full process rows (``COLUMNS`` order, one or more snapshots, e.g. pushed by fleet
    agents) snapshot by snapshot, and record and notify alerts for the flagged ones."""
    from milton.anomaly.detect import score_rows

    by_snapshot: dict[str, list[tuple]] = {}
    for row in rows:
        by_snapshot.setdefault(row[0], []).append(row)
    new: list[dict[str, Any]] = []
    for sid, group in by_snapshot.items():
        new += record_and_notify(settings, score_rows(model, group), sid, model_version)
    return new
