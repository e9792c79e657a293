"""The SQLite store (migrations, WAL, concurrent writers) and the job runner."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from datetime import datetime, timezone

import pytest
from helpers import REPO, assert_clean_error

from milton.core.errors import BusyError, InputError
from milton.core.jobs import Skip, job_lock, run_job
from milton.core.migrations import MIGRATIONS, migrate, schema_version
from milton.core.store import open_store

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)


# -- store -------------------------------------------------------------------------------
def test_migrations_applied_once_and_idempotent(tmp_path):
    path = tmp_path / "s" / "m.db"
    db = open_store(path)

    names = [name for name, _ in MIGRATIONS]
    assert len(names) >= 3
    assert schema_version(db) == len(names)
    assert {"job_runs", "snapshots", "processes", "alerts"} <= set(db.table_names())
    rows = db.execute("select id, name from _migrations order by id").fetchall()
    assert rows == list(enumerate(names, start=1))
    assert migrate(db) == []  # nothing pending on the same connection
    db.close()

    db = open_store(path)  # reopen: still one row per migration
    assert schema_version(db) == len(names)
    assert db.execute("select count(*) from _migrations").fetchone()[0] == len(names)
    db.close()


def test_wal_mode_busy_timeout_and_foreign_keys(tmp_path):
    db = open_store(tmp_path / "w.db", busy_timeout_ms=1234)
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert db.execute("pragma busy_timeout").fetchone()[0] == 1234
    assert db.execute("pragma foreign_keys").fetchone()[0] == 1
    db.close()
    raw = sqlite3.connect(tmp_path / "w.db")  # WAL is persistent in the file
    assert raw.execute("pragma journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_strict_tables_reject_bad_rows_in_sqlite(tmp_path):
    db = open_store(tmp_path / "s.db")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("insert into processes (snapshot_id, host, ts, pid, name, rss) "
                   "values ('s', 'h', 1.0, 1, 'x', -1)")
    with pytest.raises(sqlite3.DatabaseError):
        db.execute("insert into processes (snapshot_id, host, ts, pid, name) "
                   "values ('s', 'h', 1.0, 'abc', 'x')")
    db.close()


def test_garbage_database_file_is_a_clean_error(cli, milton_home):
    data = milton_home / "data"
    data.mkdir()
    (data / "milton.db").write_bytes(b"this is not sqlite" * 100)
    rc, out, err = cli("ingest", "processes")
    assert rc == 1
    assert_clean_error(err, "milton.db")


def test_atomic_rolls_back_on_error(tmp_path):
    db = open_store(tmp_path / "a.db")
    with pytest.raises(RuntimeError):
        with db.atomic():
            db.execute("insert into snapshots values ('x', 'h', 1.0, 't', 1)")
            raise RuntimeError("boom")
    assert db.execute("select count(*) from snapshots").fetchone()[0] == 0
    with db.atomic():  # nested blocks use savepoints
        db.execute("insert into snapshots values ('a', 'h', 1.0, 't', 1)")
        with pytest.raises(RuntimeError):
            with db.atomic():
                db.execute("insert into snapshots values ('b', 'h', 1.0, 't', 1)")
                raise RuntimeError("inner")
    assert [r[0] for r in db.execute("select id from snapshots")] == ["a"]
    db.close()


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from milton.core.store import open_store
    from milton.ingest.processes import ingest_file
    path, worker, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sys.stdout.write("go\\n"); sys.stdout.flush()
    sys.stdin.readline()                       # start together
    db = open_store(path, busy_timeout_ms=20000)
    for i in range(rounds):
        # read-then-write transaction (the ingest pattern): the hard case for WAL locking
        with db.atomic():
            db.execute("select count(*) from snapshots").fetchone()
            db.execute("insert into snapshots (id, host, ts, source, rows) values (?, ?, ?, ?, ?)",
                       (f"{worker}-{i}", worker, 1.0 + i, "test", 0))
        # and the real ingest path, one transaction per file
        src = path.parent / f"{worker}-{i}.jsonl"
        src.write_text("".join(
            f'{{"host": "{worker}", "ts": {1700000000 + i}, "pid": {p}, "name": "p{p}"}}\\n'
            for p in range(5)))
        ingest_file(db, src)
    db.close()
""")


