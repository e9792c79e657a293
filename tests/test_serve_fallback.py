"""A corrupt ``current`` at start-up: serve loads the newest version that verifies, says
"degraded" with the reason in /healthz and telemetry, scores meanwhile, and swaps to a good
new version when one is published (then "ok" again)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx
from helpers import ingest_simulated
from live_server import wait_until

from milton.anomaly.train import train_anomaly
from milton.core.artifacts import ArtifactStore
from milton.core.config import load_settings
from milton.core.jobs import run_job
from milton.models.layout import ANOMALY_KIND as KIND
from milton.serve.process import live_server

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()


def test_corrupt_current_at_start_falls_back_and_recovers(tmp_path):
    settings = load_settings(environ={"MILTON_HOME": str(tmp_path)}).settings
    ingest_simulated(settings, seed=5, days=2, t0=T0)

    def train(hours: float) -> str:
        result = run_job("train-anomaly", train_anomaly, settings,
                         now=datetime.fromtimestamp(T0 + 2 * 86400 + hours * 3600, timezone.utc))
        assert result.status == "ok"
        return result.metrics["version"]

    v1, v2, v3 = train(0), train(1), train(2)
    store = ArtifactStore(settings.paths.checkpoints_dir, KIND)
    assert store.current_name() == v3
    with open(store.dir / v3 / "profile.json", "ab") as f:  # fails its checksum
        f.write(b" ")
    env = {"MILTON_SERVE__RELOAD_POLL_S": "0.1", "MILTON_SERVE__SNAPSHOT_ENABLED": "false",
           "MILTON_SERVE__CHAT_ENABLED": "false"}
    with live_server(tmp_path, env) as srv:
        health = httpx.get(f"{srv.base}/healthz").json()
        assert health["anomaly_model"] == v2 and health["status"] == "degraded", health
        assert any(v3 in r and "failed verification" in r and v2 in r for r in health["reasons"])
        tele = httpx.get(f"{srv.base}/ml/telemetry").json()
        assert tele["status"] == "degraded" and v3 in tele["anomaly"]["degraded"]
        assert _serve_state(tmp_path)["health"] == "degraded"  # what status and doctor read
        row = dict(zip(("host", "pid", "name", "timestamp"), ("ws1", 1, "xmrig", T0 + 2 * 86400)))
        scored = httpx.post(f"{srv.base}/anomaly/score", json=[row])
        assert scored.status_code == 200 and scored.json()["model_version"] == v2
        v4 = train(3)
        health = wait_until(lambda: (h := httpx.get(f"{srv.base}/healthz").json())
                            ["anomaly_model"] == v4 and h, timeout=15, step=0.1)
        assert health["anomaly_model"] == v4 and health["status"] == "ok", health
        assert health["reasons"] == []
        # serve.json (what status and doctor read) follows within a poll
        state = wait_until(lambda: (s := _serve_state(tmp_path))["health"] == "ok" and s, timeout=10)
        assert state["health"] == "ok" and state["reasons"] == []
    assert v1 != v2


def test_rollback_to_the_fallback_clears_degraded(tmp_path):
    """In-process: current corrupt -> fallback serves, degraded; `models rollback` to the version
    that serves -> healthy without a reload."""
    from milton.anomaly.model import load_verified
    from milton.serve.watch import HotModel

    settings = load_settings(environ={"MILTON_HOME": str(tmp_path)}).settings
    ingest_simulated(settings, seed=6, days=2, t0=T0)
    for hours in (0, 1):
        assert run_job("train-anomaly", train_anomaly, settings, now=datetime.fromtimestamp(
            T0 + 2 * 86400 + hours * 3600, timezone.utc)).status == "ok"
    store = ArtifactStore(settings.paths.checkpoints_dir, KIND)
    first, bad = [v.name for v in store.versions()]
    (store.dir / bad / "meta.json").write_text("{}")
    hot = HotModel(store, lambda s, n: load_verified(s, n))
    assert hot.check() and hot.get().version == first and bad in hot.degraded
    store.rollback(first)
    assert not hot.check() and hot.degraded is None and hot.get().version == first


def _serve_state(home):
    return json.loads((home / "data" / "serve.json").read_text())
