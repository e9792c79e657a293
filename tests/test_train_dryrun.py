"""`milton train-lora --dry-run [--json]` (issue 19): what the next run would export and what the
secret filter keeps out, by rule with the match masked, through the real CLI in a subprocess
on a real store; the store is byte-for-byte the same afterwards, and the preview's counts are
what the real export then does."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from secrets_corpus import SECRETS

from milton.core.config import load_settings
from milton.core.store import open_store
from milton.memory.conversations import ingest_conversations
from milton.train.dataset import export_new_items

NOW = datetime(2024, 6, 1, 2, 0, tzinfo=timezone.utc)
PICKED = ("openai_proj", "env_db_pass", "card_visa", "wifi_phrase")


@pytest.fixture(autouse=True)
def _assistant_answers_are_targets(monkeypatch):
    """Unrated answers count as targets here (the packaged base's default, confirmed, would
    leave them out whatever the filter says), so these tests see the secret filter at work."""
    monkeypatch.setenv("MILTON_TRAIN__ASSISTANT_TARGETS", "filtered")


def _conversation(first: str, tag: str) -> dict:
    return {"messages": [
        {"role": "user", "content": first}, {"role": "assistant", "content": f"Answer about {tag}."},
        {"role": "user", "content": f"And more on {tag}?"}, {"role": "assistant", "content": f"More on {tag}."}]}


def _fill(home) -> tuple[list[str], int]:
    """Four conversations with a secret in their first question, three clean ones."""
    secrets = {name: (text, secret) for name, text, secret in SECRETS}
    convs = [_conversation(secrets[name][0], name) for name in PICKED]
    convs += [_conversation(f"Tell me about topic {i}.", f"topic {i}") for i in range(3)]
    path = home / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    db = open_store(home / "data" / "milton.db")
    try:
        ingest_conversations(db, path, max_message_chars=100_000, now=NOW)
    finally:
        db.close()
    return [secrets[name][1] for name in PICKED], len(convs) * 2


def _dump(home) -> str:
    db = open_store(home / "data" / "milton.db")
    try:
        return "\n".join(db.conn.iterdump())
    finally:
        db.close()


def test_dry_run_reports_what_would_be_exported_and_writes_nothing(cli, milton_home):
    secrets, pairs = _fill(milton_home)
    before = _dump(milton_home)
    rc, stdout, stderr = cli("train-lora", "--dry-run", "--json")
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert report["dry_run"] is True and report["sensitive_mode"] == "exclude"
    assert report["sessions"] == 7 and report["excluded"] == 4 and report["redacted"] == 0
    assert report["new_pairs"] == pairs - 4 and report["new_texts"] == 0
    assert report["resumes_run"] is None and report["would_train"] is (pairs - 4 >= report["min_new_pairs"])
    assert {"openai_key", "password", "card_number"} <= set(report["by_rule"])
    flagged = report["flagged"]
    assert {f["rule"] for f in flagged} == set(report["by_rule"])
    assert all(f["action"] == "excluded" and f["field"] == "prompt" and f["item"] == "pair"
               and f["source"].startswith("session:") and "chars)" in f["context"] for f in flagged)
    openai = next(f for f in flagged if f["rule"] == "openai_key")
    assert "sk-p********(" in openai["context"] and "here is my key" in openai["context"]

    rc, text, stderr = cli("train-lora", "--dry-run")
    assert rc == 0, stderr
    assert "nothing trained, nothing written" in text and "4 items excluded" in text
    assert "[openai_key]" in text and "[card_number]" in text
    for output in (stdout, text, stderr):
        for secret in secrets:
            assert secret not in output and secret[-6:] not in output  # not even its tail

    assert _dump(milton_home) == before  # no job_runs row, no training run, no items

    # The preview is what the real export then does.
    db = open_store(milton_home / "data" / "milton.db")
    try:
        with db.atomic():
            run = int(db.conn.execute("insert into training_runs (started, status) values (?, 'running')",
                                      [NOW.isoformat()]).lastrowid)
        done = export_new_items(db, load_settings().settings, run, NOW)
    finally:
        db.close()
    assert (done.new_pairs, done.excluded, done.duplicates, done.by_kind) == (
        report["new_pairs"], report["excluded"], report["duplicates"], report["by_rule"])


def test_dry_run_in_redact_mode_and_after_a_finished_run(cli, milton_home):
    _, pairs = _fill(milton_home)
    env = {"MILTON_TRAIN__SENSITIVE_MODE": "redact"}
    rc, stdout, stderr = cli("train-lora", "--dry-run", "--json", env=env)
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert (report["excluded"], report["redacted"], report["new_pairs"]) == (0, 4, pairs)
    assert {f["action"] for f in report["flagged"]} == {"redacted"}
    # After a finished run took everything, the next one has nothing new.
    db = open_store(milton_home / "data" / "milton.db")
    try:
        with db.atomic():
            run = int(db.conn.execute("insert into training_runs (started, status) values (?, 'running')",
                                      [NOW.isoformat()]).lastrowid)
        export_new_items(db, load_settings().settings, run, NOW)
        with db.atomic():
            db.conn.execute("update training_runs set status = 'promoted' where id = ?", [run])
    finally:
        db.close()
    rc, stdout, stderr = cli("train-lora", "--dry-run", "--json")
    report = json.loads(stdout)
    assert rc == 0 and report["new_pairs"] == 0 and report["flagged"] == [] and report["would_train"] is False
