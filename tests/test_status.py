"""`milton status`: read-only, one screen, flags what needs attention, --check notifies."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
from ntfy_server import NtfyServer

from milton.core.artifacts import ArtifactStore
from milton.core.jobs import Skip, run_job
from milton.core.timeutil import iso, utcnow


def _status(cli, *args, env=None):
    code, out, err = cli("status", "--json", *args, env=env)
    assert "Traceback" not in err, err
    return code, json.loads(out)


def _fail(ctx):
    raise RuntimeError("model exploded")


@pytest.fixture
def ntfy():
    server = NtfyServer()
    yield server
    server.close()


def test_fresh_home_shows_schedule_and_creates_nothing(cli, milton_home):
    code, report = _status(cli)
    assert code == 0
    assert not (milton_home / "data" / "milton.db").exists()  # status only reads
    assert report["store"]["exists"] is False
    assert report["attention"] == []
    jobs = {j["job"]: j for j in report["jobs"]}
    assert {"ingest", "train-anomaly", "compress-memory", "backup"} <= set(jobs)
    now = datetime.fromisoformat(report["now"].replace("Z", "+00:00"))
    nxt = datetime.fromisoformat(jobs["ingest"]["next_run"].replace("Z", "+00:00"))
    assert now < nxt <= now + timedelta(minutes=5)  # *:0/5
    assert jobs["ingest"]["next_source"] == "calendar"
    assert jobs["ingest"]["last_status"] is None


def test_jobs_last_run_key_metric_and_failure_streak(cli, settings):
    run_job("ingest", lambda ctx: {"rows": 123, "source": "psutil"}, settings)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            run_job("train-anomaly", _fail, settings)
    code, report = _status(cli)
    jobs = {j["job"]: j for j in report["jobs"]}
    assert jobs["ingest"]["last_status"] == "ok"
    assert jobs["ingest"]["key_metric"] == "rows=123"
    assert jobs["train-anomaly"]["failure_streak"] == 2
    flagged = [a for a in report["attention"] if "train-anomaly" in a["message"]]
    assert flagged and flagged[0]["level"] == "critical" and "model exploded" in flagged[0]["message"]

    # A skipped run neither breaks nor extends the streak; a success clears it.
    def skip(ctx):
        raise Skip("not enough data")

    run_job("train-anomaly", skip, settings)
    _, report = _status(cli)
    assert any("train-anomaly" in a["message"] for a in report["attention"])
    run_job("train-anomaly", lambda ctx: {"train_rows": 9}, settings)
    _, report = _status(cli)
    assert not any("train-anomaly" in a["message"] for a in report["attention"])
    assert {j["job"]: j for j in report["jobs"]}["train-anomaly"]["key_metric"] == "train_rows=9"


def test_single_failure_is_shown_but_not_flagged(cli, settings):
    with pytest.raises(RuntimeError):
        run_job("ingest", _fail, settings)
    _, report = _status(cli)
    job = {j["job"]: j for j in report["jobs"]}["ingest"]
    assert job["last_status"] == "failed" and job["failure_streak"] == 1
    assert not any("ingest" in a["message"] for a in report["attention"])


def test_models_memory_and_store_sizes(cli, settings, memory_db, embedder):
    from milton.memory.memories import NewMemory, add_memory

    store = ArtifactStore(settings.paths.checkpoints_dir, "anomaly")
    store.publish(lambda d: (d / "model.bin").write_bytes(b"x"))
    v2 = store.publish(lambda d: (d / "model.bin").write_bytes(b"y"))
    store.pin("v000001")
    now = utcnow()
    add_memory(memory_db, embedder, NewMemory("the user prefers tabs", tier="long"), now)
    add_memory(memory_db, embedder, NewMemory("said hello", tier="short"), now)
    memory_db["sessions"].insert_all([
        {"id": "s1", "source": "serve", "started": 1.0, "last_activity": 1.0, "status": "open"},
        {"id": "s2", "source": "serve", "started": 1.0, "last_activity": 1.0, "status": "processed"},
    ])
    _, report = _status(cli)
    assert report["artifacts"] == [{"kind": "anomaly", "current": v2.name, "created": v2.created,
                                    "decision": None, "reason": None,
                                    "versions": 2, "pinned": ["v000001"]}]
    assert report["memory"]["tiers"] == {"short": 1, "working": 0, "long": 1}
    assert report["memory"]["sessions_active"] == 1
    assert report["store"]["exists"] and report["store"]["size_bytes"] > 0
    assert report["store"]["schema_version"] >= 5
    assert report["disk"]["free_bytes"] > 0


def test_reads_while_a_writer_holds_the_store(cli, settings, memory_db):
    run_job("ingest", lambda ctx: {"rows": 1}, settings)
    conn = sqlite3.connect(settings.db_path)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("insert into counters (name, value) values ('x', 1)")
    try:
        code, report = _status(cli)
    finally:
        conn.rollback()
        conn.close()
    assert code == 0 and report["store"]["exists"]


def test_backup_age_flags_and_check_notifies(cli, settings, ntfy):
    received = ntfy.received
    env = {"MILTON_NOTIFY__URL": ntfy.url, "MILTON_NOTIFY__TOPIC": "milton-test"}
    run_job("ingest", lambda ctx: {"rows": 1}, settings)
    # A store but no backup at all: a warning.
    code, report = _status(cli, env=env)
    assert [a["event"] for a in report["attention"]] == ["stale_backup"]
    assert report["attention"][0]["level"] == "warning"

    code, out, err = cli("backup", env=env)
    assert code == 0, err
    code, report = _status(cli, "--check", env=env)
    assert code == 0 and report["attention"] == [] and received == []
    assert report["backups"]["count"] == 1 and report["backups"]["age_days"] < 0.01

    later = iso(utcnow() + timedelta(days=9))
    code, report = _status(cli, "--check", "--now", later, env=env)
    assert code == 1
    assert [a["event"] for a in report["attention"]] == ["stale_backup"]
    assert "days old" in report["attention"][0]["message"]
    assert len(received) == 1 and received[0].path == "/milton-test"
    assert "days old" in received[0].text

    # Switched off: still exit 1, nothing sent.
    env["MILTON_NOTIFY__ON_STALE_BACKUP"] = "false"
    code, _ = _status(cli, "--check", "--now", later, env=env)
    assert code == 1 and len(received) == 1


def test_disk_nearly_full_is_flagged(cli):
    code, report = _status(cli, "--check", env={"MILTON_STATUS__MIN_FREE_DISK_PERCENT": "100"})
    assert code == 1
    assert any(a["message"].startswith("disk nearly full") for a in report["attention"])


def test_unreadable_store_is_flagged_not_a_crash(cli, settings):
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    settings.db_path.write_bytes(b"this is not sqlite" * 100)
    code, report = _status(cli)
    assert code == 0
    assert any("cannot be read" in a["message"] for a in report["attention"])


def test_screen_output_names_jobs_and_attention(cli, settings):
    for _ in range(2):
        with pytest.raises(RuntimeError):
            run_job("train-anomaly", _fail, settings)
    code, out, err = cli("status", env={"COLUMNS": "160"})
    assert code == 0, err
    assert "! train-anomaly failed its last 2 runs: RuntimeError: model exploded" in out
    for name in ("ingest", "train-anomaly", "compress-memory", "Models", "free disk"):
        assert name in out


def test_age_text():
    from milton.ops.status import age

    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    assert age(iso(now - timedelta(hours=3)), now) == "3h ago"
    assert age(iso(now + timedelta(minutes=12)), now) == "in 12m"
    assert age(iso(now - timedelta(days=2)), now) == "2.0d ago"
    assert age(None, now) == "-"


def test_systemd_answer_is_reused_for_a_while(monkeypatch):
    """serve's dashboard loads the overview every 30 s: systemctl is asked once per window."""
    from milton.ops import status

    calls = []
    monkeypatch.setattr(status, "_ask_systemd", lambda units: calls.append(units) or {})
    monkeypatch.setattr(status, "_systemd_cache", {})
    status._systemd_next(["a.timer"])
    status._systemd_next(["a.timer"])
    assert calls == [["a.timer"]]
    status._systemd_next(["b.timer"])  # other units: asked
    assert len(calls) == 2
    monkeypatch.setattr(status, "SYSTEMD_CACHE_S", 0.0)  # window over: asked again
    status._systemd_next(["a.timer"])
    assert len(calls) == 3
