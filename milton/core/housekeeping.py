"""Retention for the run history: ``job_runs`` rows, ``data/logs/jobs.jsonl`` and the
per-session JSON logs, which otherwise grow without bound (an ingest every 5 minutes is ~105k
job rows a year).

What status, the scheduler, the briefing and restore read is never deleted: each job's
newest ``jobs.runs_keep_last`` runs, its last ok run, every run still 'running', and
everything younger than ``jobs.runs_keep_days`` (failed runs: ``jobs.failed_runs_keep_days``).
Backups hold the store, models and config, not these logs. :func:`prune_history` runs from
the ingest job at most once a day (a stamp file), so no extra timer is needed.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.config import Settings
from milton.core.jobs import MASTER_LOG
from milton.core.timeutil import iso, utcnow

STAMP = ".housekeeping"
EVERY_S = 86400.0


def prune_job_runs(db: sqlite_utils.Database, now: datetime, *, keep_days: float,
                   failed_keep_days: float, keep_last: int) -> int:
    """Delete old finished job_runs rows; return how many."""
    ok_cutoff = iso(now - timedelta(days=keep_days))
    failed_cutoff = iso(now - timedelta(days=failed_keep_days))
    with db.atomic():
        cursor = db.conn.execute(
            """
            delete from job_runs where id in (
                select id from (
                    select id, job, started, status,
                           row_number() over (partition by job order by id desc) as newest
                    from job_runs
                ) where newest > :keep_last
                  and status != 'running'
                  and started < case when status = 'failed' then :failed_cutoff else :ok_cutoff end
                  and id not in (select max(id) from job_runs where status = 'ok' group by job)
            )
            """,
            {"keep_last": keep_last, "ok_cutoff": ok_cutoff, "failed_cutoff": failed_cutoff})
        return cursor.rowcount


def rotate_master_log(logs_dir: Path, *, max_bytes: int, keep: int) -> bool:
    """jobs.jsonl -> jobs.jsonl.1 -> .2 ... past ``max_bytes``; returns whether it rotated.

    rename(2) only: a job appending right now (O_APPEND on its own descriptor) finishes its
    line in the renamed file, so no line is torn or lost.
    """
    log = logs_dir / MASTER_LOG
    try:
        if log.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for n in range(keep, 0, -1):
        older = logs_dir / f"{MASTER_LOG}.{n}"
        if n == keep:
            older.unlink(missing_ok=True)
        else:
            try:
                os.replace(older, logs_dir / f"{MASTER_LOG}.{n + 1}")
            except FileNotFoundError:
                pass
    if keep == 0:
        log.unlink(missing_ok=True)
    else:
        os.replace(log, logs_dir / f"{MASTER_LOG}.1")
    return True


def prune_session_logs(logs_dir: Path, now: datetime, keep_days: float) -> int:
    """Delete ``sessions/*.json`` (and stray temp files) not modified within ``keep_days``."""
    folder = logs_dir / "sessions"
    cutoff = now.timestamp() - keep_days * 86400
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.endswith((".json", ".tmp")):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def prune_history(settings: Settings, db: sqlite_utils.Database, now: datetime | None = None, *,
                  force: bool = False) -> dict[str, Any] | None:
    """All three, at most once per day (``force`` ignores the stamp); None when not due.

    ``now`` defaults to the wall clock, which is what ``job_runs.started`` and file mtimes
    hold (a job replayed with ``--now`` must not age its own history).
    """
    now = now or utcnow()
    logs_dir = settings.logs_dir
    stamp = logs_dir / STAMP
    try:
        if not force and time.time() - stamp.stat().st_mtime < EVERY_S:
            return None
    except FileNotFoundError:
        pass
    cfg = settings.jobs
    result = {
        "job_runs_deleted": prune_job_runs(db, now, keep_days=cfg.runs_keep_days,
                                           failed_keep_days=cfg.failed_runs_keep_days,
                                           keep_last=cfg.runs_keep_last),
        "jobs_log_rotated": rotate_master_log(logs_dir, max_bytes=int(cfg.log_max_mb * 2**20),
                                              keep=cfg.log_keep_files),
        "session_logs_deleted": prune_session_logs(logs_dir, now, cfg.session_logs_keep_days),
    }
    logs_dir.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    os.utime(stamp)
    return result
