"""Session tracking and processing: idle timeout (injected clock), exchanges into short-term
memory, topics, preferences with evidence, per-session logs, idempotence, export, CLI."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest

from milton.core.config import MemoryConfig, load_settings
from milton.core.errors import InputError
from milton.core.jobs import run_job
from milton.memory.jobs import end_idle_sessions_job
from milton.memory.memories import normalize_tags
from milton.memory.search import search
from milton.memory.sessions import SessionTracker, build_exchanges, process_session
from milton.memory.topics import detect_preferences, extract_topics

T0 = datetime(2024, 6, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(memory_db):
    return memory_db


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def tracker(db, embedder, clock, milton_home) -> SessionTracker:
    config = MemoryConfig(session_idle_minutes=30, max_message_chars=1000)
    return SessionTracker(db, embedder, config, milton_home / "data" / "logs", clock=clock)


def status(db, session_id: str) -> str:
    return db.execute("select status from sessions where id = ?", [session_id]).fetchone()[0]


def test_idle_timeout_ends_and_processes_the_session(tracker, db, clock, embedder, milton_home):
    first = tracker.session_for_user("alice")
    assert tracker.session_for_user("alice") == first  # one open session per user
    tracker.log_message("system", "You are a helpful assistant.", session_id=first)
    user_msg = tracker.log_message("user", "How do I make a git rebase interactive? Keep it short, briefly.",
                                   session_id=first)
    clock.advance(seconds=20)
    reply = tracker.log_message("assistant", "Run `git rebase -i HEAD~3` and edit the todo list.",
                                session_id=first)
    clock.advance(minutes=5)
    second_q = tracker.log_message("user", "And how do I squash commits with git rebase? Show me an example.",
                                   session_id=first)
    tracker.log_message("assistant", "Mark them `squash` in the rebase todo:\n```bash\ngit rebase -i main\n```",
                        session_id=first)
    assert status(db, first) == "open"
    assert db.execute("select count(*) from memories").fetchone() == (0,)

    clock.advance(minutes=31)
    later = tracker.log_message("user", "Unrelated: what is a docker volume?", session_id=first)
    second = tracker.message_session(later)
    assert second != first and status(db, second) == "open" and status(db, first) == "processed"
    assert db.execute("select user from sessions where id = ?", [second]).fetchone() == ("alice",)
    assert tracker.session_for_user("alice") == second

    rows = db.execute("select content, category, source_messages, created, tags, session_id from memories "
                      "where tier = 'short' order by created").fetchall()
    assert [r[0] for r in rows] == [
        "User: How do I make a git rebase interactive? Keep it short, briefly.\n"
        "Assistant: Run `git rebase -i HEAD~3` and edit the todo list.",
        "User: And how do I squash commits with git rebase? Show me an example.\n"
        "Assistant: Mark them `squash` in the rebase todo:\n```bash\ngit rebase -i main\n```",
    ]
    assert all(r[1] == "exchange" and r[5] == first for r in rows)
    assert json.loads(rows[0][2]) == [user_msg, reply]
    assert rows[0][3] == (T0).timestamp() and rows[1][3] == (T0 + timedelta(seconds=20, minutes=5)).timestamp()
    assert json.loads(rows[1][2])[0] == second_q

    topics = json.loads(db.execute("select topics from sessions where id = ?", [first]).fetchone()[0])
    assert topics[:2] == ["git", "git rebase"]
    assert json.loads(rows[0][4]) == normalize_tags(topics)  # the exchanges are tagged with them
    prefs = {(k, v): (e, s) for k, v, e, s in db.execute(
        "select key, value, evidence, sessions from preferences")}
    assert prefs == {("response_style", "concise"): (2, 1), ("tool", "git"): (2, 1),
                     ("code_examples", "prefers"): (1, 1), ("language", "bash"): (1, 1)}

    log = json.loads((milton_home / "data" / "logs" / "sessions" / f"{first}.json").read_text())
    assert log["session_id"] == first and log["messages"] == 5 and log["exchanges"] == 2
    assert log["memory_ids"] == [r[0] for r in db.execute("select id from memories order by created")]
    assert log["topics"] == topics and {"key": "tool", "value": "git", "evidence": 2} in log["preferences"]
    assert log["duration_s"] >= 0 and log["user"] == "alice"
    master = [json.loads(line) for line in (milton_home / "data" / "logs" / "jobs.jsonl").read_text().splitlines()]
    assert [(m["job"], m["session_id"], m["status"]) for m in master] == [("session", first, "ok")]
    assert dict(db.execute("select name, value from counters").fetchall()) == {
        "sessions": 2, "messages": 6, "memories": 2}

    hits = search(db, embedder, "squash commits in a rebase", MemoryConfig(), clock(), k=3, tier="short")
    assert hits and hits[0].memory.session_id == first and "squash" in hits[0].memory.content

    # idempotent: processing again changes nothing
    assert process_session(db, embedder, first, clock(), milton_home / "data" / "logs") is None
    assert db.execute("select count(*) from memories").fetchone() == (2,)
    assert db.execute("select sum(evidence) from preferences").fetchone() == (6,)


def test_expire_idle_picks_up_sessions_left_by_a_crashed_process(db, embedder, clock, milton_home):
    config = MemoryConfig(session_idle_minutes=10)
    logs = milton_home / "data" / "logs"
    crashed = SessionTracker(db, embedder, config, logs, clock=clock)
    sid = crashed.start_session(user="bob", metadata={"client": "tui"})
    crashed.log_message("user", "Explain systemd timers step by step, in detail.")
    crashed.log_message("assistant", "A timer unit activates a service unit.")
    del crashed  # the process died: the session stays open in the store

    fresh = SessionTracker(db, embedder, config, logs, clock=clock)
    assert fresh.expire_idle() == []  # not idle yet
    clock.advance(minutes=11)
    assert fresh.expire_idle() == [sid]
    assert status(db, sid) == "processed"
    assert db.execute("select ended from sessions where id = ?", [sid]).fetchone()[0] == T0.timestamp()
    assert db.execute("select evidence from preferences where key = 'response_style' and value = 'detailed'"
                      ).fetchone() == (2,)
    assert fresh.expire_idle() == []


def test_preference_evidence_accumulates_across_sessions(tracker, db, clock):
    for n in range(3):
        tracker.start_session(user="carol")
        tracker.log_message("user", f"Write a python function number {n}, tl;dr please")
        tracker.log_message("assistant", "```python\ndef f():\n    return 1\n```")
        clock.advance(minutes=1)
        tracker.end_session()
    rows = dict(((k, v), (e, s)) for k, v, e, s in db.execute(
        "select key, value, evidence, sessions from preferences"))
    assert rows[("language", "python")] == (6, 3)  # a mention and a fence tag per session
    assert rows[("response_style", "concise")] == (3, 3)
    first, last = db.execute("select first_seen, last_seen from preferences where value = 'python'").fetchone()
    assert last - first == pytest.approx(120.0)


def test_log_message_validates_and_writes_nothing_on_error(tracker, db):
    sid = tracker.start_session()
    for role, content, needle in [("robot", "hi", "unknown role 'robot'"), ("user", " \n", "empty content"),
                                  ("user", "x" * 1001, "1001 characters, longer than memory.max_message_chars")]:
        with pytest.raises(InputError, match=needle):
            tracker.log_message(role, content, session_id=sid)
    with pytest.raises(InputError, match="no such session"):
        tracker.log_message("user", "hi", session_id="nope")
    assert db.execute("select count(*) from messages").fetchone() == (0,)


def test_tracker_is_thread_safe(tracker, db):
    errors: list[BaseException] = []

    def worker(user: str) -> None:
        try:
            for i in range(15):
                sid = tracker.session_for_user(user)
                tracker.log_message("user" if i % 2 == 0 else "assistant", f"{user} says {i}", session_id=sid)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"u{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    per_session = db.execute("select s.user, count(*), max(m.seq) from messages m join sessions s "
                             "on s.id = m.session_id group by s.id order by s.user").fetchall()
    assert per_session == [(f"u{n}", 15, 15) for n in range(6)]


def test_end_idle_job_under_the_runner(db, embedder, milton_home):
    settings = load_settings().settings
    tracker = SessionTracker(db, embedder, settings.memory, settings.logs_dir, clock=lambda: T0)
    sid = tracker.start_session(user="dan")
    tracker.log_message("user", "How do I index a postgres table?")
    result = run_job("sessions-end-idle", end_idle_sessions_job, settings, now=T0 + timedelta(hours=2))
    assert result.status == "ok" and result.metrics["ended"] == 1 and result.metrics["processed"] == 1
    assert status(db, sid) == "processed"


def test_export_and_show_via_cli(cli, tracker, db, clock, milton_home):
    sid = tracker.start_session(user="eve", metadata={"client": "web"})
    tracker.log_message("user", "What does `set -euo pipefail` do in bash?")
    tracker.log_message("assistant", "Exit on errors, unset variables and failed pipes.")
    tracker.end_session()
    clock.advance(minutes=1)
    open_sid = tracker.start_session(user="frank")
    tracker.log_message("user", "still typing")
    rc, out, err = cli("sessions", "list", "--json")
    assert rc == 0, err
    listed = {r["id"]: r for r in json.loads(out)}
    assert listed[sid]["status"] == "processed" and listed[sid]["messages"] == 2
    assert listed[open_sid]["status"] == "open" and "bash" in listed[sid]["topics"]
    rc, out, err = cli("sessions", "show", sid, "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]
    assert shown["metadata"] == {"client": "web"} and shown["user"] == "eve"
    rc, out, err = cli("sessions", "export", "--out", str(milton_home / "all.jsonl"))
    assert rc == 0, err
    records = [json.loads(line) for line in (milton_home / "all.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [sid, open_sid] and records[0]["milton_session"] == 1
    rc, out, err = cli("sessions", "show", "missing")
    assert rc == 2 and "session missing: no such session" in err


# -- the pure parts --------------------------------------------------------------------------
def test_exchanges_skip_system_and_keep_lone_messages():
    rows = [(1, "system", "sys", 1.0), (2, "assistant", "Welcome!", 2.0), (3, "user", "q1", 3.0),
            (4, "user", "q2", 4.0), (5, "assistant", "a2", 5.0), (6, "tool", "out", 6.0),
            (7, "assistant", "a2b", 7.0)]
    got = [(e.message_ids, e.ts, e.text) for e in build_exchanges(rows)]
    assert got == [([2], 2.0, "Assistant: Welcome!"), ([3], 3.0, "User: q1"),
                   ([4, 5, 6, 7], 4.0, "User: q2\nAssistant: a2\nTool: out\nAssistant: a2b")]


def test_topics_and_preferences_are_deterministic():
    texts = ["How do I set up an nginx reverse proxy?", "The reverse proxy passes requests to uvicorn.",
             "```nginx\nserver { listen 80; }\n```"]
    topics = extract_topics(texts)
    assert topics == extract_topics(reversed(texts))  # order-independent, ties broken by name
    assert topics[:2] == ["nginx", "reverse proxy"]  # known terms (the fence tag too) are boosted
    assert "listen" not in topics and "server" not in topics  # code is not prose
    found = detect_preferences([
        ("user", "Give me a detailed, step-by-step answer with code examples in Rust and golang. "
                 "I use vs code, kubectl and Postgres."),
        ("assistant", "Sure, in detail:\n```rust\nfn main() {}\n```\n```ts\nlet x = 1\n```"),
        ("user", "For example, what does `#` do? Short answer please."),
    ])
    assert found == {("response_style", "detailed"): 2, ("response_style", "concise"): 1,
                     ("code_examples", "prefers"): 1, ("language", "rust"): 2, ("language", "go"): 1,
                     ("language", "typescript"): 1, ("tool", "vscode"): 1, ("tool", "kubernetes"): 1,
                     ("tool", "postgres"): 1}


def test_embedding_runs_outside_the_tracker_lock(db, embedder, clock, milton_home):
    """While one thread's ended session is being embedded, other users can keep talking."""
    started, release = threading.Event(), threading.Event()

    class Slow:
        name, dim = embedder.name, embedder.dim

        def encode(self, texts, *, progress=False):
            started.set()
            assert release.wait(10)
            return embedder.encode(texts)

    tracker = SessionTracker(db, Slow(), MemoryConfig(), milton_home / "logs", clock=clock)
    sid = tracker.start_session(user="a")
    tracker.log_message("user", "first question", session_id=sid)
    ender = threading.Thread(target=tracker.end_session, args=(sid,))
    ender.start()
    assert started.wait(10)
    other = tracker.session_for_user("b")  # would deadlock-wait if the lock were held while embedding
    tracker.log_message("user", "meanwhile", session_id=other)
    release.set()
    ender.join(10)
    assert status(db, sid) == "processed" and status(db, other) == "open"
