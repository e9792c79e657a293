"""Schema history and how it is applied. Append new migrations at the end; never change one
that has shipped.

:data:`MIGRATIONS` lists every migration in order (each registered by :func:`migration` as it
is defined below); :func:`migrate` applies the pending ones, each in its own transaction, and
records it in ``_migrations``, so the schema version is the number of rows there.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from milton.core.timeutil import iso, utcnow

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    """Register a migration. Append only: never edit or reorder a released one."""
    MIGRATIONS.append((fn.__name__, fn))
    return fn


def schema_version(db: sqlite_utils.Database) -> int:
    if "_migrations" not in db.table_names():
        return 0
    return db.execute("select count(*) from _migrations").fetchone()[0]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order; return the names applied."""
    if "_migrations" not in db.table_names():
        db.execute(
            "create table if not exists _migrations "
            "(id integer primary key, name text not null unique, applied_at text not null)"
        )
    done = {row[0] for row in db.execute("select name from _migrations")}
    applied: list[str] = []
    for index, (name, fn) in enumerate(MIGRATIONS, start=1):
        if name in done:
            continue
        with db.atomic():
            # Re-check under the write lock: another process may have just applied it.
            if db.execute("select 1 from _migrations where name = ?", [name]).fetchone():
                continue
            fn(db)
            db.execute(
                "insert into _migrations (id, name, applied_at) values (?, ?, ?)",
                [index, name, iso(utcnow())],
            )
        applied.append(name)
    return applied


# -- the migrations, oldest first -------------------------------------------------------------


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


@migration
def m004_memory(db: sqlite_utils.Database) -> None:
    # Sessions keep every raw message (training data); memories are what search sees.
    db.execute(
        """
        create table sessions (
            id text primary key,
            user text,
            source text not null,
            started real not null,
            last_activity real not null,
            ended real,
            status text not null check (status in ('open', 'ended', 'processed')),
            content_hash text unique,
            topics text,
            metadata text
        )
        """
    )
    db.execute("create index sessions_status on sessions (status, last_activity)")
    db.execute(
        """
        create table messages (
            id integer primary key,
            session_id text not null references sessions (id) on delete cascade,
            seq integer not null,
            role text not null check (role in ('system', 'user', 'assistant', 'tool')),
            content text not null,
            ts real not null,
            metadata text,
            unique (session_id, seq)
        )
        """
    )
    # tier: short (raw exchanges), working (tasks), long (summaries, knowledge, facts).
    db.execute(
        """
        create table memories (
            id integer primary key,
            tier text not null check (tier in ('short', 'working', 'long')),
            category text not null default 'note',
            content text not null check (length(content) > 0),
            importance real not null default 0.5 check (importance between 0 and 1),
            tags text not null default '[]',
            created real not null,
            last_accessed real not null,
            access_count integer not null default 0,
            session_id text references sessions (id) on delete set null,
            source text,
            source_messages text,
            content_hash text not null,
            unique (tier, content_hash)
        )
        """
    )
    db.execute("create index memories_tier_created on memories (tier, created)")
    db.execute("create index memories_session on memories (session_id)")
    db.execute("create index memories_source on memories (source)")
    # Vectors as float32 blobs: this Python's sqlite3 cannot load vector extensions.
    db.execute(
        """
        create table memory_vectors (
            memory_id integer primary key references memories (id) on delete cascade,
            model text not null,
            dim integer not null,
            vector blob not null
        )
        """
    )
    db.execute("create index memory_vectors_model on memory_vectors (model)")
    db.execute(
        "create virtual table memories_fts using fts5("
        "content, tags, content='memories', content_rowid='id', tokenize='porter unicode61')"
    )
    db.execute(
        """
        create trigger memories_fts_ai after insert on memories begin
            insert into memories_fts (rowid, content, tags) values (new.id, new.content, new.tags);
        end
        """
    )
    db.execute(
        """
        create trigger memories_fts_ad after delete on memories begin
            insert into memories_fts (memories_fts, rowid, content, tags)
            values ('delete', old.id, old.content, old.tags);
        end
        """
    )
    db.execute(
        """
        create trigger memories_fts_au after update of content, tags on memories begin
            insert into memories_fts (memories_fts, rowid, content, tags)
            values ('delete', old.id, old.content, old.tags);
            insert into memories_fts (rowid, content, tags) values (new.id, new.content, new.tags);
        end
        """
    )
    # Searchers cache vectors in RAM; any deletion bumps this so they reload instead of
    # returning a deleted memory (inserts are picked up incrementally by rowid).
    db.execute("create table memory_epoch (id integer primary key check (id = 1), deletions integer not null)")
    db.execute("insert into memory_epoch values (1, 0)")
    db.execute(
        """
        create trigger memory_vectors_ad after delete on memory_vectors begin
            update memory_epoch set deletions = deletions + 1 where id = 1;
        end
        """
    )
    db.execute(
        """
        create table tasks (
            memory_id integer primary key references memories (id) on delete cascade,
            type text not null default 'task',
            status text not null default 'pending'
                check (status in ('pending', 'active', 'blocked', 'done', 'cancelled')),
            depends_on text not null default '[]',
            updated real not null
        )
        """
    )
    db.execute(
        """
        create table preferences (
            key text not null,
            value text not null,
            evidence integer not null default 0,
            sessions integer not null default 0,
            first_seen real not null,
            last_seen real not null,
            primary key (key, value)
        )
        """
    )
    db.execute(
        """
        create table documents (
            path text primary key,
            sha256 text not null,
            size integer not null,
            chunks integer not null,
            ingested real not null
        )
        """
    )
    # Cumulative counters (sessions, messages, memories, fine-tunes): never decrease.
    db.execute("create table counters (name text primary key, value integer not null default 0)")


