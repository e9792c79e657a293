"""Bad inputs and faults that used to hang, abort or print a traceback (issue 19, defects 8, 9):
special files in ingest directories, lone surrogates, a full disk, a list setting that is not
JSON. Real files (FIFOs, device links, symlink loops), real SQLite, real file-size limits and,
where this machine allows it, a real small tmpfs."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_clean_error, ingest_simulated

T0 = 1772409600.0  # 2026-03-02T00:00:00Z
GOOD_CONVERSATION = {"messages": [{"role": "user", "content": "How do I rotate logs?"},
                                  {"role": "assistant", "content": "Use logrotate."}]}


def special_files(directory: Path, suffix: str) -> dict[str, str]:
    """A FIFO, a link to /dev/zero, a symlink loop and a broken link; {name: expected reason}."""
    directory.mkdir(parents=True, exist_ok=True)
    os.mkfifo(directory / f"pipe{suffix}")
    os.symlink("/dev/zero", directory / f"zero{suffix}")
    os.symlink(f"loop{suffix}", directory / f"loop{suffix}")
    os.symlink("nowhere", directory / f"broken{suffix}")
    return {f"pipe{suffix}": "a FIFO (named pipe), not a regular file",
            f"zero{suffix}": "a character device, not a regular file",
            f"loop{suffix}": "a symlink loop",
            f"broken{suffix}": "a broken symlink"}


def rows(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


# -- defect 8: special files are skipped, named, and the run goes on --------------------------
def test_documents_directory_with_special_files(cli, milton_home):
    docs = milton_home / "docs"
    expected = special_files(docs, ".md")
    (docs / "good.md").write_text("# Logs\n\nRotate them weekly.\n")
    rc, out, err = cli("ingest", "documents", str(docs), timeout=120)  # a FIFO used to hang here
    assert rc == 0, err
    assert "Traceback" not in err
    for name, reason in expected.items():
        assert f"{docs / name}: skipped: {reason}" in err, err
    db = milton_home / "data" / "milton.db"
    assert rows(db, "select count(*) from documents") == 1
    # named explicitly, too
    rc, _, err = cli("ingest", "documents", str(docs / "pipe.md"), str(docs / "good.md"), timeout=120)
    assert rc == 0 and f"{docs / 'pipe.md'}: skipped: a FIFO" in err, err


def test_conversations_directory_with_special_files(cli, milton_home):
    convs = milton_home / "convs"
    expected = special_files(convs, ".jsonl")
    (convs / "good.jsonl").write_text(json.dumps(GOOD_CONVERSATION) + "\n")
    rc, _, err = cli("ingest", "conversations", str(convs), timeout=60)
    assert rc == 0, err
    assert "Traceback" not in err
    for name, reason in expected.items():
        assert f"{convs / name}: skipped: {reason}" in err, err
    assert rows(milton_home / "data" / "milton.db", "select count(*) from sessions") == 1
    # named on its own, a device is a one-line usage error (a FIFO named on purpose is read,
    # like `<(ssh host ...)`)
    for name, reason in (("zero.jsonl", "a character device"), ("loop.jsonl", "a symlink loop")):
        rc, _, err = cli("ingest", "conversations", str(convs / name), timeout=60)
        assert rc == 2
        assert_clean_error(err, f"{name}: {reason}")


# -- defect 9: lone surrogates ------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_in_a_conversation_is_a_one_line_error(cli, milton_home, suffix):
    bad = dict(GOOD_CONVERSATION, messages=[{"role": "user", "content": "hi \\ud800 there"},
                                            {"role": "assistant", "content": "ok"}])
    path = milton_home / f"c{suffix}"
    path.write_text(json.dumps(bad).replace("\\\\ud800", "\\ud800") + "\n")
    assert "\\ud800" in path.read_text()
    rc, _, err = cli("ingest", "conversations", str(path))
    assert rc == 2
    assert_clean_error(err, f"{path}:1: messages[0].content: a lone surrogate")
    assert rows(milton_home / "data" / "milton.db", "select count(*) from sessions") == 0
    # in a file with good records only the bad one is rejected; a valid pair is a character
    from milton.memory.conversations import read_records

    emoji = json.dumps(GOOD_CONVERSATION).replace("rotate", "rotate \\ud83d\\ude00")
    data = "\n".join([json.dumps(GOOD_CONVERSATION), path.read_text().strip(), emoji])
    if suffix == ".json":
        data = "[" + data.replace("\n", ",\n") + "]"
    got = [(line, error) for line, _, error in read_records(io.BytesIO(data.encode()), f"x{suffix}")]
    assert [g[0] for g in got] == [1, 2, 3]
    assert got[0][1] is None and got[2][1] is None
    assert got[1][1] == "messages[0].content: a lone surrogate escape (e.g. \\ud800) is not valid Unicode"


def test_a_lone_surrogate_in_a_processes_file_is_a_one_line_error(cli, milton_home):
    path = milton_home / "p.jsonl"
    path.write_text('{"ts": 1772409600, "host": "h", "pid": 1, "name": "x\\udfff"}\n')
    rc, _, err = cli("ingest", "processes", "--from", str(path))
    assert rc == 2
    assert_clean_error(err, f"{path}:1: field 'name': a lone surrogate")
    assert rows(milton_home / "data" / "milton.db", "select count(*) from processes") == 0


# -- defect 9: a full disk ------------------------------------------------------------------------
def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _milton(home: Path, *args: str, limit: int | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MILTON_")}
    full.update(MILTON_HOME=str(home), PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "milton", *args], env=full, capture_output=True,
                          text=True, timeout=120,
                          preexec_fn=_file_size_limit(limit) if limit else None)


def _big_processes_file(path: Path, snapshots: int) -> Path:
    with open(path, "w") as handle:
        for k in range(snapshots * 200):
            handle.write(json.dumps({"ts": T0 + 86400 + (k // 200) * 600, "host": "h", "pid": k % 200 + 2,
                                     "name": f"proc{k % 200}", "cmdline": "x" * 200}) + "\n")
    return path


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs (a real ENOSPC), where this machine lets us mount one; else a skip."""
    target = tmp_path / "small"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=False)


