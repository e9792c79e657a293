"""`milton detect`: score the latest snapshot of each host (or a file) with the current model."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from milton.anomaly.model import AnomalyModel, load_verified, scoring_rows
from milton.core.config import Settings
from milton.core.errors import ArtifactError, InputError
from milton.core.jobs import STORE_LOCK, job_lock
from milton.core.store import open_store
from milton.models.layout import ANOMALY_KIND, artifact_store


def current_model(settings: Settings) -> AnomalyModel:
    store = artifact_store(settings, ANOMALY_KIND)
    if store.current_name() is None:
        raise ArtifactError("no anomaly model yet: run `milton train-anomaly` once enough "
                            "snapshots are ingested")
    return load_verified(store)


def latest_snapshot_rows(settings: Settings, now: datetime) -> list[tuple]:
    """Full process rows (COLUMNS order) of each host's newest snapshot at or before ``now``."""
    with job_lock(settings.locks_dir, STORE_LOCK, shared=True):  # never mid-restore
        return _latest_rows(settings, now)


def _latest_rows(settings: Settings, now: datetime) -> list[tuple]:
    db = open_store(settings.db_path, settings.store.busy_timeout_ms)
    try:
        return latest_rows(db.conn, now.timestamp())
    finally:
        db.close()


def latest_rows(conn: Any, now: float, *, contains: str | None = None,
                limit: int | None = None) -> list[tuple]:
    """Process rows (COLUMNS order) of each host's newest snapshot at or before ``now``;
    ``contains``: only those whose name, exe or user holds that text (case-insensitive).
    Reads one snapshot per host through the (host, ts) and (snapshot_id, pid) indexes."""
    where, params = "", [now]
    if contains:
        where = ("where instr(lower(p.name), ?) or instr(lower(ifnull(p.exe, '')), ?) "
                 "or instr(lower(ifnull(p.username, '')), ?)")
        params += [contains.lower()] * 3
    sql = f"""
        select p.snapshot_id, p.host, p.ts, p.pid, p.ppid, p.name, p.exe, p.username,
               p.cpu, p.rss, p.create_time
        from processes p join (
            select s.id from snapshots s
            join (select host, max(ts) as ts from snapshots where ts <= ? group by host) m
              on s.host = m.host and s.ts = m.ts
        ) latest on p.snapshot_id = latest.id
        {where}
        order by p.host, p.pid"""
    if limit is not None:
        sql += f" limit {int(limit)}"
    return conn.execute(sql, params).fetchall()


def file_rows(path: str, max_line_bytes: int) -> list[tuple]:
    from milton.core.inputs import open_source
    from milton.ingest.processes import parse_records

    handle, source, close = open_source(path)
    try:
        rows = []
        for number, row, error in parse_records(handle, source=source, fmt=None,
                                                max_line_bytes=max_line_bytes):
            if error:
                raise InputError(f"{source}:{number}: {error}")
            rows.append(row)
    finally:
        if close:
            handle.close()
    if not rows:
        raise InputError(f"{source}: empty, no rows to score")
    return rows


def score_rows(model: AnomalyModel, rows: list[tuple]) -> list[dict[str, Any]]:
    """Score full process rows; reasons are computed for flagged rows only (they cost more)."""
    scoring = scoring_rows(rows)
    result = model.score(scoring)
    out = []
    for row, srow, score, flagged in zip(rows, scoring, result.scores, result.flagged):
        out.append({
            "host": row[1], "ts": row[2], "pid": row[3], "ppid": row[4], "name": row[5],
            "exe": row[6], "username": row[7], "parent": srow[7], "score": round(float(score), 6),
            "flagged": bool(flagged), "reasons": model.reasons(srow) if flagged else [],
        })
    return out


def detect(settings: Settings, *, from_file: str | None = None,
           now: datetime | None = None) -> dict[str, Any]:
    from milton.core.timeutil import utcnow

    model = current_model(settings)
    if from_file is not None:
        rows = file_rows(from_file, settings.ingest.max_line_bytes)
    else:
        rows = latest_snapshot_rows(settings, now or utcnow())
        if not rows:
            raise InputError("no snapshots in the store yet: run `milton ingest processes`")
    scored = score_rows(model, rows)
    scored.sort(key=lambda r: -r["score"])
    return {
        "model_version": model.version,
        "threshold": model.threshold,
        "scored": len(scored),
        "flagged": sum(r["flagged"] for r in scored),
        "rows": scored,
    }