@migration
def m005_memories_fts_vocab(db: sqlite_utils.Database) -> None:
    # Document frequency per (stemmed) term, so search can drop terms too common to rank by:
    # OR-ing "password" over 100k memories costs bm25 on tens of thousands of rows.
    db.execute("create virtual table memories_fts_vocab using fts5vocab('memories_fts', 'row')")


@migration
def m006_training(db: sqlite_utils.Database) -> None:
    # Everything train-lora ever exported, deduplicated by content, so later runs can replay
    # older items and build the regression set from older held-out ones.
    db.execute(
        """
        create table training_items (
            id integer primary key,
            kind text not null check (kind in ('pair', 'text')),
            source text not null,
            prompt text,
            response text not null,
            split text not null check (split in ('train', 'eval')),
            content_hash text not null unique,
            redacted integer not null default 0,
            run_id integer,
            created real not null
        )
        """
    )
    db.execute("create index training_items_split on training_items (split, run_id)")
    # One row per train-lora attempt. A run killed mid-training keeps status 'running' and
    # its checkpoint; the next run resumes it instead of starting over.
    db.execute(
        """
        create table training_runs (
            id integer primary key,
            job_run_id integer,
            started text not null,
            finished text,
            status text not null
                check (status in ('running', 'promoted', 'rejected', 'failed')),
            watermark_message_id integer not null default 0,
            watermark_document_ts real not null default 0,
            base_model text,
            base_sha256 text,
            candidate_version text,
            metrics text,
            reason text
        )
        """
    )
    db.execute(
        """
        create table training_history (
            run_id integer not null references training_runs (id) on delete cascade,
            step integer not null,
            loss real not null,
            lr real not null,
            tokens integer not null,
            elapsed_s real not null,
            primary key (run_id, step)
        )
        """
    )


@migration
def m007_evolve(db: sqlite_utils.Database) -> None:
    # One row per evolve attempt. A run killed mid-stage keeps status 'running' (and its
    # finished stages under data/evolve/run-<id>/); the next run resumes it.
    db.execute(
        """
        create table evolve_runs (
            id integer primary key,
            job_run_id integer,
            started text not null,
            finished text,
            status text not null
                check (status in ('running', 'promoted', 'rejected', 'failed')),
            stage text,
            source text,
            source_sha256 text,
            adapter_version text,
            candidate_version text,
            metrics text,
            reason text
        )
        """
    )


