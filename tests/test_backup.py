"""`milton backup` / `milton restore`: round trip, live writers, retention, verification and
fault drills (kill -9, disk full, corrupted archives), all on real SQLite and real processes."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import REPO, assert_clean_error

from milton.core.artifacts import ArtifactStore
from milton.core.config import load_settings
from milton.core.jobs import job_lock
from milton.core.store import open_store
from milton.ops.backup.archive import (
    ArchiveError,
    clean_stale,
    read_manifest,
    verify_archive,
)
from milton.ops.backup.create import create_backup
from milton.ops.backup.restore import restore_backup
from milton.ops.backup.retention import list_backups, resolve_archive

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()


# -- helpers -------------------------------------------------------------------------------
def seed_store(db_path: Path, snapshots: int = 6) -> int:
    """A store with some real process snapshots; returns the processes row count."""
    from milton.anomaly.simulate import Workstation
    from milton.ingest.processes import ingest_snapshot

    db = open_store(db_path)
    try:
        ws = Workstation(seed=3)
        for k in range(snapshots):
            ingest_snapshot(db, ws.snapshot(T0 + k * 600.0))
        return db.execute("select count(*) from processes").fetchone()[0]
    finally:
        db.close()


def add_filler(db_path: Path, megabytes: int) -> None:
    """Incompressible bulk (1 MB blobs), so copying and archiving take measurable time."""
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            conn.execute("create table if not exists filler (id integer primary key, b blob)")
            conn.execute("with recursive c(x) as (select 1 union all select x + 1 from c "
                         "where x < ?) insert into filler (b) select randomblob(1000000) from c",
                         (megabytes,))
        conn.execute("pragma wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def publish(settings, kind: str, payload: bytes, *, current: bool = True) -> str:
    store = ArtifactStore(settings.paths.checkpoints_dir, kind)
    version = store.publish(lambda d: (d / "model.bin").write_bytes(payload), make_current=current)
    return version.name


def count(db_path: Path, sql: str, args: tuple = ()) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def archives(settings) -> list[str]:
    return [i.name for i in list_backups(settings)]


def leftovers(*dirs: Path) -> list[str]:
    return [p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.name.endswith(".partial")]


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILTON_")}
    env.update(MILTON_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


def db_from_archive(path: Path, into: Path) -> Path:
    with tarfile.open(path) as tar:
        member = read_manifest(path)["db"]
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    out = into / "extracted.db"
    out.write_bytes(data)
    return out


# -- round trip ----------------------------------------------------------------------------
def test_round_trip_restores_store_models_and_config(cli, milton_home, settings):
    config = milton_home / "config.toml"
    config.write_text("[backup]\nkeep_last = 5\n")
    rows = seed_store(settings.db_path)
    v1 = publish(settings, "adapter", b"first adapter")
    v2 = publish(settings, "adapter", b"second adapter")
    adapters = ArtifactStore(settings.paths.checkpoints_dir, "adapter")
    adapters.pin(v1)

    rc, out, err = cli("backup", "--label", "weekly")
    assert rc == 0, err
    [name] = archives(settings)
    assert name.endswith("-weekly.tar.gz")
    manifest = read_manifest(settings.backup.dir / name)
    assert manifest["rows"]["processes"] == rows and manifest["schema_version"] >= 1
    assert manifest["artifacts"]["adapter"] == {"current": v2, "pinned": [v1], "versions": [v1, v2]}
    assert manifest["config"]["member"] == "config.toml"
    assert set(manifest["files"]) == {"data/milton.db", "config.toml",
                                      f"checkpoints/adapter/{v1}/model.bin",
                                      f"checkpoints/adapter/{v1}/manifest.json",
                                      f"checkpoints/adapter/{v2}/model.bin",
                                      f"checkpoints/adapter/{v2}/manifest.json"}

    # Life goes on: rows deleted and added, a new model promoted, a pinned one lost, config edited.
    db = open_store(settings.db_path)
    with db.atomic():
        db.execute("delete from processes where rowid % 2 = 0")
        db.execute("insert into counters (name, value) values ('marker', 1)")
    db.close()
    v3 = publish(settings, "adapter", b"third adapter")
    import shutil
    shutil.rmtree(adapters.dir / v1)
    config.write_text("[backup]\nkeep_last = 6\n")
    changed_rows = count(settings.db_path, "select count(*) from processes")
    assert changed_rows < rows

    rc, out, err = cli("restore", name, "--yes", "--with-config")
    assert rc == 0, err
    assert f"from {name}" in out and f"adapter: current is {v2}; versions restored: {v1}" in out
    assert count(settings.db_path, "select count(*) from processes") == rows
    assert count(settings.db_path, "select count(*) from counters where name = 'marker'") == 0
    assert count(settings.db_path, "select count(*) from job_runs where job = 'restore' "
                                   "and status = 'ok'") == 1
    assert count(settings.db_path, "select count(*) from job_runs where status = 'running'") == 0
    # The run that made the archive was 'running' in its copy; restored, it is recorded as ok.
    assert count(settings.db_path, "select count(*) from job_runs where job = 'backup' "
                                   "and status = 'ok' and metrics like ?", (f"%{name}%",)) == 1
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert adapters.current_name() == v2
    adapters.verify(v1)  # brought back from the archive, checksums intact
    assert v3 in adapters.version_names()  # newer local versions are left alone
    assert config.read_text() == "[backup]\nkeep_last = 5\n"

    # The state before the restore was kept, and it is a good archive.
    pre = [i for i in list_backups(settings) if i.label == "pre-restore"]
    assert len(pre) == 1 and pre[0].name in out
    assert pre[0].manifest["rows"]["processes"] == changed_rows
    assert pre[0].manifest["artifacts"]["adapter"]["current"] == v3
    rc, out, err = cli("backup", "verify", pre[0].name)
    assert rc == 0 and out.startswith("ok: "), err
    assert not leftovers(settings.backup.dir, settings.paths.data_dir, settings.paths.checkpoints_dir)


# -- a consistent copy while a writer keeps going ---------------------------------------------
WRITER = r"""
import json, sys, time
from pathlib import Path
from milton.core.store import open_store
db = open_store(Path(sys.argv[1]), busy_timeout_ms=30000)
stop, txns, errors, worst = Path(sys.argv[2]), 0, [], 0.0
while not stop.exists():
    t = time.monotonic()
    try:
        with db.atomic():  # two rows per transaction: a torn copy would show an odd count
            for _ in range(2):
                db.conn.execute("insert into probe (txn, ts) values (?, ?)", (txns, time.time()))
        txns += 1
    except Exception as exc:
        errors.append(repr(exc))
    worst = max(worst, time.monotonic() - t)
    time.sleep(0.002)
