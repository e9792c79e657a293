"""A fleet on loopback: two agents push real snapshots to a hub's `milton serve`; the hub is
stopped and restarted mid-stream; the spool sends the backlog in order, and no row is lost or
stored twice. The endpoint validates like file ingest, needs the API key and has size limits."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from helpers import assert_clean_error

from milton.core.config import load_settings
from milton.core.jobs import run_job
from milton.ingest.agent import Spool, agent_job, spool_for
from milton.serve.process import live_server

KEY = "fleet-secret"


def _hub_env() -> dict[str, str]:
    return {"MILTON_SERVE__API_KEY": KEY, "MILTON_SERVE__CHAT_ENABLED": "false",
            "MILTON_SERVE__SNAPSHOT_ENABLED": "false", "MILTON_SERVE__MAX_PUSH_ROWS": "5000"}


def _agent(tmp_path: Path, host: str):
    return load_settings(environ={"MILTON_HOME": str(tmp_path / host), "MILTON_AGENT__HOST": host,
                                  "MILTON_AGENT__API_KEY": KEY,
                                  "MILTON_AGENT__BATCH_SNAPSHOTS": "2"}).settings


def _hub_rows(hub: Path) -> tuple[dict[str, list[tuple]], list[tuple]]:
    db = sqlite3.connect(hub / "data" / "milton.db")
    try:
        snaps: dict[str, list[tuple]] = {}
        for sid, host, ts, source, rows in db.execute(
                "select id, host, ts, source, rows from snapshots order by rowid"):
            snaps.setdefault(host, []).append((sid, ts, source, rows))
        per_snapshot = db.execute("select snapshot_id, count(*), count(distinct pid) from processes "
                                  "group by snapshot_id").fetchall()
        return snaps, per_snapshot
    finally:
        db.close()


def test_two_agents_and_a_hub_restart_lose_and_duplicate_nothing(tmp_path, cli):
    hub = tmp_path / "hub"
    hub.mkdir()
    agents = {h: _agent(tmp_path, h) for h in ("alpha", "beta")}
    runs: dict[str, list] = {h: [] for h in agents}

    def push(host: str, url: str, *, snapshot: bool = True):
        result = run_job("agent", agent_job(url, snapshot=snapshot), agents[host])
        runs[host].append(result)
        return result

    with live_server(hub, _hub_env()) as srv:
        for _ in range(3):
            for host in agents:
                result = push(host, srv.base)
                assert result.status == "ok" and result.metrics["sent"] == 1, result
                assert result.metrics["pending"] == 0
        # The CLI path, once: `milton agent --push URL` for alpha.
        rc, out, err = cli("agent", "--push", srv.base, env={
            "MILTON_HOME": str(tmp_path / "alpha"), "MILTON_AGENT__HOST": "alpha",
            "MILTON_AGENT__API_KEY": KEY})
        assert rc == 0, err
        assert '"sent": 1' in out
    # The hub is down: snapshots are spooled, the run is skipped (not failed), nothing is lost.
    for i in range(3):
        for host in agents:
            result = push(host, srv.base)
            assert result.status == "skipped" and "cannot reach the hub" in result.metrics["reason"]
            assert spool_for(agents[host]).pending() == i + 1
    # Back on another port: the backlog goes first, in order, with the new snapshot.
    with live_server(hub, _hub_env()) as srv:
        for host in agents:
            result = push(host, srv.base)
            assert result.status == "ok", result
            assert result.metrics["sent"] == 4 and result.metrics["pending"] == 0
            assert result.metrics["requests"] == 2  # batch_snapshots = 2
        snaps, per_snapshot = _hub_rows(hub)
        assert snaps["alpha"] and len(snaps["alpha"]) == 3 + 1 + 3 + 1
        assert len(snaps["beta"]) == 3 + 3 + 1
        for host, stored in snaps.items():
            times = [ts for _sid, ts, _src, _n in stored]
            assert times == sorted(times) and len(set(times)) == len(times)  # in order, once
            assert {src for *_x, src, _n in stored} == {f"push:{host}"}
        counts = {sid: (n, distinct) for sid, n, distinct in per_snapshot}
        for stored in snaps.values():
            for sid, _ts, _src, n in stored:
                assert counts[sid] == (n, n)  # every row once
        # A resend (the agent crashed after the hub stored a batch, before it moved the
        # offset) is recognised: nothing is stored twice.
        spool = spool_for(agents["beta"])
        spool.append([("resend-1", "beta", 1.8e9, 1, 0, "init", None, "root", 0.0, 1, 1.7e9)])
        saved = spool.path.read_bytes()
        assert push("beta", srv.base, snapshot=False).metrics["sent"] == 1
        spool.path.write_bytes(saved)
        spool.set_offset(0)
        again = push("beta", srv.base, snapshot=False)
        assert again.metrics["sent"] == 0 and again.metrics["duplicates"] == 1
        assert sum(1 for sid, *_ in _hub_rows(hub)[1] if sid == "resend-1") == 1
        # The hub's status shows the fleet.
        hub_settings = load_settings(environ={"MILTON_HOME": str(hub)}).settings
        from milton.ops.status import gather_status

        hosts = {h["host"]: h for h in gather_status(hub_settings, use_systemd=False)["hosts"]}
        assert {"alpha", "beta"} <= set(hosts) and hosts["alpha"]["source"] == "push:alpha"


def test_hub_endpoint_validates_like_file_ingest(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    good = {"host": "gamma", "pid": 1, "name": "init", "timestamp": "2026-03-02T10:00:00Z",
            "create_time": "2026-03-01T08:00:00+00:00", "snapshot_id": "g1"}
    auth = {"Authorization": f"Bearer {KEY}"}
    env = {**_hub_env(), "MILTON_SERVE__MAX_PUSH_BYTES": "400000"}
    with live_server(hub, env) as srv:
        url = f"{srv.base}/ingest/processes"
        assert httpx.post(url, json={"rows": [good]}).status_code == 401
        r = httpx.post(url, json={"rows": [good, {**good, "pid": 2, "create_time": "soon"}]}, headers=auth)
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith("rows[1]: field 'create_time'")
        tiny = {"host": "g", "pid": 1, "name": "i", "ts": 1.7e9}
        r = httpx.post(url, json={"rows": [tiny] * 5001}, headers=auth)
        assert r.status_code == 413 and "max_push_rows" in r.json()["error"]["message"]
        r = httpx.post(url, content=b"[" + b" " * 400_001 + b"]", headers=auth)
        assert r.status_code == 413 and "max_push_bytes" in r.json()["error"]["message"]
        r = httpx.post(url, json={"rows": [good, {**good, "host": "delta", "pid": 2}]}, headers=auth)
        assert r.status_code == 400 and "mixes hosts" in r.json()["error"]["message"]
        assert _hub_rows(hub)[0] == {}  # nothing half-written
        r = httpx.post(url, json={"rows": [good]}, headers=auth)
        assert r.status_code == 200 and r.json()["snapshots"] == 1, r.text
        row = sqlite3.connect(hub / "data" / "milton.db").execute(
            "select create_time from processes").fetchone()
        assert row[0] == pytest.approx(1772352000.0)


def test_spool_survives_a_torn_line_and_keeps_its_bound(tmp_path):
    spool = Spool(tmp_path / "agent", max_snapshots=3)
    for i in range(5):
        spool.append([(f"s{i}", "h", 1.7e9 + i, 1, 0, "init", None, None, None, None, None)])
    assert spool.pending() == 3 and spool.dropped == 2  # the oldest went, with a count
    with open(spool.path, "ab") as f:
        f.write(b'[{"snapshot_id":"torn"')  # killed mid-append
    spool = Spool(tmp_path / "agent", max_snapshots=3)
    lines = [json.loads(line)[0]["snapshot_id"] for batch, _end in spool.batches(10, 1 << 20)
             for line in batch]
    assert lines == ["s2", "s3", "s4"]


def test_pushed_snapshots_are_scored_into_alerts_per_host(tmp_path):
    """The hub trains per host as today; what agents push is scored and alerts name the host."""
    from datetime import datetime, timezone

    from milton.anomaly.simulate import Proc, Workstation
    from milton.anomaly.train import train_anomaly
    from milton.core.store import open_store
    from milton.ingest.processes import COLUMNS, ingest_snapshot

    hub = tmp_path / "hub"
    settings = load_settings(environ={"MILTON_HOME": str(hub)}).settings
    t0 = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()
    ws = Workstation(host="gamma", seed=4)
    db = open_store(settings.db_path)
    for k in range(96):
        ingest_snapshot(db, ws.snapshot(t0 + k * 1800.0))
    db.close()
    assert run_job("train-anomaly", train_anomaly, settings,
                   now=datetime.fromtimestamp(t0 + 2 * 86400, timezone.utc)).status == "ok"
    when = t0 + 2 * 86400 + 600
    ws.inject(when, Proc("xmrig", "/tmp/.x/xmrig", "alice", 300, 95.0, "bash"))
    rows = [dict(zip(COLUMNS, r)) for r in ws.snapshot(when)]
    with live_server(hub, _hub_env()) as srv:
        r = httpx.post(f"{srv.base}/ingest/processes", json={"rows": rows},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["hosts"] == ["gamma"], r.text
        alerts = httpx.get(f"{srv.base}/anomaly/alerts", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert alerts["hosts"].get("gamma", 0) >= 1
    assert any(a["name"] == "xmrig" and a["host"] == "gamma" for a in alerts["alerts"]), alerts


def test_hub_killed_mid_backlog_loses_and_duplicates_nothing(tmp_path):
    """SIGKILL the hub while an agent sends a 60-snapshot backlog one request at a time; after
    a restart the rest goes out: every snapshot stored exactly once, in order."""
    import threading
    import time

    from milton.anomaly.simulate import Workstation
    from milton.ingest.agent import HubClient, HubUnreachable, flush

    hub = tmp_path / "hub"
    hub.mkdir()
    spool = Spool(tmp_path / "agent")
    ws = Workstation(host="alpha", seed=9)
    for k in range(60):
        spool.append(ws.snapshot(1.77e9 + k * 300.0))
    db_path = hub / "data" / "milton.db"

    def stored() -> int:
        try:
            return sqlite3.connect(db_path).execute("select count(*) from snapshots").fetchone()[0]
        except sqlite3.Error:
            return 0

    outcome: dict = {}
    with live_server(hub, _hub_env()) as srv:
        client = HubClient(srv.base, KEY)

        def send() -> None:
            try:
                outcome["result"] = flush(spool, client, batch_snapshots=1, max_bytes=1 << 20)
            except HubUnreachable as exc:
                outcome["error"] = exc

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 30
        while stored() < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.proc.kill()  # kill -9 mid-stream
        sender.join(30)
        client.close()
    assert "error" in outcome, "the hub died but the agent never noticed"
    done = stored()
    assert 10 <= done < 60
    # The batch in flight when the hub died may have been committed without an answer.
    assert spool.pending() in (60 - done, 61 - done)
    with live_server(hub, _hub_env()) as srv:
        client = HubClient(srv.base, KEY)
        result = flush(spool, client, batch_snapshots=7, max_bytes=1 << 20)
        client.close()
    assert spool.pending() == 0 and result.duplicates <= 1
    db = sqlite3.connect(db_path)
    times = [ts for (ts,) in db.execute("select ts from snapshots order by rowid")]
    assert times == [1.77e9 + k * 300.0 for k in range(60)]  # all, once, in order
    per = db.execute("select s.rows, count(p.pid) from snapshots s join processes p "
                     "on p.snapshot_id = s.id group by s.id").fetchall()
    assert len(per) == 60 and all(n == c for n, c in per)


def test_agent_bad_options_are_one_line_errors_and_spool_nothing(cli, milton_home):
    for args, needle in ((["--push", "ftp://nowhere"], "--push: expected an http:// or https:// URL"),
                         (["--push", "http://127.0.0.1:9", "--every", "nonsense"],
                          "--every: expected a duration")):
        code, _out, err = cli("agent", *args, "--runs", "1")
        assert code == 2
        assert_clean_error(err, needle)
    assert not any(p.is_file() and p.stat().st_size for p in milton_home.rglob("*spool*"))
