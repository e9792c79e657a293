"""Retention of the run history (issue 19, defect 12): job_runs, jobs.jsonl, session logs.
Real SQLite; status is read before and after to prove nothing it needs was deleted."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone

from milton.core.housekeeping import (
    STAMP,
    prune_history,
    prune_job_runs,
    prune_session_logs,
    rotate_master_log,
)
from milton.core.store import open_store
from milton.core.timeutil import iso
from milton.ops.status import gather_status

NOW = datetime(2026, 3, 2, tzinfo=timezone.utc)


def add_runs(db, job: str, statuses: list[str], newest_days_ago: float, every_days: float) -> None:
    """``statuses`` oldest first, the last one ``newest_days_ago`` days old."""
    n = len(statuses)
    for k, status in enumerate(statuses):
        started = NOW - timedelta(days=newest_days_ago + (n - 1 - k) * every_days)
        db.conn.execute("insert into job_runs (job, started, finished, status, host, pid, now) "
                        "values (?, ?, ?, ?, 'h', 1, ?)",
                        (job, iso(started), iso(started + timedelta(seconds=5)), status, iso(started)))


def status_view(settings) -> dict:
    keep = ("last_status", "last_started", "failure_streak", "last_ok", "error")
    return {j["job"]: {k: j.get(k) for k in keep}
            for j in gather_status(settings, now=NOW, use_systemd=False)["jobs"] if j.get("runs")}


def test_old_runs_go_and_what_status_reads_stays(settings):
    db = open_store(settings.db_path)
    with db.atomic():
        # an ingest every 5 minutes for 200 days (a few failures), a long-dead weekly backup,
        # a job whose last ok run is old and then failed 30 times, a run still in flight
        add_runs(db, "ingest", ["failed" if k % 500 == 7 else "ok" for k in range(200 * 288)],
                 0.01, 1 / 288)
        add_runs(db, "backup", ["ok"], 500, 7)
        add_runs(db, "evolve", ["ok"] + ["failed"] * 30, 1, 30)
        add_runs(db, "compress-memory", ["running"], 400, 1)
    before = status_view(settings)
    total = db.execute("select count(*) from job_runs").fetchone()[0]

    deleted = prune_job_runs(db, NOW, keep_days=90, failed_keep_days=365, keep_last=20)
    assert deleted > 0
    left = dict(db.execute("select job, count(*) from job_runs group by job").fetchall())
    assert deleted == total - sum(left.values())
    assert left["ingest"] == db.execute(
        "select count(*) from job_runs where job = 'ingest' and (started >= ? or status = 'failed')",
        [iso(NOW - timedelta(days=90))]).fetchone()[0]
    old_failed = db.execute("select count(*) from job_runs where job = 'ingest' and status = 'failed' "
                            "and started < ?", [iso(NOW - timedelta(days=90))]).fetchone()[0]
    assert old_failed > 0  # failures are kept longer than ok runs
    assert left["backup"] == 1 and left["compress-memory"] == 1
    assert left["evolve"] == 21  # the newest 20 (all failed, up to 600 days) and the last ok one
    db.close()
    assert status_view(settings) == before


def test_failed_runs_expire_after_their_own_limit(settings):
    db = open_store(settings.db_path)
    with db.atomic():
        add_runs(db, "train-anomaly", ["failed"] + ["ok"] * 40, 0, 10)  # the failure: 400 days old
    prune_job_runs(db, NOW, keep_days=90, failed_keep_days=365, keep_last=20)
    statuses = [r[0] for r in db.execute("select status from job_runs order by id")]
    assert "failed" not in statuses and len(statuses) == 20
    db.close()


def test_jobs_log_rotates_and_keeps_a_bounded_number_of_files(tmp_path):
    tmp_path = tmp_path / "logs"
    tmp_path.mkdir()
    log = tmp_path / "jobs.jsonl"
    for round_ in range(5):
        log.write_text(json.dumps({"round": round_}) + "\n" + "x" * 2000 + "\n")
        assert rotate_master_log(tmp_path, max_bytes=1000, keep=3)
    assert not log.exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["jobs.jsonl.1", "jobs.jsonl.2", "jobs.jsonl.3"]
    assert json.loads((tmp_path / "jobs.jsonl.1").read_text().splitlines()[0]) == {"round": 4}
    log.write_text("small\n")
    assert not rotate_master_log(tmp_path, max_bytes=1000, keep=3)


def test_session_logs_older_than_the_limit_go(tmp_path):
    folder = tmp_path / "sessions"
    folder.mkdir()
    old, new, other = folder / "a.json", folder / "b.json", folder / "notes.txt"
    for path in (old, new, other):
        path.write_text("{}")
    ancient = (NOW - timedelta(days=100)).timestamp()
    os.utime(old, (ancient, ancient))
    os.utime(other, (ancient, ancient))
    assert prune_session_logs(tmp_path, NOW, 90) == 1
    assert not old.exists() and new.exists() and other.exists()


def test_the_ingest_job_runs_it_once_a_day(cli, settings, milton_home):
    db = open_store(settings.db_path)
    with db.atomic():
        add_runs(db, "ingest", ["ok"] * 50, 200, 1)  # all older than 90 days (wall clock)
    db.close()
    sample = milton_home / "p.jsonl"
    sample.write_text('{"ts": 1772409600, "host": "h", "pid": 1, "name": "sshd"}\n')
    rc, _, err = cli("ingest", "processes", "--from", str(sample))
    assert rc == 0, err
    conn = sqlite3.connect(settings.db_path)
    kept = conn.execute("select count(*) from job_runs where job = 'ingest'").fetchone()[0]
    metrics = json.loads(conn.execute("select metrics from job_runs order by id desc limit 1").fetchone()[0])
    conn.close()
    assert kept == 20  # this run and the 19 newest old ones
    assert metrics["history"]["job_runs_deleted"] == 31
    assert (settings.logs_dir / STAMP).exists()
    # not again the same day
    assert prune_history(settings, open_store(settings.db_path)) is None
