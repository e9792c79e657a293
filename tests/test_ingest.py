"""``milton ingest processes``: files (JSONL/CSV/stdin), bad input, retention, live snapshots."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import assert_clean_error

from milton.core.errors import InputError
from milton.core.store import open_store
from milton.ingest.processes import ingest_file, ingest_records

T0 = datetime(2024, 6, 1, 0, 0, tzinfo=timezone.utc)
NOW = "2024-06-01T01:00:00Z"


def rec(pid: int, *, host: str = "web1", ts: datetime = T0, **extra) -> dict:
    return {"host": host, "ts": ts.isoformat().replace("+00:00", "Z"), "pid": pid,
            "name": f"proc{pid}", **extra}


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def rows(milton_home: Path, sql: str = "select host, ts, pid, ppid, name, exe, username, cpu, "
         "rss, create_time from processes order by pid") -> list[tuple]:
    conn = sqlite3.connect(milton_home / "data" / "milton.db")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def last_job(milton_home: Path) -> tuple[str, dict, str | None]:
    status, metrics, error = rows(milton_home, "select status, metrics, error from job_runs "
                                  "order by id desc limit 1")[0]
    return status, json.loads(metrics), error


# -- happy paths ---------------------------------------------------------------------------
def test_jsonl_with_aliases(cli, milton_home):
    src = jsonl(milton_home / "agent.jsonl", [
        {"hostname": "web1", "timestamp": "2024-06-01T00:00:00Z", "pid": 1, "ppid": 0,
         "name": "init", "exe": "/sbin/init", "user": "root", "cpu_percent": 0.5,
         "rss_bytes": 4096, "create_time": 1717000000.5, "unknown_extra": [1, 2]},
        {"hostname": "web1", "timestamp": "2024-06-01T00:00:00+00:00", "pid": "42",
         "name": "nginx", "memory_rss": "1000"},
        "",
    ])
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    assert err.strip() == ""
    ts = T0.timestamp()
    assert rows(milton_home) == [
        ("web1", ts, 1, 0, "init", "/sbin/init", "root", 0.5, 4096, 1717000000.5),
        ("web1", ts, 42, None, "nginx", None, None, None, 1000, None),
    ]
    assert rows(milton_home, "select host, ts, rows, source from snapshots") == [
        ("web1", ts, 2, f"file:{src}")]
    status, metrics, _ = last_job(milton_home)
    assert status == "ok" and metrics["rows"] == 2 and metrics["snapshots"] == 1


def test_csv_with_aliases_and_iso_timestamps(cli, milton_home):
    src = milton_home / "agent.csv"
    src.write_text("\ufeffhostname,timestamp,pid,name,user,rss,cpu\n"
                   "db1,2024-06-01T00:00:00Z,10,postgres,pg,2048,1.5\n"
                   "db1,2024-06-01T00:00:00Z,11,\"name, with comma\",,,\n"
                   "db1,2024-06-01T00:05:00,12,cron,root,10,0\n")
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    got = rows(milton_home)
    assert got == [
        ("db1", T0.timestamp(), 10, None, "postgres", None, "pg", 1.5, 2048, None),
        ("db1", T0.timestamp(), 11, None, "name, with comma", None, None, None, None, None),
        ("db1", T0.timestamp() + 300, 12, None, "cron", None, "root", 0.0, 10, None),
    ]
    assert rows(milton_home, "select count(*) from snapshots") == [(2,)]  # two timestamps


def test_format_option_overrides_extension(cli, milton_home):
    src = milton_home / "data.txt"
    src.write_text("host,ts,pid,name\nh,1717200000,5,x\n")
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--format", "csv", "--now", NOW)
    assert rc == 0, err
    assert [r[2] for r in rows(milton_home)] == [5]


def test_stdin(cli, milton_home):
    data = "".join(json.dumps(rec(p)) + "\n" for p in (7, 8, 9))
    rc, out, err = cli("ingest", "processes", "--from", "-", "--now", NOW, input=data)
    assert rc == 0, err
    assert [r[2] for r in rows(milton_home)] == [7, 8, 9]
    assert rows(milton_home, "select source from snapshots") == [("file:<stdin>",)]


def test_stdin_empty_is_a_clean_error(cli, milton_home, db_rows):
    rc, out, err = cli("ingest", "processes", "--from", "-", "--now", NOW)
    assert rc == 2
    assert_clean_error(err, "<stdin>", "empty")
    assert db_rows() == 0


def test_reingest_adds_nothing(cli, milton_home, db_rows):
    src = jsonl(milton_home / "a.jsonl", [rec(1), rec(2), rec(3, ts=T0 + timedelta(minutes=1))])
    assert cli("ingest", "processes", "--from", str(src), "--now", NOW)[0] == 0
    assert db_rows() == 3 and db_rows("snapshots") == 2
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    assert db_rows() == 3 and db_rows("snapshots") == 2
    status, metrics, _ = last_job(milton_home)
    assert metrics["rows"] == 0 and metrics["duplicate_snapshots"] == 2
    # an explicit snapshot id is honoured too
    src2 = jsonl(milton_home / "b.jsonl", [rec(4, snapshot_id="s-1"), rec(5, snapshot_id="s-1")])
    for _ in range(2):
        assert cli("ingest", "processes", "--from", str(src2), "--now", NOW)[0] == 0
    assert db_rows() == 5 and db_rows("snapshots") == 3


# -- bad rows --------------------------------------------------------------------------------
BAD_ROWS = [
    ('{"host": "web1", "ts": 1717200000, "pid": 1, "name": oops}', "invalid JSON"),
    (json.dumps(rec(2) | {"pid": "abc"}), "field 'pid': expected an integer, got 'abc'"),
    (json.dumps(rec(3) | {"rss": -5}), "field 'rss': must be >= 0"),
    (json.dumps(rec(4) | {"cpu": "NaN"}), "field 'cpu': must be a finite number"),
    (json.dumps({k: v for k, v in rec(5).items() if k != "host"}), "missing field 'host'"),
    (json.dumps({k: v for k, v in rec(6).items() if k != "pid"}), "missing field 'pid'"),
    (json.dumps({k: v for k, v in rec(7).items() if k != "name"}), "missing field 'name'"),
    (json.dumps({k: v for k, v in rec(8).items() if k != "ts"}), "missing field 'ts'"),
    (json.dumps(rec(9) | {"ts": "yesterday"}), "not a timestamp"),
    (json.dumps(rec(10) | {"ts": [1]}), "expected a timestamp, got list"),
    (json.dumps(rec(11) | {"ts": True}), "got a boolean"),
    (json.dumps(rec(12) | {"pid": 1.5}), "expected an integer"),
    (json.dumps(rec(13) | {"cpu": 10 ** 400}), "field 'cpu': number too large"),
    ('{"host": "web1", "ts": 1717200000, "name": "x", "pid": ' + "9" * 5000 + "}", "invalid JSON"),
    (json.dumps(rec(15) | {"pid": 2 ** 64}), "field 'pid': too large"),
    ("[1, 2, 3]", "expected an object, got list"),
    (json.dumps(rec(17) | {"name": "x" * 2000}), "field 'name': longer than 1024"),
]


def test_bad_rows_non_strict_keep_good_rows(cli, milton_home, db_rows):
    src = milton_home / "mixed.jsonl"
    lines = [json.dumps(rec(100))] + [line for line, _ in BAD_ROWS] + [json.dumps(rec(101))]
    jsonl(src, lines)
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    assert "Traceback" not in err
    reported = err.strip().splitlines()
    assert len(reported) == len(BAD_ROWS), err
    for number, ((_, reason), line) in enumerate(zip(BAD_ROWS, reported), start=2):
        assert line.startswith(f"{src}:{number}: "), line
        assert reason in line, (reason, line)
        assert len(line) < 300
    assert [r[2] for r in rows(milton_home)] == [100, 101]
    status, metrics, _ = last_job(milton_home)
    assert status == "ok" and metrics["rejected"] == len(BAD_ROWS)


def test_bool_timestamp_not_confused_with_cached_1(milton_home):
    db = open_store(milton_home / "x.db")
    src = jsonl(milton_home / "b.jsonl", [rec(1) | {"ts": 1}, rec(2) | {"ts": True}])
    report = ingest_file(db, src)
    assert report.rows == 1
    assert report.rejected == [(2, "field 'timestamp': expected a timestamp, got a boolean")]
    db.close()


def test_strict_one_bad_row_writes_nothing(cli, milton_home, db_rows):
    good = jsonl(milton_home / "good.jsonl", [rec(1)])
    assert cli("ingest", "processes", "--from", str(good), "--now", NOW)[0] == 0
    before = (db_rows(), db_rows("snapshots"))
    src = jsonl(milton_home / "s.jsonl", [rec(2, ts=T0 + timedelta(minutes=5)), rec(3),
                                          json.dumps(rec(4) | {"pid": "abc"}), rec(5)])
    rc, out, err = cli("ingest", "processes", "--strict", "--from", str(src), "--now", NOW)
    assert rc == 2
    assert_clean_error(err, f"{src}:3:", "pid", "--strict")
    assert (db_rows(), db_rows("snapshots")) == before == (1, 1)
    status, _, error = last_job(milton_home)
    assert status == "failed" and f"{src}:3" in error


def test_strict_all_good_is_ok(cli, milton_home, db_rows):
    src = jsonl(milton_home / "s.jsonl", [rec(1), rec(2)])
    rc, out, err = cli("ingest", "processes", "--strict", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    assert db_rows() == 2


def test_all_rows_bad_is_an_error(cli, milton_home, db_rows):
    src = jsonl(milton_home / "bad.jsonl", ["{nope", json.dumps({"pid": 1})])
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 2
    assert_clean_error(err, f"{src}:1:", "all 2 row(s) rejected")
    assert db_rows() == 0


def test_non_utf8_line_is_reported(cli, milton_home, db_rows):
    src = milton_home / "latin.jsonl"
    src.write_bytes(json.dumps(rec(1)).encode() + b"\n"
                    + b'{"host": "w\xe9b", "ts": 1717200000, "pid": 2, "name": "x"}\n'
                    + json.dumps(rec(3)).encode() + b"\n")
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    assert f"{src}:2: not UTF-8" in err and "Traceback" not in err
    assert [r[2] for r in rows(milton_home)] == [1, 3]


def test_ten_megabyte_line_is_too_long_rest_ok(cli, milton_home, db_rows):
    src = milton_home / "huge.jsonl"
    with open(src, "wb") as f:
        f.write(json.dumps(rec(1)).encode() + b"\n")
        f.write(b'{"host": "web1", "name": "' + b"a" * (10 * 1024 * 1024) + b'"}\n')
        f.write(json.dumps(rec(3)).encode() + b"\n")
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert lines == [f"{src}:2: line longer than 1000000 bytes"]
    assert [r[2] for r in rows(milton_home)] == [1, 3]
    assert len(out) < 100_000  # the long line is not echoed anywhere


def test_max_line_bytes_is_configurable(cli, milton_home):
    src = jsonl(milton_home / "a.jsonl", [rec(1) | {"exe": "/x" * 600}, rec(2)])
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW,
                       env={"MILTON_INGEST__MAX_LINE_BYTES": "1024"})
    assert rc == 0, err
    assert f"{src}:1: line longer than 1024 bytes" in err
    assert [r[2] for r in rows(milton_home)] == [2]


@pytest.mark.parametrize("content", [b"", b"\n\n   \n"])
def test_empty_file(cli, milton_home, db_rows, content):
    src = milton_home / "empty.jsonl"
    src.write_bytes(content)
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 2
    assert_clean_error(err, str(src), "empty")
    assert db_rows() == 0


def test_directory(cli, milton_home):
    d = milton_home / "adir"
    d.mkdir()
    rc, out, err = cli("ingest", "processes", "--from", str(d))
    assert rc == 2
    assert_clean_error(err, str(d), "is a directory")


def test_missing_file(cli, milton_home):
    rc, out, err = cli("ingest", "processes", "--from", "nope.jsonl")
    assert rc == 2
    assert_clean_error(err, "nope.jsonl", "no such file")


def test_csv_missing_required_columns(cli, milton_home, db_rows):
    src = milton_home / "x.csv"
    src.write_text("hostname,pid,user\nh,1,root\n")
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 2
    assert_clean_error(err, f"{src}:1:", "required column", "name", "ts")
    assert db_rows() == 0


def test_csv_bad_rows_and_field_count(cli, milton_home):
    src = milton_home / "x.csv"
    src.write_text("host,ts,pid,name,rss\n"
                   "h,1717200000,1,a,5\n"
                   "h,1717200000,2,b\n"
                   "h,1717200000,abc,c,5\n"
                   "h,1717200000,4,d,-1\n"
                   "h,1717200000,5,e,7\n")
    rc, out, err = cli("ingest", "processes", "--from", str(src), "--now", NOW)
    assert rc == 0, err
    assert err.strip().splitlines() == [
        f"{src}:3: expected 5 CSV fields, got 4",
        f"{src}:4: field 'pid': expected an integer, got 'abc'",
        f"{src}:5: field 'rss': must be >= 0, got -1",
    ]
    assert [r[2] for r in rows(milton_home)] == [1, 5]


def test_unwritable_data_dir_is_a_clean_error(cli, milton_home):
    (milton_home / "somefile").write_text("not a directory")
    (milton_home / "config.toml").write_text('[paths]\ndata_dir = "somefile/data"\n')
    src = jsonl(milton_home / "a.jsonl", [rec(1)])
    for args in (("--from", str(src)), ()):
        rc, out, err = cli("ingest", "processes", *args, "--now", NOW)
        assert rc in (1, 2)
        assert_clean_error(err, "somefile/data")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_data_dir_is_a_clean_error(cli, milton_home):
    data = milton_home / "data"
    data.mkdir()
    data.chmod(0o500)
    try:
        rc, out, err = cli("ingest", "processes", "--now", NOW)
        assert rc in (1, 2)
        assert_clean_error(err, str(data))
    finally:
        data.chmod(0o700)


def test_ingest_records_is_all_or_nothing(milton_home):
    db = open_store(milton_home / "r.db")
    with pytest.raises(InputError, match=r"api: record 2: missing field 'name'"):
        ingest_records(db, [rec(1), {"host": "h", "ts": 1717200000, "pid": 2}])
    assert db.execute("select count(*) from processes").fetchone()[0] == 0
    report = ingest_records(db, [rec(1), rec(2)])
    assert report.rows == 2 and report.snapshots == 1
    db.close()


# -- retention -------------------------------------------------------------------------------
def test_retention_deletes_rows_older_than_window_plus_margin(cli, milton_home, db_rows):
    # default window_days 30 + retention_margin_days 2 = 32 days kept
    old = jsonl(milton_home / "old.jsonl", [rec(1, ts=T0), rec(2, ts=T0)])
    mid = jsonl(milton_home / "mid.jsonl", [rec(3, ts=T0 + timedelta(days=5))])
    assert cli("ingest", "processes", "--from", str(old), "--now", NOW)[0] == 0
    assert cli("ingest", "processes", "--from", str(mid), "--now", NOW)[0] == 0
    assert db_rows() == 3 and db_rows("snapshots") == 2

    later = T0 + timedelta(days=32, hours=1)  # old is 32d1h old, mid 27d1h
    new = jsonl(milton_home / "new.jsonl", [rec(4, ts=later)])
    rc, out, err = cli("ingest", "processes", "--from", str(new), "--now", later.isoformat())
    assert rc == 0, err
    assert [r[2] for r in rows(milton_home)] == [3, 4]
    assert db_rows("snapshots") == 2
    status, metrics, _ = last_job(milton_home)
    assert metrics["retention_deleted"] == 2


def test_retention_follows_config(cli, milton_home, db_rows):
    src = jsonl(milton_home / "a.jsonl", [rec(1, ts=T0), rec(2, ts=T0 + timedelta(days=2))])
    env = {"MILTON_ANOMALY__WINDOW_DAYS": "1", "MILTON_INGEST__RETENTION_MARGIN_DAYS": "0.5"}
    rc, out, err = cli("ingest", "processes", "--from", str(src),
                       "--now", (T0 + timedelta(days=2, hours=1)).isoformat(), env=env)
    assert rc == 0, err
    assert [r[2] for r in rows(milton_home)] == [2]  # T0 is 2d1h old > 1.5d


# -- live snapshot ----------------------------------------------------------------------------
def test_live_snapshot_contains_this_process(cli, milton_home):
    import psutil

    rc, out, err = cli("ingest", "processes")
    assert rc == 0, err
    me = psutil.Process()
    got = rows(milton_home, "select host, pid, ppid, name, username, rss, create_time, snapshot_id, "
               f"cpu from processes where pid = {os.getpid()}")
    assert len(got) == 1
    host, pid, ppid, name, username, rss, create_time, sid, cpu = got[0]
    assert host == socket.gethostname()
    assert ppid == os.getppid()
    assert name == me.name()
    assert username == me.username()
    assert rss > 1_000_000
    assert create_time == pytest.approx(me.create_time(), abs=1)
    assert cpu is not None and cpu >= 0
    snaps = rows(milton_home, "select id, host, rows, source from snapshots")
    assert len(snaps) == 1 and snaps[0][0] == sid and snaps[0][1] == host
    assert snaps[0][3] == "psutil"
    assert snaps[0][2] == rows(milton_home, "select count(*) from processes")[0][0] > 5
    status, metrics, _ = last_job(milton_home)
    assert status == "ok" and metrics["source"] == "psutil" and metrics["rows"] == snaps[0][2]


@pytest.mark.parametrize("record", [
    {"host": "h", "pid": 1, "name": "a", "ts": 1.7e9},
    {"host": "h", "pid": 7, "ppid": 1, "name": "sshd", "exe": "/usr/sbin/sshd", "username": "root",
     "cpu": 0.5, "rss": 1024, "create_time": 1.6e9, "ts": 1700000000, "snapshot_id": "s1"},
    {"host": "h", "pid": 7, "name": "x", "ts": 1.7e9, "cpu": 3, "exe": None, "extra": [1, 2]},
])
def test_fast_path_agrees_with_the_validating_path(record):
    """Well-typed records skip the slow validator; both paths must produce the same row."""
    from milton.ingest.processes import normalize_record

    fast = normalize_record(record)
    slow_input = {("hostname" if k == "host" else k): v for k, v in record.items()}  # alias: slow path
    assert normalize_record(slow_input) == fast


@pytest.mark.parametrize("bad", [
    {"host": "h", "pid": -1, "name": "a", "ts": 1.7e9},
    {"host": "h", "pid": 1, "name": "a\x00", "ts": 1.7e9},
    {"host": "h", "pid": 1, "name": "a", "ts": 1.7e9, "cpu": float("nan")},
    {"host": "h", "pid": True, "name": "a", "ts": 1.7e9},
    {"host": "h", "pid": 1, "name": "a", "ts": 1.7e9, "rss": 2**64},
    {"host": "", "pid": 1, "name": "a", "ts": 1.7e9},
])
def test_fast_path_never_accepts_what_the_validator_rejects(bad):
    from milton.ingest.processes import RowError, normalize_record

    with pytest.raises(RowError):
        normalize_record(bad)