def test_concurrent_writers_lose_nothing_and_never_see_locked(tmp_path):
    path = tmp_path / "c" / "conc.db"  # fresh: migrations race too
    path.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers, rounds = 4, 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{k}", str(rounds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env)
             for k in range(workers)]
    for p in procs:
        assert p.stdout.readline() == b"go\n"
    for p in procs:
        p.stdin.write(b"\n")
        p.stdin.flush()
    results = [(p.wait(timeout=60), p.stderr.read().decode()) for p in procs]
    for rc, err in results:
        assert "database is locked" not in err
        assert rc == 0, err
    db = open_store(path)
    # one marker snapshot + one file snapshot per round per worker
    assert db.execute("select count(*) from snapshots").fetchone()[0] == workers * rounds * 2
    assert db.execute("select count(*) from processes").fetchone()[0] == workers * rounds * 5
    assert schema_version(db) == len(MIGRATIONS)
    db.close()


# -- job runner --------------------------------------------------------------------------
def job_rows(settings):
    db = open_store(settings.db_path)
    rows = [dict(zip(("id", "job", "status", "metrics", "error", "now", "finished"), r))
            for r in db.execute("select id, job, status, metrics, error, now, finished "
                                "from job_runs order by id")]
    db.close()
    return rows


def master_log(settings):
    path = settings.logs_dir / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_job_ok_records_row_metrics_and_master_log(settings):
    seen = {}

    def fn(ctx):
        seen["now"] = ctx.now
        seen["run_id"] = ctx.run_id
        status = ctx.db.execute("select status from job_runs where id = ?", [ctx.run_id]).fetchone()
        seen["status_during"] = status[0]
        return {"rows": 3, "note": "hi"}

    result = run_job("demo", fn, settings, now=NOW)
    assert result.status == "ok" and result.metrics == {"rows": 3, "note": "hi"}
    assert seen == {"now": NOW, "run_id": result.run_id, "status_during": "running"}
    [row] = job_rows(settings)
    assert row["job"] == "demo" and row["status"] == "ok" and row["error"] is None
    assert row["now"] == "2024-06-01T12:00:00Z" and row["finished"]
    metrics = json.loads(row["metrics"])
    assert metrics["rows"] == 3 and metrics["note"] == "hi" and "duration_s" in metrics
    [entry] = master_log(settings)
    assert entry["job"] == "demo" and entry["status"] == "ok" and entry["run_id"] == row["id"]
    assert entry["metrics"] == {"rows": 3, "note": "hi"} and entry["now"] == "2024-06-01T12:00:00Z"


def test_run_job_skipped_and_failed(settings):
    def skip(ctx):
        raise Skip("not enough data", records=2)

    def fail(ctx):
        raise ValueError("kaputt")

    def bad_input(ctx):
        raise InputError("f.jsonl:3: bad")

    assert run_job("demo", skip, settings, now=NOW).status == "skipped"
    with pytest.raises(ValueError):
        run_job("demo", fail, settings, now=NOW)
    with pytest.raises(InputError):
        run_job("demo", bad_input, settings, now=NOW)
    rows = job_rows(settings)
    assert [r["status"] for r in rows] == ["skipped", "failed", "failed"]
    assert json.loads(rows[0]["metrics"])["reason"] == "not enough data"
    assert json.loads(rows[0]["metrics"])["records"] == 2
    assert rows[1]["error"] == "ValueError: kaputt"
    assert rows[2]["error"] == "f.jsonl:3: bad"
    log = master_log(settings)
    assert [e["status"] for e in log] == ["skipped", "failed", "failed"]
    assert log[1]["error"] == "ValueError: kaputt"
    assert all(r["finished"] for r in rows)


def test_lock_is_exclusive_and_released(settings):
    with job_lock(settings.locks_dir, "x"):
        with pytest.raises(BusyError, match="busy"):
            with job_lock(settings.locks_dir, "x"):
                pass
        with job_lock(settings.locks_dir, "y"):  # other names are independent
            pass
    with job_lock(settings.locks_dir, "x"):  # released
        pass


def test_second_copy_exits_75_busy(cli, settings):
    with job_lock(settings.locks_dir, "train-anomaly"):
        rc, out, err = cli("train-anomaly", "--now", "2024-06-01T00:00:00Z")
    assert rc == 75
    assert_clean_error(err, "busy")
    log = master_log(settings)
    assert log[-1]["job"] == "train-anomaly" and log[-1]["status"] == "skipped"
    assert log[-1]["metrics"] == {"reason": "busy"}
    assert not settings.db_path.exists()  # refused before touching the store
    # and once the lock is free it runs (and skips: no data)
    rc, out, err = cli("train-anomaly", "--now", "2024-06-01T00:00:00Z")
    assert rc == 0, err


