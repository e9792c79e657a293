"""`milton serve` as a real process on loopback, exercised by a real HTTP client.

Hot reload: 20 model replacements under concurrent scoring load with zero failed requests; a
corrupt model (unloadable, or failing its checksum) is rejected and the last good one serves.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from milton.anomaly.simulate import Workstation
from milton.anomaly.train import train_anomaly
from milton.core.artifacts import CURRENT, ArtifactStore
from milton.core.config import load_settings
from milton.core.jobs import run_job
from milton.core.store import open_store
from milton.ingest.processes import COLUMNS, ingest_snapshot
from milton.models.layout import ANOMALY_KIND as KIND
from milton.serve.process import live_server

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()


@pytest.fixture()
def trained_home(tmp_path: Path):
    env = {"MILTON_HOME": str(tmp_path)}
    settings = load_settings(environ=env).settings
    ws = Workstation(seed=3)
    db = open_store(settings.db_path)
    for k in range(3 * 48):
        ingest_snapshot(db, ws.snapshot(T0 + k * 1800.0))
    db.close()
    now = datetime.fromtimestamp(T0 + 3 * 86400, timezone.utc)
    assert run_job("train-anomaly", train_anomaly, settings, now=now).status == "ok"
    return tmp_path, settings, ws


@pytest.fixture()
def server(trained_home):
    home, settings, ws = trained_home
    env = {"MILTON_SERVE__RELOAD_POLL_S": "0.1", "MILTON_SERVE__SNAPSHOT_INTERVAL_S": "0.5"}
    with live_server(home, env) as srv:
        yield srv.base, srv, settings, ws


def as_records(rows):
    return [dict(zip(COLUMNS, r)) for r in rows]


def wait_for_version(base: str, version: str, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if httpx.get(f"{base}/healthz", timeout=2).json()["anomaly_model"] == version:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"server never switched to {version}")


def test_hot_reload_under_load(server):
    base, proc, settings, ws = server
    store = ArtifactStore(settings.paths.checkpoints_dir, KIND, keep=settings.anomaly.keep_versions)
    batch = as_records(ws.snapshot(T0 + 3 * 86400 + 600) * 4)
    stop = threading.Event()
    results = {"ok": 0, "failed": [], "versions": set()}
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{base}/anomaly/score", json={"rows": batch})
                    ok = r.status_code == 200 and len(r.json()["results"]) == len(batch)
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                with lock:
                    if ok:
                        results["ok"] += 1
                        results["versions"].add(r.json()["model_version"])
                    else:
                        results["failed"].append(repr(r))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    latencies = []
    try:
        for i in range(20):
            now = datetime.fromtimestamp(T0 + 3 * 86400 + (i + 1) * 60, timezone.utc)
            result = run_job("train-anomaly", train_anomaly, settings, now=now)
            latencies.append(wait_for_version(base, result.metrics["version"]))

        good = store.current_name()
        # An unloadable model whose checksums are fine: rejected, the old one keeps serving.
        def garbage(d: Path) -> None:
            for name in ("forest.skops", "profile.json", "meta.json"):
                (d / name).write_bytes(b"not a model")
        bad = store.publish(garbage).name
        # A model damaged on disk after publishing: fails verification in serve.
        tampered = store.publish(lambda d: (store.get(good).path / "forest.skops").read_bytes()
                                 and _copy_model(store.get(good).path, d), make_current=False).name
        with open(store.dir / tampered / "profile.json", "ab") as f:
            f.write(b" ")
        time.sleep(1.0)
        tel = httpx.get(f"{base}/ml/telemetry").json()["anomaly"]
        assert tel["current_version"] == good and tel["reload_failures"] == 1, tel
        tmp_link = store.dir / ".force"
        os.symlink(tampered, tmp_link)
        os.replace(tmp_link, store.dir / CURRENT)
        time.sleep(1.0)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert results["failed"] == [], results["failed"][:3]
    assert results["ok"] > 20
    assert len(results["versions"]) >= 10  # requests really were served by many versions
    assert max(latencies) < 5.0, latencies
    tel = httpx.get(f"{base}/ml/telemetry").json()
    anomaly = tel["anomaly"]
    assert anomaly["current_version"] == good
    assert anomaly["reloads"] == 21  # the initial load + 20 swaps
    assert anomaly["reload_failures"] == 2 and anomaly["fallbacks"] == 2
    assert bad in anomaly["last_error"] or tampered in anomaly["last_error"]
    assert "checksum" in anomaly["last_error"]
    assert tel["training_runs"]["counts"]["ok"] == 21
    assert anomaly["last_swap_s"] < 0.1
    metrics = httpx.get(f"{base}/metrics").text
    assert "milton_model_reloads_total" in metrics and 'status="ok"' in metrics

    # Graceful shutdown on SIGTERM: the lifespan shutdown runs (threads stopped, logs flushed).
    # uvicorn re-raises the signal after shutting down, which systemd counts as a clean stop.
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    output = proc.output()
    assert '"serve stopped"' in output, output[-2000:]


def _copy_model(src: Path, dst: Path) -> None:
    for name in ("forest.skops", "profile.json", "meta.json"):
        (dst / name).write_bytes((src / name).read_bytes())


def test_score_api_errors_and_alerts(server):
    base, _proc, settings, ws = server
    assert httpx.post(f"{base}/anomaly/score", content=b"{nope").status_code == 400
    r = httpx.post(f"{base}/anomaly/score", json={"rows": [{"host": "h", "pid": "x", "name": "a",
                                                            "timestamp": 1.7e9}]})
    assert r.status_code == 400 and "rows[0]" in r.json()["error"]["message"]
    big = [{"host": "h", "pid": 1, "name": "a", "timestamp": 1.7e9}] * (settings.serve.max_score_rows + 1)
    assert httpx.post(f"{base}/anomaly/score", json=big, timeout=60).status_code == 413
    odd = {"host": "ws1", "pid": 4242, "name": "xmrig", "exe": "/tmp/xmrig", "username": "alice",
           "timestamp": T0 + 3 * 86400 + 900, "cpu": 99.0, "rss": 300 << 20}
    normal = dict(zip(COLUMNS, ws.snapshot(T0 + 3 * 86400 + 900)[0]))
    body = httpx.post(f"{base}/anomaly/score", json=[odd, normal]).json()
    assert [r["flagged"] for r in body["results"]] == [True, False]
    assert "never seen" in body["results"][0]["reasons"][0]
    # The live snapshot loop scores this machine's processes (none of which the model knows).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        live = httpx.get(f"{base}/ml/telemetry").json()
        if live["live_snapshots"]["runs"] >= 1 and live["alerts_stored"] > 0:
            break
        time.sleep(0.2)
    assert live["live_snapshots"]["runs"] >= 1 and live["alerts_stored"] > 0, live
