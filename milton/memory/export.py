"""Sessions out again: Milton's export JSONL, one record per session with its messages, which
``milton ingest conversations`` reads back."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

import sqlite_utils

EXPORT_VERSION = 1


def _iso_precise(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def iter_export(db: sqlite_utils.Database, since: float | None = None,
                session_ids: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Milton export records (one per session, oldest first)."""
    clauses, params = [], []
    if since is not None:
        clauses.append("last_activity >= ?")
        params.append(since)
    if session_ids is not None:
        clauses.append(f"id in ({','.join('?' * len(session_ids))})")
        params.extend(session_ids)
    where = ("where " + " and ".join(clauses)) if clauses else ""
    sessions = db.execute(f"select id, user, source, started, ended, status, topics, metadata from sessions "
                          f"{where} order by started, id", params).fetchall()
    for sid, user, source, started, ended, status, topics, metadata in sessions:
        messages = [{"role": role, "content": content, "ts": _iso_precise(ts),
                     "metadata": json.loads(meta) if meta else None}
                    for role, content, ts, meta in db.execute(
                        "select role, content, ts, metadata from messages where session_id = ? order by seq",
                        [sid])]
        yield {"milton_session": EXPORT_VERSION, "id": sid, "user": user, "source": source,
               "status": status, "started": _iso_precise(started), "ended": _iso_precise(ended),
               "topics": json.loads(topics) if topics else [],
               "metadata": json.loads(metadata) if metadata else None, "messages": messages}


def export_sessions(db: sqlite_utils.Database, out: TextIO, since: datetime | float | None = None,
                    session_ids: Sequence[str] | None = None) -> int:
    """Write Milton's export JSONL (re-ingestible with ``milton ingest conversations``); returns
    the number of sessions written."""
    if isinstance(since, datetime):
        since = since.timestamp()
    count = 0
    for record in iter_export(db, since, session_ids):
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count