@migration
def m008_process_lineage(db: sqlite_utils.Database) -> None:
    # The anomaly profile resolves each row's parent (same snapshot, pid = ppid): one index
    # lookup per row. (snapshot_id, pid) also serves every lookup by snapshot_id alone.
    db.execute("create index processes_snapshot_pid on processes (snapshot_id, pid)")
    db.execute("drop index processes_snapshot")


@migration
def m009_alert_dedupe(db: sqlite_utils.Database) -> None:
    # One open alert per process identity per UTC day: sightings raise ``count`` and
    # ``last_ts`` instead of adding a row a minute. Rows stored before are folded the same way.
    for column, kind in (("ident", "text"), ("day", "text"), ("first_ts", "real"),
                         ("last_ts", "real"), ("count", "integer not null default 1"),
                         ("parent", "text"), ("acked_at", "real"), ("notified_at", "real")):
        db.execute(f"alter table alerts add column {column} {kind}")
    db.execute(
        "update alerts set ident = host || char(0) || name || char(0) || ifnull(username, '') "
        "|| char(0) || ifnull(exe, ''), day = date(ts, 'unixepoch'), first_ts = ts, last_ts = ts, "
        "notified_at = ts")  # stored before: not worth a flood of late notifications
    db.execute("create index alerts_fold on alerts (ident, day)")  # keeps the folding linear
    db.execute(
        """
        update alerts set
            count = (select count(*) from alerts o where o.ident = alerts.ident and o.day = alerts.day),
            last_ts = (select max(ts) from alerts o where o.ident = alerts.ident and o.day = alerts.day)
        where id in (select min(id) from alerts group by ident, day)
        """
    )
    db.execute("delete from alerts where id not in (select min(id) from alerts group by ident, day)")
    db.execute("drop index alerts_fold")
    db.execute("create unique index alerts_ident_day on alerts (ident, day)")
    db.execute("create index alerts_open on alerts (acked_at, last_ts)")
    db.execute(
        """
        create table alert_mutes (
            id integer primary key,
            name text not null,
            host text not null default '',
            created real not null,
            unique (name, host)
        )
        """
    )


@migration
def m010_job_runs_lookup(db: sqlite_utils.Database) -> None:
    # `milton status` and the dashboard read each job's newest run, its failure streak and its
    # last success: index lookups with these, instead of scans of the job's year of runs.
    db.execute("create index job_runs_job_id on job_runs (job, id)")
    db.execute("create index job_runs_job_status_started on job_runs (job, status, started)")


@migration
def m011_training_facts(db: sqlite_utils.Database) -> None:
    # Facts the user taught (their own words: "my cat is named Quillon", /remember notes),
    # parsed by train-lora. Every fact becomes training items in many phrasings each night
    # (cumulative), and the facts of promoted runs are the retention set the gate probes. A
    # restated fact (same key) is a newer row; the newest row per key is the one in force.
    db.execute(
        """
        create table training_facts (
            id integer primary key,
            key text not null,
            subject text not null,
            relation text not null,
            verb text not null,
            value text not null,
            source text not null,
            run_id integer references training_runs (id) on delete set null,
            created real not null,
            unique (key, value, source)
        )
        """
    )
    db.execute("create index training_facts_key on training_facts (key, id)")
    # The gate's recall figures per run (the whole measurement stays in ``metrics``).
    for column in ("recall_new", "recall_retention", "serving_recall_new",
                   "serving_recall_retention"):
        db.execute(f"alter table training_runs add column {column} real")


@migration
def m012_feedback(db: sqlite_utils.Database) -> None:
    # Ratings of assistant answers (POST /v1/feedback, /good and /bad in milton chat), keyed by
    # the completion id that is in the answer's message metadata (request_id). Append only: the
    # latest rating of a completion counts; train-lora reads them to pick training targets.
    db.execute(
        """
        create table feedback (
            id integer primary key,
            completion_id text not null,
            rating text not null check (rating in ('good', 'bad')),
            source text,
            note text,
            ts real not null
        )
        """
    )
    db.execute("create index feedback_completion on feedback (completion_id, id)")
