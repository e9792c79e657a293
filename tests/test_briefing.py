"""Briefings: since the last one, new alerts, what training did (promoted / rejected and why),
failed jobs, open tasks, the backup, memory highlights and what needs attention first; sent
through ntfy as Markdown, stored, shown again by --last."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from ntfy_server import NtfyServer

from milton.anomaly.alerts import record
from milton.core.config import load_settings
from milton.core.errors import MiltonError
from milton.core.jobs import run_job
from milton.core.store import open_store

NOW = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)


def _job(result: dict | None = None, error: str | None = None):
    def fn(_ctx):
        if error:
            raise MiltonError(error)
        return result

    return fn


def _seed(settings) -> None:
    db = open_store(settings.db_path)
    t = (NOW - timedelta(hours=3)).timestamp()
    record(db, [{"host": "srv1", "ts": t, "pid": 7, "ppid": 1, "name": "sh", "exe": "/usr/bin/sh",
                 "username": "www-data", "parent": "php-fpm8.2", "score": 0.8, "flagged": True,
                 "reasons": ["sh never started from php-fpm8.2 here (usually from cron)"]},
                {"host": "ws1", "ts": t, "pid": 8, "ppid": 1, "name": "[/bold]\x1b[2J", "exe": None,
                 "username": "alice", "parent": None, "score": 0.7, "flagged": True,
                 "reasons": ["never seen on ws1 in the last 30 days"]}],
           snapshot_id="s", model_version="v1")
    with db.atomic():
        for i, (content, status) in enumerate([("renew the TLS certificate", "active"),
                                                ("file the expense report", "pending"),
                                                ("old chore", "done")]):
            db.execute("insert into memories (tier, content, created, last_accessed, content_hash) "
                       "values ('working', ?, ?, ?, ?)", [content, t, t, f"h{i}"])
            db.execute("insert into tasks (memory_id, status, updated) values (last_insert_rowid(), ?, ?)",
                       [status, t])
        db.execute("insert into memories (tier, content, importance, created, last_accessed, "
                   "content_hash) values ('long', 'The build box is zephyr-07', 0.9, ?, ?, 'l1')", [t, t])
        db.execute("insert into sessions (id, source, started, last_activity, status, topics) "
                   "values ('s1', 'api', ?, ?, 'processed', ?)", [t, t, json.dumps(["postgres", "tls"])])
    db.close()
    when = NOW - timedelta(hours=2)
    run_job("train-lora", _job({"status_detail": "rejected", "version": "v000004",
                                "reason": "eval perplexity 14.2 > 13.9 (current)"}), settings, now=when)
    run_job("evolve", _job({"status_detail": "promoted", "version": "v000002",
                            "reason": "q4_k_m within 3% of the base"}), settings, now=when)
    try:
        run_job("backup", _job(error="no space left on device"), settings, now=when)
    except MiltonError:
        pass


def test_briefing_sent_stored_and_shown_again(cli, milton_home):
    ntfy = NtfyServer()
    try:
        env = {"MILTON_NOTIFY__URL": ntfy.url}
        settings = load_settings(environ={"MILTON_HOME": str(milton_home)}).settings
        _seed(settings)
        rc, out, err = cli("briefing", "--json", "--now", NOW.isoformat(), env=env)
        assert rc == 0, err
        data = json.loads(out)
        assert data["sent"] is True and data["new_alerts"] == 2 and data["open_tasks"] == 2
        md = data["markdown"]
        assert "sh never started from php-fpm8.2" in md and "[/bold]\\x1b[2J" in md and "\x1b" not in md
        assert "train-lora: rejected v000004 (eval perplexity 14.2 > 13.9 (current))" in md
        assert "evolve: promoted v000002" in md
        assert "backup FAILED" in md and "no space left on device" in md
        assert "[active] renew the TLS certificate" in md and "old chore" not in md
        assert "zephyr-07" in md and "topics: postgres, tls" in md
        first = md.split("**Needs attention first**\n")[1].splitlines()
        assert first[0].startswith("- 2 new alert(s)") and "backup failed" in first[1]
        (msg,) = ntfy.wait_for(1)
        assert msg.headers.get("Markdown") == "yes" and "2 new alert(s)" in msg.title
        assert "sh never started from php-fpm8.2" in msg.text
        # Shown again, nothing sent.
        rc, out, err = cli("briefing", "--last", env=env)
        assert rc == 0 and "renew the TLS certificate" in out and len(ntfy.received) == 1
        # The next one covers only what happened since.
        rc, out, err = cli("briefing", "--json", "--now", (NOW + timedelta(hours=12)).isoformat(), env=env)
        later = json.loads(out)
        assert later["since"].startswith("2026-03-02T08:00") and later["new_alerts"] == 0
        assert "backup FAILED" not in later["markdown"] and "2 open" in later["markdown"]
    finally:
        ntfy.close()


def test_no_briefing_yet_is_one_line(cli, milton_home):
    rc, out, err = cli("briefing", "--last")
    assert rc == 2 and err.strip() == "milton: error: no briefing yet: run `milton briefing`"
    assert not (milton_home / "data" / "milton.db").exists()  # --last only reads
