"""Schema history. Append new migrations at the end; never change one that has shipped."""

from __future__ import annotations

import sqlite_utils

from milton.core.store import migration


@migration
def m001_job_runs(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        create table job_runs (
            id integer primary key,
            job text not null,
            started text not null,
            finished text,
            status text not null check (status in ('running', 'ok', 'skipped', 'failed')),
            metrics text,
            error text,
            host text,
            pid integer,
            now text
        )
        """
    )
    db.execute("create index job_runs_job_started on job_runs (job, started)")


@migration
def m002_processes(db: sqlite_utils.Database) -> None:
    # STRICT + CHECK: SQLite validates every row in C on the hot ingest path; Python only
    # re-checks row by row to explain a failure. ts and create_time are epoch seconds (UTC).
    db.execute(
        """
        create table snapshots (
            id text primary key,
            host text not null,
            ts real not null,
            source text not null,
            rows integer not null
        ) strict
        """
    )
    db.execute("create index snapshots_host_ts on snapshots (host, ts)")
    db.execute("create index snapshots_ts on snapshots (ts)")
    db.execute(
        """
        create table processes (
            snapshot_id text not null,
            host text not null check (length(host) between 1 and 255),
            ts real not null check (ts > 0),
            pid integer not null check (pid >= 0),
            ppid integer check (ppid >= 0),
            name text not null check (length(name) between 1 and 1024),
            exe text check (length(exe) <= 4096),
            username text check (length(username) <= 256),
            cpu real check (cpu >= 0),
            rss integer check (rss >= 0),
            create_time real check (create_time >= 0)
        ) strict
        """
    )
    db.execute("create index processes_ts on processes (ts)")
    db.execute("create index processes_snapshot on processes (snapshot_id)")


@migration
def m003_alerts(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        create table alerts (
            id integer primary key,
            ts real not null,
            host text not null,
            snapshot_id text,
            pid integer,
            name text not null,
            username text,
            exe text,
            score real not null,
            model_version text,
            reasons text
        )
        """
    )
    db.execute("create index alerts_ts on alerts (ts)")