def test_train_anomaly_with_too_little_data_is_skipped(cli, settings):
    rc, out, err = cli("train-anomaly", "--now", "2024-06-01T00:00:00Z")
    assert rc == 0, err
    assert "Traceback" not in err
    [row] = job_rows(settings)
    assert row["job"] == "train-anomaly" and row["status"] == "skipped"
    reason = json.loads(row["metrics"])["reason"]
    assert "records" in reason and "50" in reason
    assert reason in out  # the skip is logged (JSON to stdout for journald)
    assert master_log(settings)[-1]["status"] == "skipped"


@pytest.mark.parametrize("args", [("train-anomaly",), ("ingest", "processes")])
@pytest.mark.parametrize("bad", ["garbage", "2024-13-45", "3x"])
def test_bad_now_exits_2(cli, milton_home, args, bad):
    rc, out, err = cli(*args, "--now", bad)
    assert rc == 2
    assert_clean_error(err, "--now", repr(bad))
    assert not (milton_home / "data" / "logs" / "jobs.jsonl").exists()


def test_now_accepts_iso_epoch_and_relative(settings):
    from milton.core.timeutil import parse_timestamp, utcnow

    assert parse_timestamp("2024-06-01T12:00:00Z") == NOW
    assert parse_timestamp("2024-06-01T12:00:00") == NOW  # naive means UTC
    assert parse_timestamp(str(NOW.timestamp())) == NOW
    delta = utcnow() - parse_timestamp("-2d")
    assert abs(delta.total_seconds() - 2 * 86400) < 60


def test_unknown_command_and_bad_option_exit_2(cli):
    rc, out, err = cli("no-such-command")
    assert rc == 2 and "Traceback" not in err
    assert "No such command 'no-such-command'" in err
    rc, out, err = cli("ingest", "processes", "--bogus")
    assert rc == 2 and "Traceback" not in err
    assert "No such option: --bogus" in err
    rc, out, err = cli("ingest", "processes", "--format", "xml")
    assert rc == 2
    assert_clean_error(err, "--format")


def test_heavy_jobs_queue_on_the_shared_lock_instead_of_overlapping(settings):
    """Two heavy jobs started together run one after the other, both ok."""
    import threading
    import time

    spans: dict[str, tuple[float, float]] = {}

    def work(name):
        def fn(ctx):
            t0 = time.monotonic()
            time.sleep(0.6)
            spans[name] = (t0, time.monotonic())
        return fn

    results = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, run_job(n, work(n), settings)))
               for n in ("compress-memory", "backup")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status for r in results.values()} == {"ok"}
    (a0, a1), (b0, b1) = sorted(spans.values())
    assert b0 >= a1  # never at once


def test_heavy_job_gives_up_as_busy_after_its_wait(settings, monkeypatch):
    monkeypatch.setattr(settings.jobs, "heavy_wait_s", 0.3)
    with job_lock(settings.locks_dir, "heavy"):
        with pytest.raises(BusyError, match="after waiting"):
            run_job("backup", lambda ctx: None, settings)
    assert run_job("backup", lambda ctx: None, settings).status == "ok"


def test_exclusive_store_access_names_the_holder(settings):
    from milton.core.jobs import exclusive_store_access

    # What serve holds while it runs.
    with job_lock(settings.locks_dir, "store", shared=True), job_lock(settings.locks_dir, "serve"):
        with pytest.raises(BusyError, match=r"serve \(pid \d+\)"):
            with exclusive_store_access(settings):
                pass
        with exclusive_store_access(settings, force=True) as busy:
            assert busy and busy[0].startswith("serve")
    with exclusive_store_access(settings) as busy:
        assert busy == []
        with pytest.raises(BusyError):  # nothing can start meanwhile
            run_job("ingest", lambda ctx: None, settings)


def test_connect_readonly_reads_awkward_paths_and_never_creates(tmp_path):
    from milton.core.store import connect_readonly

    path = tmp_path / "odd ?dir#50%" / "m.db"
    open_store(path).close()
    conn = connect_readonly(path)
    try:
        assert conn.execute("select count(*) from job_runs").fetchone() == (0,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("insert into job_runs (job, started, status) values ('x', 'y', 'ok')")
    finally:
        conn.close()
    with pytest.raises(sqlite3.OperationalError):
        connect_readonly(tmp_path / "missing.db").execute("select 1 from sqlite_master").fetchone()
    assert not (tmp_path / "missing.db").exists()
