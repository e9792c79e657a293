"""Alerts people can use: one open alert per identity per day (counts go up, rows do not
multiply), acknowledge, a mute list in the store, rate-limited ntfy notifications with the
reasons, `milton status` and `GET /anomaly/alerts` on a live serve."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from live_server import wait_until
from ntfy_server import NtfyServer

from milton.anomaly.alerts import (
    acknowledge,
    list_alerts,
    list_mutes,
    mute,
    notify_new,
    record,
    unmute,
)
from milton.core.config import load_settings
from milton.core.errors import InputError
from milton.core.migrations import MIGRATIONS, migrate
from milton.core.store import open_store

T0 = datetime(2026, 3, 2, 10, tzinfo=timezone.utc).timestamp()
DAY = 86400.0


def scored(name: str, ts: float, *, host: str = "ws1", user: str = "alice", flagged: bool = True,
           reasons=("never seen on ws1 in the last 30 days",)) -> dict:
    return {"host": host, "ts": ts, "pid": 4242, "ppid": 1, "name": name, "exe": f"/tmp/{name}",
            "username": user, "parent": "bash", "score": 0.7, "flagged": flagged,
            "reasons": list(reasons)}


def test_one_open_alert_per_identity_per_day(tmp_path):
    db = open_store(tmp_path / "m.db")
    new = record(db, [scored("xmrig", T0), scored("ls", T0, flagged=False)], snapshot_id="s1",
                 model_version="v000001")
    assert [a["name"] for a in new] == ["xmrig"]
    for minute in range(1, 30):  # serve's loop: the same process every minute
        assert record(db, [scored("xmrig", T0 + 60 * minute)], snapshot_id="s", model_version="v1") == []
    rows = list_alerts(db.conn)
    assert len(rows) == 1 and rows[0]["count"] == 30 and rows[0]["last_ts"] == T0 + 29 * 60
    assert rows[0]["first_ts"] == T0 and rows[0]["parent"] == "bash"
    # Another user is another identity; the next day is another alert.
    record(db, [scored("xmrig", T0, user="root")], snapshot_id="s", model_version="v1")
    record(db, [scored("xmrig", T0 + DAY)], snapshot_id="s", model_version="v1")
    assert len(list_alerts(db.conn)) == 3
    # Acknowledged: it leaves the open list; seen again the same day, it is counted, not re-opened.
    first = rows[0]["id"]
    assert acknowledge(db, [first], T0 + 3600) == 1
    assert record(db, [scored("xmrig", T0 + 7200)], snapshot_id="s", model_version="v1") == []
    assert first not in [a["id"] for a in list_alerts(db.conn)]
    acked = [a for a in list_alerts(db.conn, include_acked=True) if a["id"] == first][0]
    assert acked["count"] == 31 and not acked["open"]
    with pytest.raises(InputError, match="no such alert: 999"):
        acknowledge(db, [first, 999], T0)
    assert list_alerts(db.conn, host="ws1", since=T0 + DAY)[0]["day"] == "2026-03-03"
    assert acknowledge(db, None, T0) == 2 and list_alerts(db.conn) == []


def test_mutes_are_kept_listed_and_removable(tmp_path):
    db = open_store(tmp_path / "m.db")
    assert mute(db, "backup-tool", None, T0) and not mute(db, "backup-tool", None, T0)
    assert mute(db, "nc", "srv1", T0)
    assert [(m["name"], m["host"]) for m in list_mutes(db.conn)] == [("backup-tool", None), ("nc", "srv1")]
    assert record(db, [scored("backup-tool", T0), scored("nc", T0, host="srv1")],
                  snapshot_id="s", model_version="v1") == []
    assert [a["host"] for a in record(db, [scored("nc", T0, host="ws1")], snapshot_id="s",
                                      model_version="v1")] == ["ws1"]
    assert unmute(db, "backup-tool", None) and not unmute(db, "backup-tool", None)
    assert record(db, [scored("backup-tool", T0)], snapshot_id="s", model_version="v1")


def test_migration_folds_the_rows_stored_before(tmp_path):
    """Stores from before kept a row a minute: the migration folds them into one per day."""
    from milton.core.store import connect

    db = connect(tmp_path / "old.db")
    db.execute("create table _migrations (id integer primary key, name text not null unique, "
               "applied_at text not null)")
    for index, (name, fn) in enumerate(MIGRATIONS, start=1):
        if name == "m009_alert_dedupe":
            break
        with db.atomic():
            fn(db)
            db.execute("insert into _migrations values (?, ?, 'x')", [index, name])
    with db.atomic():
        for minute in range(50):
            db.execute("insert into alerts (ts, host, name, username, exe, score, reasons) "
                       "values (?, 'ws1', 'xmrig', 'alice', '/tmp/xmrig', 0.7, '[]')", [T0 + 60 * minute])
        db.execute("insert into alerts (ts, host, name, score) values (?, 'ws1', 'nc', 0.6)", [T0])
    assert "m009_alert_dedupe" in migrate(db)
    rows = {r["name"]: r for r in list_alerts(db.conn)}
    assert set(rows) == {"xmrig", "nc"} and rows["xmrig"]["count"] == 50
    assert rows["xmrig"]["last_ts"] == T0 + 49 * 60 and rows["nc"]["count"] == 1
    # Old rows are not a flood of late notifications.
    assert db.execute("select count(*) from alerts where notified_at is null").fetchone()[0] == 0


def test_notifications_are_rate_limited_and_carry_reasons(tmp_path, monkeypatch):
    ntfy = NtfyServer()
    try:
        settings = load_settings(environ={"MILTON_HOME": str(tmp_path),
                                          "MILTON_NOTIFY__URL": ntfy.url,
                                          "MILTON_NOTIFY__ALERTS_PER_HOUR": "2"}).settings
        db = open_store(settings.db_path)
        new = record(db, [scored("xmrig", T0, reasons=["never seen on ws1", "unusual hour"])],
                     snapshot_id="s", model_version="v1")
        assert notify_new(settings, db, new, T0) == 1
        assert "xmrig" in ntfy.received[0].title and "never seen on ws1; unusual hour" in ntfy.received[0].text
        new = record(db, [scored("nc", T0)], snapshot_id="s", model_version="v1")
        assert notify_new(settings, db, new, T0 + 10) == 1
        # The limit (2 an hour) is reached: the next ones wait, then go out together.
        for i, name in enumerate(["a1", "a2", "a3"]):
            new = record(db, [scored(name, T0 + 20 + i)], snapshot_id="s", model_version="v1")
            assert notify_new(settings, db, new, T0 + 20 + i) == 0
        assert len(ntfy.received) == 2
        assert notify_new(settings, db, [], T0 + 3700) == 1
        last = ntfy.received[-1]
        assert "3 new alerts" in last.title and all(n in last.text for n in ("a1", "a2", "a3"))
        assert db.execute("select count(*) from alerts where notified_at is null").fetchone()[0] == 0
    finally:
        ntfy.close()


def test_cli_lists_acks_and_mutes(cli, milton_home):
    settings = load_settings().settings
    db = open_store(settings.db_path)
    record(db, [scored("xmrig", T0), scored("[/bold]\x1b[2J", T0, host="srv1")],
           snapshot_id="s", model_version="v1")
    db.close()
    rc, out, err = cli("alerts", "--json")
    assert rc == 0, err
    listed = json.loads(out)
    assert {a["name"] for a in listed} == {"xmrig", "[/bold]\x1b[2J"}
    rc, out, err = cli("alerts", "--host", "srv1", env={"COLUMNS": "300"})
    assert rc == 0 and "[/bold]\\x1b[2J" in out and "\x1b" not in out and "xmrig" not in out
    rc, out, err = cli("alerts", "ack", "77")
    assert rc != 0 and err.strip() == "milton: error: no such alert: 77 (nothing acknowledged)"
    rc, out, err = cli("alerts", "ack")
    assert rc != 0 and "give alert id(s) or --all" in err
    xmrig = [a["id"] for a in listed if a["name"] == "xmrig"][0]
    rc, out, err = cli("alerts", "ack", str(xmrig))
    assert rc == 0 and "Acknowledged 1" in out
    rc, out, err = cli("alerts", "--json")
    assert [a["name"] for a in json.loads(out)] == ["[/bold]\x1b[2J"]
    rc, out, err = cli("alerts", "--all", "--json")
    assert len(json.loads(out)) == 2
    rc, out, err = cli("alerts", "mute", "xmrig", "--host", "ws1")
    assert rc == 0 and "Muted: xmrig on ws1" in out
    rc, out, err = cli("alerts", "mutes", "--json")
    assert json.loads(out)[0]["name"] == "xmrig" and json.loads(out)[0]["host"] == "ws1"
    rc, out, err = cli("alerts", "unmute", "xmrig")
    assert rc != 0 and "not muted" in err
    rc, out, err = cli("alerts", "unmute", "xmrig", "--host", "ws1")
    assert rc == 0
    rc, out, err = cli("status", "--json")
    report = json.loads(out)
    assert report["alerts"]["open"] == 1 and report["alerts"]["hosts"] == {"srv1": 1}
    assert any("1 open alert" in a["message"] for a in report["attention"])
    rc, out, err = cli("alerts", "ack", "--all")
    assert rc == 0 and "Acknowledged 1" in out
    rc, out, err = cli("alerts")
    assert rc == 0 and "No open alerts." in out


def test_live_serve_dedupes_notifies_and_lists(tmp_path: Path):
    """A live serve scoring this machine every 0.3 s: one alert per process, counts rising, at
    most alerts_per_hour notifications, GET /anomaly/alerts and status agree."""
    from milton.anomaly.simulate import Workstation
    from milton.anomaly.train import train_anomaly
    from milton.core.jobs import run_job
    from milton.ingest.processes import ingest_snapshot
    from milton.ops.status import gather_status
    from milton.serve.process import live_server

    settings = load_settings(environ={"MILTON_HOME": str(tmp_path)}).settings
    ws = Workstation(seed=3)
    db = open_store(settings.db_path)
    now = time.time()
    for k in range(2 * 48):
        ingest_snapshot(db, ws.snapshot(now - 2 * DAY + k * 1800.0))
    db.close()
    assert run_job("train-anomaly", train_anomaly, settings,
                   now=datetime.fromtimestamp(now, timezone.utc)).status == "ok"
    ntfy = NtfyServer()
    env = {"MILTON_SERVE__SNAPSHOT_INTERVAL_S": "0.3", "MILTON_NOTIFY__URL": ntfy.url,
           "MILTON_NOTIFY__ALERTS_PER_HOUR": "1", "MILTON_SERVE__CHAT_ENABLED": "false"}
    try:
        with live_server(tmp_path, env) as srv:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                body = httpx.get(f"{srv.base}/anomaly/alerts").json()
                if body["alerts"] and max(a["count"] for a in body["alerts"]) >= 3:
                    break
                time.sleep(0.2)
            alerts = body["alerts"]
            assert alerts and max(a["count"] for a in alerts) >= 3, body  # long-lived ones
            idents = [(a["host"], a["name"], a["username"], a["exe"]) for a in alerts]
            assert len(idents) == len(set(idents))  # counts went up, rows did not multiply
            assert body["open"] == len(alerts)
            # the notification is sent off the request path: give a loaded machine time
            wait_until(lambda: ntfy.received, timeout=30)
            assert len(ntfy.received) == 1 and "new alert" in ntfy.received[0].title
            assert alerts[-1]["name"] in ntfy.received[0].text or len(alerts) > 10
            report = gather_status(settings, use_systemd=False)
            assert report["alerts"]["open"] >= len(alerts)
            assert [h["host"] for h in report["hosts"]] == ["ws1"]  # hosts with snapshots in the store
    finally:
        ntfy.close()
