"""``milton ingest conversations``: formats, validation reasons, dedupe, strict, directories,
export round trip. Real SQLite and the real embedder (loaded once for the module)."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import assert_clean_error

from milton.core.errors import InputError
from milton.core.store import open_store
from milton.memory.conversations import (
    RecordError,
    RejectedInput,
    ingest_conversations,
    parse_record,
)
from milton.memory.export import export_sessions
from milton.memory.sessions import pending_sessions, process_sessions

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
TABLES = ("sessions", "messages", "memories", "memory_vectors", "preferences", "counters")


@pytest.fixture
def db(memory_db):
    return memory_db


def ingest(db, path, *, strict: bool = False, now: datetime = NOW):
    return ingest_conversations(db, path, max_message_chars=100_000, now=now, strict=strict)


def counts(db) -> dict[str, int]:
    return {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def openai(*turns: str, **top) -> dict:
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], **top}


def messages(db, session_id: str) -> list[tuple]:
    return db.execute("select seq, role, content, ts from messages where session_id = ? order by seq",
                      [session_id]).fetchall()


# -- formats ---------------------------------------------------------------------------------
def test_each_format_is_ingested(db, milton_home):
    src = jsonl(milton_home / "openai.jsonl", [{
        "id": "chatcmpl-1", "user": "alice", "timestamp": "2024-05-01T10:00:00Z",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "text", "text": "What is"},
                                         {"type": "image_url", "image_url": {"url": "x"}},
                                         {"type": "text", "text": "WAL mode?"}],
             "timestamp": 1714557700},
            {"role": "assistant", "content": "Write-ahead logging.", "created_at": "2024-05-01T10:01:41Z"},
        ]}])
    share = milton_home / "share.json"
    share.write_text(json.dumps([
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "ping"},
                           {"from": "gpt", "value": "pong"}, {"from": "observation", "value": "ok"}]},
        {"conversations": [{"from": "human", "value": "second"}, {"from": "gpt", "value": "reply"}]},
    ], indent=2))
    mine = jsonl(milton_home / "mine.jsonl", [{
        "milton_session": 1, "id": "sess-42", "user": "bob", "started": "2024-05-02T00:00:00Z",
        "ended": "2024-05-02T00:10:00Z", "metadata": {"client": "cli"},
        "messages": [{"role": "user", "content": "hello", "ts": "2024-05-02T00:00:00Z", "metadata": {"k": 1}},
                     {"role": "assistant", "content": "hi", "ts": 1714608005.5}]}])

    report = ingest(db, src)
    (sid,) = report.session_ids
    assert messages(db, sid) == [
        (1, "system", "You are helpful.", pytest.approx(1714557600.0)),  # one second before the first known
        (2, "user", "What is\nWAL mode?", 1714557700.0),
        (3, "assistant", "Write-ahead logging.", 1714557701.0)]
    row = db.execute("select user, status, source, started, ended, metadata from sessions where id = ?",
                     [sid]).fetchone()
    assert row[:3] == ("alice", "ended", f"import:{src}")
    assert (row[3], row[4]) == (1714557699.0, 1714557701.0)
    assert json.loads(row[5]) == {"format": "openai", "external_id": "chatcmpl-1"}

    report = ingest(db, share)
    assert len(report.session_ids) == 2
    assert [r[1:3] for r in messages(db, report.session_ids[0])] == [
        ("system", "Be terse."), ("user", "ping"), ("assistant", "pong"), ("tool", "ok")]
    # no timestamps at all: spaced one second apart, ending at the job's now
    assert [r[3] for r in messages(db, report.session_ids[1])] == [NOW.timestamp() - 1, NOW.timestamp()]

    report = ingest(db, mine)
    assert report.session_ids == ["sess-42"]
    assert db.execute("select user, ended, metadata from sessions where id = 'sess-42'").fetchone() == (
        "bob", 1714608600.0, '{"client": "cli"}')
    assert messages(db, "sess-42") == [(1, "user", "hello", 1714608000.0), (2, "assistant", "hi", 1714608005.5)]
    assert db.execute("select metadata from messages where session_id = 'sess-42' and seq = 1").fetchone() == (
        '{"k": 1}',)
    assert counts(db)["counters"] and dict(db.execute("select name, value from counters").fetchall()) == {
        "sessions": 4, "messages": 11}


def test_reingest_even_reformatted_or_converted_adds_nothing(db, milton_home):
    jsonl(milton_home / "a.jsonl", [openai("How do I  list\nfiles?", "Use ls."), openai("x?", "y.")])
    assert len(ingest(db, milton_home / "a.jsonl").session_ids) == 2
    before = counts(db)
    # the same conversations: whitespace changed, then converted to ShareGPT
    jsonl(milton_home / "b.jsonl", [openai("  How do I list files? ", "Use   ls.")])
    (milton_home / "c.json").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "x?"}, {"from": "gpt", "value": "y."}]}))
    for name in ("a.jsonl", "b.jsonl", "c.json"):
        report = ingest(db, milton_home / name)
        assert report.session_ids == [] and report.files[0].duplicates >= 1
    assert counts(db) == before


def test_stdin_is_sniffed(db, monkeypatch):
    data = json.dumps(openai("from stdin", "yes")).encode() + b"\n" + json.dumps(openai("two", "2")).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    report = ingest(db, "-")
    assert report.files[0].source == "<stdin>" and len(report.session_ids) == 2


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("record, needles", [
    ([1, 2], ["expected a JSON object, got a list"]),
    ({"text": "hi"}, ["no messages"]),
    ({"messages": []}, ["no messages"]),
    ({"messages": "hi"}, ["'messages': expected a list"]),
    (openai("ok", "fine") | {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     ["messages[1]", "unknown role 'robot'"]),
    ({"conversations": [{"from": "bard", "value": "x"}]}, ["conversations[0]", "unknown role 'bard'", "human"]),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  \n"}]},
     ["messages[1]: empty content"]),
    ({"messages": [{"role": "user", "content": {"x": 1}}]}, ["messages[0]: content must be"]),
    ({"messages": [{"role": "user", "content": "a", "timestamp": "yesterday"}]},
     ["messages[0].ts: bad timestamp 'yesterday'"]),
    (openai("a", "b", timestamp=-5), ["timestamp: bad timestamp"]),
    ({"milton_session": 1, "id": "../../etc/passwd", "messages": [{"role": "user", "content": "a"}]},
     ["id: expected letters"]),
])
def test_record_reasons(record, needles):
    with pytest.raises(RecordError) as info:
        parse_record(record, max_chars=100_000, now=NOW.timestamp())
    for needle in needles:
        assert needle in str(info.value)


def test_tool_only_assistant_turns_are_described_not_rejected():
    conv = parse_record({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "12C", "tool_call_id": "c1"}]}, max_chars=1000, now=NOW.timestamp())
    assert conv.messages[1].content == '[tool call] get_weather({"city": "Oslo"})'
    assert conv.messages[2].metadata == {"tool_call_id": "c1"}


def test_bad_records_are_listed_and_good_ones_kept(db, milton_home):
    big = "x" * 1_000_000
    src = milton_home / "mixed.jsonl"
    src.write_bytes(b"\n".join([
        json.dumps(openai("good one", "answer")).encode(),
        b'{"messages": [',
        json.dumps({"messages": [{"role": "wizard", "content": "abracadabra"}]}).encode(),
        json.dumps(openai("hi", "")).encode(),
        json.dumps(openai("q", big)).encode(),
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
        b"",
        json.dumps(openai("good two", "answer")).encode(),
    ]) + b"\n")
    report = ingest(db, src)
    assert len(report.session_ids) == 2
    assert report.files[0].rejected == [
        (2, "invalid JSON: Expecting value (column 15)"),
        (3, "messages[0]: unknown role 'wizard' (expected system, user, assistant, tool, developer, function)"),
        (4, "messages[1]: empty content"),
        (5, "messages[1]: 1000000 characters, longer than memory.max_message_chars (100000)"),
        (6, "not UTF-8 (byte 46)"),
    ]


def test_json_list_reports_the_line_of_each_record(db, milton_home):
    src = milton_home / "list.json"
    src.write_text(json.dumps([openai("fine", "ok"), {"messages": [{"role": "user", "content": ""}]},
                               openai("also fine", "ok")], indent=2))
    report = ingest(db, src)
    line = [n for n, text in enumerate(src.read_text().splitlines(), 1) if text == "  {"][1]  # 2nd record
    assert report.files[0].rejected == [(line, "messages[0]: empty content")]
    assert len(report.session_ids) == 2
    broken = milton_home / "broken.json"
    broken.write_text('[\n  {"messages": []},\n  {oops}\n]')
    with pytest.raises(InputError, match=r"broken.json:3: invalid JSON: Expecting property name"):
        ingest(db, broken)
    latin = milton_home / "latin.json"
    latin.write_bytes(b'{"messages": [\n{"role": "user", "content": "\xe9"}]}')
    with pytest.raises(InputError, match=r"latin.json:2: not UTF-8 \(byte 29\)"):
        ingest(db, latin)


def test_strict_and_failures_leave_nothing_written(db, milton_home):
    jsonl(milton_home / "seed.jsonl", [openai("seed", "row")])
    ingest(db, milton_home / "seed.jsonl")
    before = counts(db)
    src = jsonl(milton_home / "one-bad.jsonl", [openai("a", "b"), openai("c", "d"), "{nope"])
    with pytest.raises(RejectedInput, match=r"one-bad.jsonl:3: invalid JSON.*--strict: nothing ingested"):
        ingest(db, src, strict=True)
    assert counts(db) == before
    bad = jsonl(milton_home / "all-bad.jsonl", ["[]", {"messages": [{"role": "x", "content": "y"}]}])
    with pytest.raises(RejectedInput) as info:
        ingest(db, bad)
    assert str(info.value).startswith(f"{bad}:1: expected a JSON object, got a list (all 2 record(s) rejected")
    assert info.value.rejected == [(str(bad), 2, "messages[0]: unknown role 'x' (expected system, user, "
                                                  "assistant, tool, developer, function)")]
    (milton_home / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="empty, no conversations"):
        ingest(db, milton_home / "empty.jsonl")
    with pytest.raises(InputError, match="no such file"):
        ingest(db, milton_home / "missing.jsonl")
    assert counts(db) == before


# -- export round trip -----------------------------------------------------------------------
def test_export_reingest_round_trip(db, embedder, milton_home, tmp_path):
    jsonl(milton_home / "a.jsonl", [openai("How do I vacuum sqlite?", "Run VACUUM.", user="ann"),
                                    {"conversations": [{"from": "human", "value": "tabs or spaces"},
                                                       {"from": "gpt", "value": "spaces"}]}])
    ingest(db, milton_home / "a.jsonl")
    process_sessions(db, embedder, pending_sessions(db), NOW, milton_home / "logs")
    out = io.StringIO()
    assert export_sessions(db, out) == 2
    (milton_home / "export.jsonl").write_text(out.getvalue())

    before = counts(db)
    report = ingest(db, milton_home / "export.jsonl")
    assert report.session_ids == [] and report.files[0].duplicates == 2
    assert counts(db) == before

    other = open_store(tmp_path / "other.db")
    try:
        report = ingest(other, milton_home / "export.jsonl")
        assert len(report.session_ids) == 2
        again = io.StringIO()
        export_sessions(other, again)

        def strip(text: str) -> list[dict]:
            return [{k: r[k] for k in ("id", "user", "started", "ended", "messages")}
                    for r in map(json.loads, text.splitlines())]

        assert strip(again.getvalue()) == strip(out.getvalue())
        assert ingest(other, milton_home / "export.jsonl").files[0].duplicates == 2
    finally:
        other.close()


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_directory_of_mixed_files(cli, milton_home):
    folder = milton_home / "chats"
    (folder / "nested").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    jsonl(folder / "good.jsonl", [openai("How do I undo a git commit?", "git reset --soft HEAD~1"),
                                  openai("Explain docker volumes in detail", "Volumes persist data.")])
    jsonl(folder / "bad.jsonl", ["{broken", {"messages": [{"role": "user", "content": "   "}]}])
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "nested" / "list.json").write_text(json.dumps(
        [openai("Rust lifetimes?", "They bound references."), {"messages": [{"role": "alien", "content": "x"}]}],
        indent=1))
    jsonl(folder / ".hidden" / "secret.jsonl", [openai("hidden", "never read")])
    rc, out, err = cli("ingest", "conversations", str(folder), "--now", "2024-06-01T12:00:00Z")
    assert rc == 0, err
    assert f"{folder}/bad.jsonl:1: invalid JSON: Expecting property name enclosed in double quotes (column 2)" in err
    assert f"{folder}/bad.jsonl:2: messages[0]: empty content" in err
    assert f"{folder}/nested/list.json:14: messages[0]: unknown role 'alien'" in err
    assert f"{folder}/picture.png: skipped: not a .jsonl/.ndjson/.json file" in err
    assert "secret" not in err + out and "Traceback" not in err
    conn = sqlite3.connect(milton_home / "data" / "milton.db")
    try:
        assert conn.execute("select status, count(*) from sessions group by status").fetchall() == [("processed", 3)]
        assert conn.execute("select count(*) from memories where tier = 'short' and category = 'exchange'"
                            ).fetchone() == (3,)
        status, metrics = conn.execute("select status, metrics from job_runs").fetchone()
    finally:
        conn.close()
    metrics = json.loads(metrics)
    assert status == "ok" and metrics["sessions"] == 3 and metrics["rejected"] == 3
    assert metrics["processed"] == 3 and len(metrics["rejected_rows"]) == 3

    # a directory where nothing at all can be ingested: exit 2, reasons listed, one-line error
    empty = milton_home / "junk"
    empty.mkdir()
    jsonl(empty / "x.jsonl", ["nope"])
    (empty / "y.txt").write_text("hello")
    rc, out, err = cli("ingest", "conversations", str(empty))
    assert rc == 2
    assert f"{empty}/x.jsonl:1: invalid JSON" in err
    assert_clean_error(err, f"{empty}: nothing ingested (1 record(s) rejected in 1 file(s))")


def test_cli_single_file_all_rejected_and_strict(cli, milton_home, db_rows):
    src = jsonl(milton_home / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}, "[1]"])
    rc, out, err = cli("ingest", "conversations", str(src))
    assert rc == 2
    assert f"{src}:2: expected a JSON object, got a list" in err
    assert_clean_error(err, f"{src}:1: messages[0]: unknown role 'bot'", "all 2 record(s) rejected")
    src = jsonl(milton_home / "strict.jsonl", [openai("fine", "ok"), {"messages": []}])
    rc, out, err = cli("ingest", "conversations", str(src), "--strict")
    assert rc == 2
    assert_clean_error(err, f"{src}:2: no messages", "--strict: nothing ingested")
    assert db_rows("sessions") == 0 and db_rows("messages") == 0
