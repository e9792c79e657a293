"""The runner every scheduled command goes through.

It gives each run: a non-blocking lock (a second copy exits 75), for heavy jobs a shared
lock they queue on (so they never run at once), a ``job_runs`` row that is
'running' while it works and ok/skipped/failed after, one JSON line in ``data/logs/jobs.jsonl``,
and a :class:`JobContext` with the settings, store, logger and the (possibly replayed) ``now``.

Long jobs that survive their own death (train-lora, evolve) also keep one row per attempt in
their ``*_runs`` table and their work in ``data/<job>/run-<id>/``: :func:`unfinished_run` finds
the attempt to resume, :func:`finish_run` closes one, :func:`work_dir` is where it works.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import sqlite_utils

from milton.core.config import Settings
from milton.core.errors import BusyError, DiskFullError, MiltonError, is_disk_full
from milton.core.log import get_logger, log_event
from milton.core.store import open_store
from milton.core.timeutil import iso, utcnow

MASTER_LOG = "jobs.jsonl"


class Skip(Exception):
    """Raised by a job that had nothing to do (not enough data...). Exit code 0."""

    def __init__(self, reason: str, **metrics: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = metrics


@dataclass
class JobContext:
    job: str
    settings: Settings
    db: sqlite_utils.Database
    now: datetime
    run_id: int
    logger: Any

    def log(self, msg: str, **fields: Any) -> None:
        log_event(self.logger, msg, job=self.job, run_id=self.run_id, **fields)


@dataclass
class JobResult:
    job: str
    run_id: int | None
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration_s: float = 0.0


#: Jobs that compete for CPU, RAM and disk bandwidth: they queue on one shared lock instead
#: of running at once (Sunday 02:00 has compress-memory and train-lora due together).
RESOURCE_GROUPS: dict[str, str] = {
    "train-lora": "heavy",
    "compress-memory": "heavy",
    "backup": "heavy",
    "evolve": "heavy",
}
SERVE_LOCK = "serve"
STORE_LOCK = "store"  # shared by every job and serve; exclusive for restore


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


@contextmanager
def job_lock(locks_dir: Path, name: str, *, wait_s: float = 0.0, poll_s: float = 0.5,
             shared: bool = False) -> Iterator[None]:
    """flock-based: released by the kernel when the process dies, even on kill -9.

    ``wait_s`` > 0 queues behind the holder (polling, so the wait is bounded and logged);
    0 fails at once with :class:`BusyError`. ``shared`` locks coexist with each other and
    exclude only an exclusive holder (see :func:`exclusive_store_access`).
    """
    path = locks_dir / f"{name}.lock"
    try:
        locks_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MiltonError(f"{locks_dir}: cannot create lock file: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait_s:.0f}s" if wait_s else ""
                    who = "restore or another exclusive user" if shared else _lock_holder(path)
                    raise BusyError(f"{name}: busy, skipped{waited} ({who} holds {path})") from None
                time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def owner_gone(locks_dir: Path, job: str, host: str | None, pid: int | None) -> bool:
    """Whether a 'running' row's process is certainly dead: the job's lock is free and, when
    it ran on this host, its pid no longer exists (kill -9, OOM kill, power loss).

    Read-only: the lock file is never created, and the probe (a shared, non-blocking flock,
    released at once) is only made once the pid is known to be gone.
    """
    if host == socket.gethostname() and pid:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            pass  # gone
        except (OSError, ValueError, OverflowError):
            return False  # exists (another user's process), or a pid we cannot judge
        else:
            return False
    try:
        fd = os.open(locks_dir / f"{job}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False  # held: a run of this job is alive (here, or the pid was reused)
    finally:
        os.close(fd)


def _busy_names(locks_dir: Path) -> list[str]:
    """Which named locks are held right now (a probe: take and release each)."""
    busy = []
    for path in sorted(locks_dir.glob("*.lock")) if locks_dir.is_dir() else []:
        if path.stem == STORE_LOCK:
            continue
        try:
            with job_lock(locks_dir, path.stem):
                pass
        except BusyError:
            busy.append(f"{path.stem} ({_lock_holder(path)})")
    return busy


@contextmanager
def exclusive_store_access(settings: Settings, *, force: bool = False) -> Iterator[list[str]]:
    """The store to ourselves, for restore-like work: no job or serve runs, none can start.

    Every job run and serve hold ``store.lock`` shared; this takes it exclusively. Raises
    :class:`BusyError` naming the holders, unless ``force`` (then their names are yielded
    and the caller proceeds without the lock).
    """
    locks_dir = settings.locks_dir
    try:
        with job_lock(locks_dir, STORE_LOCK):
            yield []
            return
    except BusyError:
        busy = _busy_names(locks_dir) or ["an unnamed process"]
        if not force:
            raise BusyError("the store is in use by " + ", ".join(busy)
                            + "; stop serve and wait for jobs to finish, or use --force") from None
    yield busy


def append_master_log(logs_dir: Path, entry: dict[str, Any]) -> None:
    """One line per run, written with a single O_APPEND write so concurrent jobs never interleave."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, default=str, ensure_ascii=False) + "\n").encode()
    fd = os.open(logs_dir / MASTER_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# -- reading the run history -------------------------------------------------------------------
RUN_COLUMNS = ("id", "job", "started", "finished", "status", "metrics", "error", "host", "pid", "now")


def _run_row(values: Any) -> dict[str, Any]:
    row = dict(zip(RUN_COLUMNS, values))
    try:
        row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
    except json.JSONDecodeError:
        row["metrics"] = {}
    duration = row["metrics"].get("duration_s")
    row["duration_s"] = duration if isinstance(duration, (int, float)) else None
    return row


def recent_runs(conn: Any, *, job: str | None = None, since: str | None = None,
                limit: int = 500) -> list[dict[str, Any]]:
    """Job runs, newest first (metrics decoded): at most ``limit``, started at or after
    ``since`` (ISO), of one ``job`` or all. Bounded by the (job, started) index and the limit,
    never by the table's size."""
    where, params = [], []
    if job is not None:
        where.append("job = ?")
        params.append(job)
    if since is not None:
        where.append("started >= ?")
        params.append(since)
    sql = (f"select {', '.join(RUN_COLUMNS)} from job_runs"
           + (f" where {' and '.join(where)}" if where else "")
           + (" order by started desc, id desc" if job is not None else " order by id desc")
           + " limit ?")
    return [_run_row(v) for v in conn.execute(sql, [*params, max(0, limit)])]


def job_names(conn: Any) -> list[str]:
    """Every job that has run (one skip-scan of the (job, started) index per name)."""
    names: list[str] = []
    row = conn.execute("select min(job) from job_runs").fetchone()
    while row and row[0] is not None:
        names.append(row[0])
        row = conn.execute("select min(job) from job_runs where job > ?", [row[0]]).fetchone()
    return names


def get_run(conn: Any, run_id: int) -> dict[str, Any] | None:
    """One job run (metrics decoded), or None."""
    values = conn.execute(f"select {', '.join(RUN_COLUMNS)} from job_runs where id = ?",
                          [run_id]).fetchone()
    return _run_row(values) if values else None


# -- resumable runs (one row per attempt in a ``*_runs`` table) ---------------------------------
def work_dir(settings: Settings, job: str, run_id: int) -> Path:
    """``data/<job>/run-<id>/``: where an attempt keeps its work until it finishes."""
    return settings.paths.data_dir / job / f"run-{run_id:06d}"


def finish_run(db: sqlite_utils.Database, table: str, run_id: int, status: str, *, reason: str,
               **columns: Any) -> None:
    """Close an attempt: its final ``status``, when and why, and any other ``columns``."""
    with db.atomic():
        db.table(table).update(run_id, {"status": status, "finished": iso(utcnow()), "reason": reason,
                                  **columns})


def unfinished_run(db: sqlite_utils.Database, table: str, same: dict[str, Any], *, reason: str,
                   **abandoned: Any) -> int | None:
    """The attempt to resume: the newest row of ``table`` still 'running' (its process died),
    if its ``same`` columns still hold those values. One started from something else is given
    up (:func:`finish_run` 'failed' with ``reason`` and the ``abandoned`` columns) and None
    returned, as when there is none."""
    row = db.execute(f"select id, {', '.join(same)} from {table} where status = 'running' "
                     "order by id desc limit 1").fetchone()
    if row is None:
        return None
    if list(row[1:]) == list(same.values()):
        return int(row[0])
    finish_run(db, table, int(row[0]), "failed", reason=reason, **abandoned)
    return None


def out_of_space_message(job: str, exc: BaseException, settings: Settings) -> str:
    """One line for a job that ran out of disk: where, why, and that nothing was half-written."""
    where = getattr(exc, "filename", None) or (
        settings.db_path if isinstance(exc, sqlite3.Error) else None)
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    place = f" writing {where}" if where else (
        f" (store in {settings.paths.data_dir}, models in {settings.paths.checkpoints_dir})")
    return (f"{job}: out of disk space{place}: {detail}; this run's changes were rolled back: "
            "free some space and run it again")


def run_job(
    job: str,
    fn: Callable[[JobContext], dict[str, Any] | None],
    settings: Settings,
    *,
    now: datetime | None = None,
    lock: str | None = None,
    db: sqlite_utils.Database | None = None,
) -> JobResult:
    """Run ``fn`` under the job's lock and record it. Raises on failure (after recording)."""
    logger = get_logger(job)
    now = now or utcnow()
    lock_name = lock or job
    host, pid = socket.gethostname(), os.getpid()
    started_wall = utcnow()

    def finish(run_id: int | None, status: str, metrics: dict[str, Any], error: str | None,
               t0: float, store: sqlite_utils.Database | None) -> JobResult:
        finished = utcnow()
        duration = round(time.monotonic() - t0, 4)
        if store is not None and run_id is not None:
            store.table("job_runs").update(
                run_id,
                {"finished": iso(finished), "status": status,
                 "metrics": json.dumps({**metrics, "duration_s": duration}, default=str),
                 "error": error},
            )
        append_master_log(settings.logs_dir, {
            "job": job, "run_id": run_id, "status": status, "started": iso(started_wall),
            "finished": iso(finished), "duration_s": duration, "now": iso(now),
            "metrics": metrics, "error": error, "host": host, "pid": pid,
        })
        return JobResult(job, run_id, status, metrics, error, duration)

    t0 = time.monotonic()
    own_db = db is None
    group = RESOURCE_GROUPS.get(job)
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(job_lock(settings.locks_dir, STORE_LOCK, shared=True))
            held.enter_context(job_lock(settings.locks_dir, lock_name))
            if group:
                held.enter_context(job_lock(settings.locks_dir, group,
                                            wait_s=settings.jobs.heavy_wait_s))
            store = db or open_store(settings.db_path, settings.store.busy_timeout_ms)
            try:
                # We hold the lock, so any 'running' row of this job belongs to a dead process.
                with store.atomic():
                    store.conn.execute(
                        "update job_runs set status = 'failed', finished = ?, error = ? "
                        "where job = ? and status = 'running'",
                        (iso(utcnow()), "interrupted: the process died before finishing", job))
                run_id = cast(int, store.table("job_runs").insert({
                    "job": job, "started": iso(started_wall), "status": "running",
                    "host": host, "pid": pid, "now": iso(now),
                }).last_pk)
                ctx = JobContext(job, settings, store, now, run_id, logger)
                try:
                    metrics = fn(ctx) or {}
                except Skip as skip:
                    result = finish(run_id, "skipped", {"reason": skip.reason, **skip.metrics},
                                    None, t0, store)
                    log_event(logger, f"{job}: skipped: {skip.reason}", job=job, status="skipped")
                    return result
                except BaseException as exc:
                    full = is_disk_full(exc) and not isinstance(exc, MiltonError)
                    message = str(exc) or type(exc).__name__
                    if full:
                        message = out_of_space_message(job, exc, settings)
                    elif not isinstance(exc, MiltonError):
                        message = f"{type(exc).__name__}: {message}"
                    try:
                        finish(run_id, "failed", {}, message, t0, store)
                    except (OSError, sqlite3.Error):
                        if not full:
                            raise  # a full disk may refuse the record too; the error still shows
                    log_event(logger, f"{job}: failed: {message}", level=40, job=job, status="failed")
                    if full:
                        raise DiskFullError(message) from None
                    raise
                result = finish(run_id, "ok", metrics, None, t0, store)
                log_event(logger, f"{job}: ok", job=job, status="ok",
                          duration_s=result.duration_s, **metrics)
                return result
            finally:
                if own_db:
                    store.close()
    except BusyError as exc:
        # Recorded so `milton status` can show skipped runs; the lock holder keeps going.
        append_master_log(settings.logs_dir, {
            "job": job, "run_id": None, "status": "skipped", "started": iso(started_wall),
            "finished": iso(utcnow()), "duration_s": 0.0, "now": iso(now),
            "metrics": {"reason": "busy"}, "error": str(exc), "host": host, "pid": pid,
        })
        log_event(logger, str(exc), level=30, job=job, status="busy")
        raise
