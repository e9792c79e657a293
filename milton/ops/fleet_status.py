"""What `milton status` and briefings say about the detector: open alerts and the hosts that
report (this one, agents pushing to this hub, files from elsewhere). Read-only SQL over the
store's tables: ops imports only core, so nothing here goes through milton.anomaly."""

from __future__ import annotations

import sqlite3
from typing import Any


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"pragma table_info({table})")}


def alert_summary(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """Open alerts in all and per host, and the newest five; None before the alerts schema.
    (milton.anomaly.alerts.open_summary says the same to serve; ops may not import anomaly.)"""
    if "acked_at" not in _columns(conn, "alerts"):
        return None
    per_host = dict(conn.execute(
        "select host, count(*) from alerts where acked_at is null group by host order by host"))
    newest = [{"id": i, "host": h, "name": n, "count": c, "last_ts": t} for i, h, n, c, t in
              conn.execute("select id, host, name, count, last_ts from alerts "
                           "where acked_at is null order by last_ts desc limit 5")]
    return {"open": sum(per_host.values()), "hosts": per_host, "newest": newest}


def host_summary(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """One entry per host with snapshots: the newest one, how long ago, and where from."""
    if "snapshots" not in {r[0] for r in conn.execute(
            "select name from sqlite_master where type = 'table'")}:
        return []
    out = []
    for host, last in conn.execute("select host, max(ts) from snapshots group by host order by host"):
        source = conn.execute("select source from snapshots where host = ? and ts = ? limit 1",
                              (host, last)).fetchone()
        out.append({"host": host, "last_snapshot_ts": last, "age_s": round(now - last, 1),
                    "source": source[0] if source else None})
    return out
