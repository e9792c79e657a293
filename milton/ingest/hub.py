"""The hub's side of a fleet: ``POST /ingest/processes`` bodies from `milton agent`.

The body is ``{"rows": [...]}`` (or a bare array) of process records, the same fields and the
same validation as snapshot files (:func:`milton.ingest.processes.normalize_record`). A body is
all or nothing: one bad row rejects it with the row's index and field, and nothing is written.
Snapshots are idempotent by id: an agent that resends a batch (it crashed after the hub
committed, before it recorded the send) adds nothing, so no row is ever stored twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from milton.core.errors import InputError
from milton.ingest.processes import COLUMNS, RowError, normalize_record

_INSERT = f"insert into processes ({', '.join(COLUMNS)}) values ({', '.join('?' * len(COLUMNS))})"


@dataclass
class PushReport:
    rows: int = 0
    snapshots: int = 0
    duplicate_snapshots: int = 0
    hosts: list[str] = field(default_factory=list)
    new_rows: list[tuple] = field(default_factory=list)  # stored now: scored for alerts

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "snapshots": self.snapshots,
                "duplicate_snapshots": self.duplicate_snapshots, "hosts": self.hosts}


class TooLarge(InputError):
    """The body carries more rows than ``serve.max_push_rows`` (HTTP 413)."""


def parse_body(body: bytes, max_rows: int) -> list[tuple]:
    """Decode and validate a push body into row tuples (``COLUMNS`` order)."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise InputError(f"body is not valid JSON: {str(exc)[:200]}") from None
    records = payload.get("rows") if isinstance(payload, dict) else payload
    if not isinstance(records, list):
        raise InputError('expected {"rows": [...]} or a JSON array of process rows')
    if len(records) > max_rows:
        raise TooLarge(f"{len(records)} rows; at most {max_rows} per request (serve.max_push_rows)")
    rows = []
    for index, record in enumerate(records):
        try:
            rows.append(normalize_record(record))
        except RowError as exc:
            raise InputError(f"rows[{index}]: {exc} (nothing ingested)") from None
    return rows


def store_push(db: sqlite_utils.Database, rows: list[tuple], source_prefix: str = "push") -> PushReport:
    """Store the snapshots in ``rows`` that the store does not have yet, in one transaction."""
    report = PushReport()
    snaps: dict[str, list[tuple]] = {}
    for index, row in enumerate(rows):
        group = snaps.setdefault(row[0], [])
        if group and group[0][1] != row[1]:
            raise InputError(f"rows[{index}]: snapshot {row[0]} mixes hosts (nothing ingested)")
        group.append(row)
    with db.atomic():
        conn = db.conn
        for sid, group in snaps.items():
            if conn.execute("select 1 from snapshots where id = ?", (sid,)).fetchone():
                report.duplicate_snapshots += 1
                continue
            host, ts = group[0][1], group[0][2]
            conn.execute("insert into snapshots (id, host, ts, source, rows) values (?, ?, ?, ?, ?)",
                         (sid, host, ts, f"{source_prefix}:{host}", len(group)))
            conn.executemany(_INSERT, group)
            report.snapshots += 1
            report.rows += len(group)
            report.new_rows.extend(group)
    report.hosts = sorted({g[0][1] for g in snaps.values()})
    return report