print(json.dumps({"txns": txns, "errors": errors, "worst_s": worst}))
"""


def test_backup_while_a_writer_keeps_inserting(cli, milton_home, settings, tmp_path):
    seed_store(settings.db_path, snapshots=2)
    db = open_store(settings.db_path)
    db.execute("create table probe (seq integer primary key, txn integer not null, ts real not null)")
    db.close()
    add_filler(settings.db_path, 60)
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(settings.db_path), str(stop)],
                              env=env_for(milton_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while count(settings.db_path, "select count(*) from probe") < 20:
            assert writer.poll() is None and time.monotonic() < deadline, writer.stderr.read()
            time.sleep(0.05)
        started = time.time()
        rc, out, err = cli("backup")
        finished = time.time()
        time.sleep(0.2)
    finally:
        stop.touch()
        stdout, stderr = writer.communicate(timeout=30)
    assert rc == 0, err
    assert writer.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    assert report["errors"] == []
    during = count(settings.db_path, "select count(*) from probe where ts between ? and ?",
                   (started, finished))
    assert during >= 10, "the writer was blocked while the backup ran"

    [info] = list_backups(settings)
    copy = db_from_archive(info.path, tmp_path)
    conn = sqlite3.connect(copy)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    n, top, txns = conn.execute("select count(*), max(seq), count(distinct txn) from probe").fetchone()
    conn.close()
    assert n >= 40 and n == top and n == 2 * txns  # a prefix of whole transactions: a snapshot
    assert n < count(settings.db_path, "select count(*) from probe")
    assert info.manifest["rows"]["probe"] == n


# -- retention ----------------------------------------------------------------------------------
def test_retention_keep_last_plus_daily_weekly_monthly(cli, milton_home):
    env = {"MILTON_HOME": str(milton_home), "MILTON_BACKUP__KEEP_LAST": "2",
           "MILTON_BACKUP__KEEP_DAILY": "3", "MILTON_BACKUP__KEEP_WEEKLY": "2",
           "MILTON_BACKUP__KEEP_MONTHLY": "2"}
    settings = load_settings(environ=env).settings
    seed_store(settings.db_path, snapshots=1)
    times = {  # label: UTC time (ISO week in brackets)
        "a": "2026-01-10T02:00:00",  # Sat [2]
        "b": "2026-01-20T02:00:00",  # Tue [4]: newest of January
        "c": "2026-02-02T02:00:00",  # Mon [6]: newest of week 6
        "d": "2026-02-09T02:00:00",  # Mon [7]
        "e": "2026-02-10T02:00:00",  # Tue [7]
        "f": "2026-02-10T14:00:00",  # Tue [7]: newest of 02-10
        "g": "2026-02-11T02:00:00",  # Wed [7]: newest of 02-11
        "h": "2026-02-12T02:00:00",  # Thu [7]: second newest
        "i": "2026-02-12T03:00:00",  # Thu [7]: newest
    }
    for label, when in times.items():
        create_backup(settings, now=datetime.fromisoformat(when).replace(tzinfo=timezone.utc),
                      label=label)
    # last 2: i h; daily 3: i g f; weekly 2: i c; monthly 2: i b -> a, d, e pruned
    assert [i.label for i in list_backups(settings)] == ["b", "c", "f", "g", "h", "i"]

    # A garbage file with an archive's name is neither counted nor deleted.
    junk = settings.backup.dir / "milton-20260101T000000Z.tar.gz"
    junk.write_bytes(b"not an archive")
    # An archive dated before all the others survives the run that made it ...
    old = create_backup(settings, now=datetime(2025, 12, 1, tzinfo=timezone.utc), label="old")
    assert old["pruned"] == [] and old["archive"] in archives(settings)
    # ... and the next backup (through the CLI, --now naming it) prunes it. Now 02-13 [7] is
    # newest: last 2: j i; daily 3: j i g; weekly 2: j c; monthly 2: j b -> old, f, h go.
    rc, out, err = cli("backup", "--now", "2026-02-13T02:00:00Z", "--label", "j", env=env)
    assert rc == 0, err
    infos = list_backups(settings)
    assert [i.label for i in infos] == [None, "b", "c", "g", "i", "j"]
    assert infos[0].name == junk.name and infos[0].error and "not a readable archive" in infos[0].error
    assert all(i.created.tzinfo is not None and i.size_bytes > 0 for i in infos)
    assert f"pruned {old['archive']}" in out

    # A pre-restore archive is never pruned by the restore that made it, however it is dated.
    settings1 = load_settings(environ={**env, "MILTON_BACKUP__KEEP_LAST": "1",
                                       "MILTON_BACKUP__KEEP_DAILY": "0",
                                       "MILTON_BACKUP__KEEP_WEEKLY": "0",
                                       "MILTON_BACKUP__KEEP_MONTHLY": "0"}).settings
    result = restore_backup(settings1, infos[1].path, now=datetime(2025, 1, 1, tzinfo=timezone.utc))
    labels = [i.label for i in list_backups(settings1)]
    assert result["pre_restore_backup"] and labels == ["pre-restore", None, "j"]


# -- verification -------------------------------------------------------------------------------
def test_verify_names_a_corrupted_member_and_restore_refuses_it(cli, milton_home, settings):
    seed_store(settings.db_path)
    v1 = publish(settings, "adapter", b"A" * 5000)
    rc, _, err = cli("backup", env={"MILTON_BACKUP__COMPRESSION": "none"})
    assert rc == 0, err
    [info] = list_backups(settings)
    assert info.name.endswith(".tar") and info.last_verified_ok and info.verified is None
    member = f"checkpoints/adapter/{v1}/model.bin"
    with tarfile.open(info.path) as tar:
        offset = tar.getmember(member).offset_data
    with open(info.path, "r+b") as handle:
        handle.seek(offset + 1234)
        handle.write(b"B")

    rc, out, err = cli("backup", "verify", info.name)
    assert rc == 1
    assert_clean_error(err, info.name, f"checksum mismatch in {member}")
    rc, out, _ = cli("backup", "list", "--json")
    assert json.loads(out)[0]["verified"] == "failed"

    before = sha(settings.db_path)
    rc, out, err = cli("restore", info.name, "--yes")
    assert rc == 1
    assert_clean_error(err, info.name, f"checksum mismatch in {member}")
    assert sha(settings.db_path) == before
    assert archives(settings) == [info.name]  # no pre-restore backup: nothing was started
    assert not leftovers(settings.backup.dir, settings.paths.data_dir, settings.paths.checkpoints_dir)


def test_verify_damaged_compressed_archives_cleanly(cli, milton_home, settings):
    seed_store(settings.db_path, snapshots=40)
    add_filler(settings.db_path, 2)
    rc, _, err = cli("backup")
    assert rc == 0, err
    [info] = list_backups(settings)
    rc, out, err = cli("backup", "verify", "latest")
    assert rc == 0 and "integrity_check ok" in out, err
    data = info.path.read_bytes()

    flipped = settings.backup.dir / "milton-20260101T000000Z-flipped.tar.gz"
    middle = len(data) // 2
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    rc, out, err = cli("backup", "verify", flipped.name)
    assert rc == 1
    assert_clean_error(err, flipped.name, "data/milton.db")

    truncated = settings.backup.dir / "milton-20260101T000000Z-cut.tar.gz"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    rc, out, err = cli("backup", "verify", str(truncated))
    assert rc == 1
    assert_clean_error(err, truncated.name, "truncated or corrupt")

    garbage = settings.backup.dir / "milton-20260101T000000Z-junk.tar.gz"
    garbage.write_bytes(os.urandom(3000))
    rc, out, err = cli("backup", "verify", garbage.name)
    assert rc == 1
    assert_clean_error(err, garbage.name)
    rc, out, err = cli("backup", "list")
    assert rc == 0 and "UNREADABLE" in out and f"milton: warning: {garbage.name}" in err

    rc, out, err = cli("backup", "verify", "no-such-backup.tar.gz")
    assert rc == 2
    assert_clean_error(err, "no-such-backup.tar.gz", "no such backup")


# -- restore guards -------------------------------------------------------------------------------
def test_restore_refuses_while_serve_or_a_job_holds_the_store(cli, milton_home, settings):
    rows = seed_store(settings.db_path)
    rc, _, err = cli("backup")
    assert rc == 0, err
    db = open_store(settings.db_path)
    db.execute("delete from processes")
    db.close()

    for holder in ("serve", "ingest"):  # what serve and a running job hold
        with job_lock(settings.locks_dir, "store", shared=True), job_lock(settings.locks_dir, holder):
            rc, out, err = cli("restore", "latest", "--yes")
            assert rc == 75
            assert_clean_error(err, f"{holder} (pid {os.getpid()})", "--force")
    assert count(settings.db_path, "select count(*) from processes") == 0
    assert len(archives(settings)) == 1  # refused before the pre-restore backup

    with job_lock(settings.locks_dir, "store", shared=True), job_lock(settings.locks_dir, "serve"):
        rc, out, err = cli("restore", "latest", "--yes", "--force")
    assert rc == 0, err
    assert "serve (pid" in err and "restart it" in err
    assert count(settings.db_path, "select count(*) from processes") == rows


def test_restore_bad_input_is_a_usage_error_and_changes_nothing(cli, milton_home, settings):
    seed_store(settings.db_path)
    rc, _, err = cli("backup")
    assert rc == 0, err
    before = sha(settings.db_path)
    rc, out, err = cli("restore", "latest")  # stdin is not a terminal: --yes is required
    assert rc == 2
    assert_clean_error(err, "--yes")
    rc, out, err = cli("restore", "missing.tar.gz", "--yes")
    assert rc == 2
    assert_clean_error(err, "missing.tar.gz")
    rc, out, err = cli("backup", "--label", "Not OK")
    assert rc == 2
    assert_clean_error(err, "--label", "'Not OK'")
    rc, out, err = cli("restore", "latest", "--yes", "--with-config")  # the archive has no config
    assert rc == 1
    assert_clean_error(err, "no config file")
    assert sha(settings.db_path) == before and len(archives(settings)) == 1


# -- fault drills ---------------------------------------------------------------------------------
def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_kill_9_during_backup_leaves_no_archive_and_keeps_the_old_ones(milton_home, settings):
    seed_store(settings.db_path)
    first = create_backup(settings)["archive"]
    add_filler(settings.db_path, 120)
    env = env_for(milton_home)
    cmd = [sys.executable, "-m", "milton", "backup"]
    stages = {
        # the store copy has started
        "copy": lambda: any(settings.backup.dir.glob(".milton-backup-*.partial/milton.db")),
        # the archive is being written
        "archive": lambda: any(p.stat().st_size > 4 << 20 for p in
                               settings.backup.dir.glob(".milton-backup-*.partial/archive.tar.gz")),
    }
    left: list[list[str]] = []
    for stage, reached in stages.items():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        hit = _wait_for(reached, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert hit, f"backup finished or failed before reaching {stage}: {proc.stderr.read()}"
        assert archives(settings) == [first]
        verify_archive(settings.backup.dir / first)
        assert [p.name for p in settings.backup.dir.iterdir() if not p.name.startswith(".")] == [first]
        for partial in settings.backup.dir.glob(".milton-backup-*.partial/archive.tar.gz"):
            with pytest.raises(ArchiveError, match="unfinished"):
                resolve_archive(settings, str(partial))
            with pytest.raises(ArchiveError):
                verify_archive(partial)  # cut short: it can never pass
        proc.stderr.close()
        left.append(leftovers(settings.backup.dir))
    # Each run removes what the killed one before it left, and leaves only its own temp dir.
    assert len(left[0]) == len(left[1]) == 1 and left[0] != left[1]

    # The next backup cleans up too, and succeeds.
    conn = sqlite3.connect(settings.db_path)
    conn.execute("drop table filler")
    conn.execute("vacuum")
    conn.close()
    result = create_backup(settings)
    assert result["stale_removed"] == left[1] and not leftovers(settings.backup.dir)
    assert archives(settings) == [first, result["archive"]]


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_gives_one_clear_line_and_keeps_old_backups(milton_home, settings):
    seed_store(settings.db_path)
    first = create_backup(settings)["archive"]
    add_filler(settings.db_path, 6)
    size = settings.db_path.stat().st_size
    env = env_for(milton_home, MILTON_BACKUP__COMPRESSION="none")
    cases = {"the copy of the store": size // 2,   # the database copy hits the limit
             "the archive": size + 1024}           # the copy fits; the archive does not
    for what, limit in cases.items():
        proc = subprocess.run([sys.executable, "-m", "milton", "backup"], env=env,
                              capture_output=True, text=True, timeout=60,
                              preexec_fn=_limit_file_size(limit))
        assert proc.returncode == 1, proc.stderr
        assert_clean_error(proc.stderr, str(settings.backup.dir), f"out of space while writing {what}",
                           "earlier backups are untouched")
        assert archives(settings) == [first]
        verify_archive(settings.backup.dir / first)
        assert not leftovers(settings.backup.dir)
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_disk_full_on_a_small_tmpfs(milton_home, settings, tmp_path):
    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(target)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        env = {"MILTON_HOME": str(milton_home), "MILTON_BACKUP__DIR": str(target),
               "MILTON_BACKUP__COMPRESSION": "none"}
        small = load_settings(environ=env).settings
        seed_store(small.db_path)
        first = create_backup(small)["archive"]
        add_filler(small.db_path, 7)  # the copy fits in 12 MB, copy + archive do not
        proc = subprocess.run([sys.executable, "-m", "milton", "backup"],
                              env=env_for(milton_home, **{k: v for k, v in env.items()
                                                          if k != "MILTON_HOME"}),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert_clean_error(proc.stderr, str(target), "out of space", "No space left on device")
        assert archives(small) == [first]
        verify_archive(target / first)
        assert not leftovers(target)
        add_filler(small.db_path, 8)  # now even the copy does not fit
        proc = subprocess.run([sys.executable, "-m", "milton", "backup"],
                              env=env_for(milton_home, **{k: v for k, v in env.items()
                                                          if k != "MILTON_HOME"}),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert_clean_error(proc.stderr, str(target), "out of space while writing the copy")
        assert archives(small) == [first] and not leftovers(target)
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_stale_staging_dirs_of_live_runs_are_kept(settings):
    """clean_stale removes only staging dirs whose owner is gone (their flock is free)."""
    from milton.ops.backup.archive import staging as _staging

    settings.backup.dir.mkdir(parents=True)
    with _staging(settings.backup.dir, "backup") as live:
        dead = settings.backup.dir / (".milton-backup-" + "0" * 32 + ".partial")
        dead.mkdir()
        (dead / "lock").touch()
        assert clean_stale(settings.backup.dir) == [dead.name]
        assert live.is_dir()
    assert not live.exists()


def test_restore_refuses_an_archive_from_a_newer_schema(milton_home, settings, tmp_path):
    """A store migrated by a newer Milton is not put under code that does not know its schema."""
    from milton.ops.backup.archive import BackupError
    from milton.ops.backup.archive import write_archive as _write_archive

    seed_store(settings.db_path)
    made = create_backup(settings)
    path = Path(made["path"])
    manifest = read_manifest(path)
    db = db_from_archive(path, tmp_path)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("insert into _migrations (id, name, applied_at) values (999, 'm999_future', 'x')")
    conn.close()
    manifest["schema_version"] += 1
    manifest["files"]["data/milton.db"] = {"sha256": sha(db), "size": db.stat().st_size}
    newer = settings.backup.dir / "milton-20300101T000000Z-newer.tar.gz"
    _write_archive(newer, manifest, [("data/milton.db", db)], settings.backup,
                   datetime(2030, 1, 1, tzinfo=timezone.utc), lambda n: None)
    verify_archive(newer)  # a sound archive ...
    before = sha(settings.db_path)
    with pytest.raises(BackupError, match="newer Milton"):
        restore_backup(settings, newer)  # ... that this Milton must not restore
    assert sha(settings.db_path) == before
    assert [i.label for i in list_backups(settings)] == [None, "newer"]