def test_ingest_on_a_full_disk_is_one_line_and_writes_nothing(milton_home, settings, tmp_path):
    seed = _big_processes_file(tmp_path / "seed.jsonl", 1)
    assert _milton(milton_home, "ingest", "processes", "--from", str(seed)).returncode == 0
    db = settings.db_path
    before = rows(db, "select count(*) from processes")
    big = _big_processes_file(tmp_path / "big.jsonl", 100)
    proc = _milton(milton_home, "ingest", "processes", "--from", str(big),
                   limit=db.stat().st_size + (512 << 10))
    assert proc.returncode == 1, proc.stderr
    assert_clean_error(proc.stderr, "ingest: out of disk space writing", str(db),
                       "this run's changes were rolled back")
    assert rows(db, "select count(*) from processes") == before
    assert rows(db, "select count(*) from job_runs where status = 'running'") == 0


def test_ingest_on_a_full_tmpfs(small_tmpfs, tmp_path):
    home = small_tmpfs / "home"
    seed = _big_processes_file(tmp_path / "seed.jsonl", 1)
    assert _milton(home, "ingest", "processes", "--from", str(seed)).returncode == 0
    db = home / "data" / "milton.db"
    before = rows(db, "select count(*) from processes")
    proc = _milton(home, "ingest", "processes", "--from", str(_big_processes_file(tmp_path / "b.jsonl", 60)))
    assert proc.returncode == 1, proc.stderr
    assert_clean_error(proc.stderr, "out of disk space", "database or disk is full", "rolled back")
    assert rows(db, "select count(*) from processes") == before
    conn = sqlite3.connect(db)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_train_anomaly_on_a_full_disk_is_one_line_and_publishes_nothing(milton_home, settings):
    ingest_simulated(settings, seed=1, days=2, t0=T0)
    proc = _milton(milton_home, "train-anomaly", "--now", "2026-03-04T00:00:00Z",
                   limit=2_000_000)  # the forest is ~3.5 MB; the store and its WAL stay below
    assert proc.returncode == 1, proc.stderr
    assert_clean_error(proc.stderr, "train-anomaly: out of disk space", "File too large",
                       "rolled back")
    anomaly = settings.paths.checkpoints_dir / "anomaly"
    assert not anomaly.exists() or not list(anomaly.iterdir())  # no version, no temp dir
    assert rows(settings.db_path, "select count(*) from job_runs where job = 'train-anomaly' "
                                  "and status = 'failed'") == 1


# -- defect 9: a list setting from the environment that is not JSON -------------------------------
@pytest.mark.parametrize("value", ["notjson", "[1,", "a,b"])
def test_a_list_setting_from_env_that_is_not_json(cli, value):
    rc, _, err = cli("config", "show", env={"MILTON_TRAIN__SENSITIVE_PATTERNS": value})
    assert rc == 2
    assert_clean_error(err, "env MILTON_TRAIN__SENSITIVE_PATTERNS: train.sensitive_patterns: "
                            "expected a list as JSON")


# -- defect 11: a killed job is 'interrupted', not 'running' for a week ----------------------------
SLOW_JOB = r"""
import sys, time
from pathlib import Path
from milton.core.config import load_settings
from milton.core.jobs import run_job

def job(ctx):
    Path(sys.argv[1]).write_text("started")
    time.sleep(600)

run_job("backup", job, load_settings().settings)
"""


def test_a_killed_job_shows_interrupted(cli, milton_home, settings):
    from milton.ops.status import gather_status

    started = milton_home / "started"
    child = subprocess.Popen([sys.executable, "-c", SLOW_JOB, str(started)],
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if started.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        assert started.exists(), child.stderr.read().decode()[-2000:] if child.stderr else ""
        jobs = {j["job"]: j for j in gather_status(settings, use_systemd=False)["jobs"]}
        assert jobs["backup"]["last_status"] == "running"  # alive: its lock is held
        child.kill()  # kill -9
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    report = gather_status(settings, use_systemd=False)
    jobs = {j["job"]: j for j in report["jobs"]}
    assert jobs["backup"]["last_status"] == "interrupted"
    assert f"pid {child.pid}" in jobs["backup"]["error"]
    assert any("backup: interrupted" in a["message"] for a in report["attention"])
    rc, out, err = cli("status", env={"COLUMNS": "200"})
    assert "interrupted" in out and "running" not in out.split("Jobs")[1].split("Models")[0], out
    # the store itself still says 'running' (status is read-only); the next run closes it
    assert rows(settings.db_path, "select count(*) from job_runs where status = 'running'") == 1
