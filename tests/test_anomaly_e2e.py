"""The anomaly promise, end to end on a simulated workstation over 66 days replayed with --now.

A new tool is flagged on first appearance; after a day of regular use and hourly retraining it
is not; after more than 30 days unused it is forgotten and flagged again when it returns. Odd
processes injected at low frequency are flagged. Retention keeps the store bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from milton.anomaly.detect import current_model, score_rows
from milton.anomaly.simulate import Proc, Workstation
from milton.anomaly.train import train_anomaly
from milton.core.config import load_settings
from milton.core.jobs import run_job
from milton.core.store import open_store
from milton.ingest.processes import apply_retention, ingest_snapshot

T0 = datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp()  # a Monday
STEP = 1800.0
HOUR = 3600.0
DAY = 86400.0
TOOL = Proc("blender", "/usr/bin/blender", "alice", 800, 30.0)
ODD = {
    10 * DAY + 14 * HOUR: Proc("xmrig", "/tmp/.x/xmrig", "alice", 300, 95.0),
    20 * DAY + 3 * HOUR: Proc("sshd", "/dev/shm/sshd", "root", 8, 0.2),
    44 * DAY + 11 * HOUR: Proc("bash", "/usr/bin/bash", "root", 5, 0.0),
    52 * DAY + 22 * HOUR: Proc("nc", "/usr/bin/nc", "www-data", 2, 0.1),
}


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e")
    settings = load_settings(environ={"MILTON_HOME": str(home)}).settings
    ws = Workstation(seed=0)
    ws.use_tool(TOOL, T0 + 31 * DAY, T0 + 34 * DAY)
    for offset, proc in ODD.items():
        ws.inject(T0 + offset, proc)
    db = open_store(settings.db_path)
    return {"home": home, "settings": settings, "ws": ws, "db": db, "t": T0,
            "snapshots": {}, "log": {}}


def ingest_until(world, end: float) -> None:
    ws, db = world["ws"], world["db"]
    while world["t"] < end:
        rows = ws.snapshot(world["t"])
        world["snapshots"][world["t"]] = rows
        ingest_snapshot(db, rows)
        world["t"] += STEP


def train(world, ts: float) -> None:
    result = run_job("train-anomaly", train_anomaly, world["settings"], now=at(ts))
    assert result.status == "ok", result


def flagged_names(world, ts: float) -> dict[str, list[str]]:
    model = current_model(world["settings"])
    scored = score_rows(model, world["snapshots"][ts])
    world["log"].setdefault("scored", 0)
    world["log"]["scored"] += len(scored)
    world["log"].setdefault("flagged", 0)
    world["log"]["flagged"] += sum(r["flagged"] for r in scored)
    return {r["name"] + ("@" + r["username"] if r["name"] == "bash" else ""): r["reasons"]
            for r in scored if r["flagged"]}


def test_timeline(world):
    settings = world["settings"]
    # -- 31 days of routine, then the first sighting of a new tool at 09:00 -----------------
    ingest_until(world, T0 + 31 * DAY + 9 * HOUR)
    train(world, T0 + 31 * DAY + 8.5 * HOUR)
    first = T0 + 31 * DAY + 9 * HOUR
    ingest_until(world, first + STEP)
    flags = flagged_names(world, first)
    assert "blender" in flags, flags
    assert any("never seen" in r for r in flags["blender"])

    # -- a day of regular use with hourly retraining: on day 2 it is routine ----------------
    still_flagged = []
    for hour in range(10, 24 + 19):  # day 1 10:00 .. day 2 18:00
        ts = T0 + 31 * DAY + hour * HOUR
        train(world, ts - STEP)
        ingest_until(world, ts + STEP)
        if hour >= 24 + 9 and hour < 24 + 18:
            if "blender" in flagged_names(world, ts):
                still_flagged.append(hour - 24)
    assert still_flagged == [], f"still flagged on day 2 at hours {still_flagged}"
    fp_rate = world["log"]["flagged"] / world["log"]["scored"]
    assert fp_rate < 0.05, fp_rate

    # -- unused for > 30 days: forgotten, flagged again when it returns ---------------------
    ingest_until(world, T0 + 66 * DAY)
    ret = T0 + 65 * DAY + 10 * HOUR
    world["ws"].use_tool(TOOL, ret, ret + HOUR)
    train(world, ret - STEP)
    rows = world["ws"].snapshot(ret)
    assert any(r[5] == "blender" for r in rows)
    world["snapshots"][ret] = rows
    flags = flagged_names(world, ret)
    assert "blender" in flags and any("never seen" in r for r in flags["blender"]), flags

    # -- odd processes, injected once each: flagged by the model trained just before -------
    for offset, proc in ODD.items():
        moment = T0 + offset
        train(world, moment - STEP)
        flags = flagged_names(world, moment)
        key = proc.name + ("@" + proc.user if proc.name == "bash" else "")
        assert key in flags, (proc, flags)
    # ... and still flagged while the single sighting sits in the training window.
    moment = T0 + 52 * DAY + 22 * HOUR
    train(world, moment + 2 * DAY)
    assert "nc" in flagged_names(world, moment)

    # -- retention: nothing older than window + margin survives an ingest run ---------------
    db = world["db"]
    now = T0 + 66 * DAY
    keep_days = settings.anomaly.window_days + settings.ingest.retention_margin_days
    deleted = apply_retention(db, at(now), keep_days)
    assert deleted > 0
    oldest = db.conn.execute("select min(ts) from processes").fetchone()[0]
    assert oldest >= now - keep_days * DAY
    assert db.conn.execute("select count(*) from snapshots where ts < ?",
                           (now - keep_days * DAY,)).fetchone()[0] == 0


def test_cli_replay_with_now(world):
    """The same loop through the real CLI: train-anomaly and detect with --now."""
    env = {**os.environ, "MILTON_HOME": str(world["home"])}
    env.pop("MILTON_CONFIG", None)
    moment = T0 + 44 * DAY + 11 * HOUR  # the root bash injection
    when = at(moment).isoformat()
    train = subprocess.run([sys.executable, "-m", "milton", "train-anomaly", "--now", when],
                           env=env, capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr
    lines = [json.loads(line) for line in train.stdout.splitlines() if line.startswith("{")]
    assert any(line.get("status") == "ok" for line in lines)
    detect = subprocess.run([sys.executable, "-m", "milton", "detect", "--json", "--now", when],
                            env=env, capture_output=True, text=True, timeout=120)
    assert detect.returncode == 0, detect.stderr
    report = json.loads(detect.stdout)
    flagged = {(r["name"], r["username"]) for r in report["rows"]}
    assert ("bash", "root") in flagged, report
    assert report["scored"] > 30
