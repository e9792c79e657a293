"""Fault drill: `kill -9` at arbitrary moments of train-anomaly never breaks `current`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

from milton.anomaly.detect import current_model
from milton.anomaly.simulate import Workstation
from milton.core.artifacts import ArtifactStore
from milton.core.config import load_settings
from milton.core.store import open_store
from milton.ingest.processes import ingest_snapshot
from milton.models.layout import ANOMALY_KIND as KIND

T0 = datetime(2026, 5, 4, tzinfo=timezone.utc).timestamp()


def test_kill_9_during_train_anomaly_leaves_current_valid(tmp_path):
    env = {**os.environ, "MILTON_HOME": str(tmp_path)}
    env.pop("MILTON_CONFIG", None)
    settings = load_settings(environ={"MILTON_HOME": str(tmp_path)}).settings
    db = open_store(settings.db_path)
    ws = Workstation(seed=5)
    for k in range(6 * 48):
        ingest_snapshot(db, ws.snapshot(T0 + k * 1800.0))
    db.close()
    now = datetime.fromtimestamp(T0 + 6 * 86400, timezone.utc).isoformat()
    cmd = [sys.executable, "-m", "milton", "train-anomaly", "--now", now]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    store = ArtifactStore(settings.paths.checkpoints_dir, KIND)
    good = store.current_name()
    assert good is not None

    # Kill at spread-out moments: during imports, fitting, publishing, switching current.
    killed_at = []
    for delay in (0.3, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.5):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_at.append(delay)
        proc.wait()
        name = store.current_name()
        assert name is not None
        store.verify(name)  # every file matches its manifest
        assert current_model(settings).version == name  # and it loads
        for version in store.version_names():  # no half-written version is ever visible
            store.verify(version)
    assert killed_at, "the job always finished before it could be killed"

    # And one kill guaranteed to land mid-run: once its job_runs row says 'running'.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = open_store(settings.db_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if db.conn.execute("select 1 from job_runs where status = 'running'").fetchone():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    db.close()
    store.verify(store.current_name())

    # The next run recovers: it publishes a new version and cleans any stale build dirs.
    after = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stderr
    assert store.current_name() > good
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".tmp-")]
    # Killed runs are recorded as interrupted by the next run (the kernel released the lock).
    db = open_store(settings.db_path)
    rows = db.conn.execute("select status, error from job_runs order by id").fetchall()
    assert [s for s, _ in rows].count("ok") >= 2
    assert "running" not in [s for s, _ in rows]
    interrupted = [e for s, e in rows if s == "failed"]
    assert interrupted and all("interrupted" in e for e in interrupted), rows
