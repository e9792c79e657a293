"""Conversation sessions: live tracking and processing into memory.

A session is one run of messages with one user. Every raw message is kept in ``messages``
(training data); when a session ends (explicitly, idle past ``memory.session_idle_minutes``, or
imported) :func:`process_sessions` turns it into short-term memories (one per exchange), topics
and preference evidence. Embedding happens first; the inserts and the switch to 'processed' are
then one transaction, so a crash leaves the session 'ended' and the next run finishes it, and a
session is never processed twice. Topics and preferences come from :mod:`milton.memory.topics`;
:mod:`milton.memory.export` writes sessions out again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.config import MemoryConfig
from milton.core.errors import InputError
from milton.core.jobs import append_master_log
from milton.core.timeutil import iso, utcnow
from milton.memory.embed import Embedder
from milton.memory.memories import NewMemory, add_prepared, bump, new_texts
from milton.memory.topics import (
    TOP_TOPICS,
    detect_preferences,
    extract_topics,
    upsert_preferences,
)

log = logging.getLogger("milton.sessions")

ROLES = ("system", "user", "assistant", "tool")
LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}
EXCHANGE_PART_CHARS = 2000  # per message in an exchange memory; the raw text stays in messages
PROCESS_BATCH = 200  # sessions embedded together (bounded memory on big imports)


# -- validation and identity ---------------------------------------------------------------
def message_problem(role: Any, content: Any, max_chars: int) -> str | None:
    """Why a message cannot be stored, or None. Shared by the tracker and file ingest."""
    if role not in ROLES:
        return f"unknown role {role!r} (expected {', '.join(ROLES)})"
    if not isinstance(content, str):
        return f"content must be text, got {type(content).__name__}"
    if not content.strip():
        return "empty content"
    if len(content) > max_chars:
        return f"{len(content)} characters, longer than memory.max_message_chars ({max_chars})"
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: SQLite and hashing would fail on it later
        return "a lone surrogate (e.g. \\ud800) is not valid Unicode"
    return None


def conversation_hash(messages: Iterable[tuple[str, str]]) -> str:
    """Over the (role, whitespace-normalised content) list: a reformatted copy hashes the same."""
    normal = [[role, " ".join(content.split())] for role, content in messages]
    return hashlib.sha256(json.dumps(normal, ensure_ascii=False, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


@dataclass
class MessageIn:
    role: str
    content: str
    ts: float
    metadata: dict[str, Any] | None = None


def insert_session(db: sqlite_utils.Database, *, session_id: str, user: str | None, source: str,
                   messages: Sequence[MessageIn], status: str, digest: str | None = None,
                   metadata: dict[str, Any] | None = None, ended: float | None = None,
                   started: float | None = None) -> None:
    """Insert a session and its messages (the caller holds the transaction)."""
    times = [m.ts for m in messages]
    first = started if started is not None else (min(times) if times else 0.0)
    last = max(times) if times else first
    db.conn.execute(
        "insert into sessions (id, user, source, started, last_activity, ended, status, content_hash, "
        "metadata) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (session_id, user, source, first, last, ended, status, digest,
         json.dumps(metadata, ensure_ascii=False) if metadata else None))
    db.conn.executemany(
        "insert into messages (session_id, seq, role, content, ts, metadata) values (?, ?, ?, ?, ?, ?)",
        [(session_id, seq, m.role, m.content, m.ts,
          json.dumps(m.metadata, ensure_ascii=False) if m.metadata else None)
         for seq, m in enumerate(messages, start=1)])
    bump(db, "sessions")
    bump(db, "messages", len(messages))


def end_session(db: sqlite_utils.Database, session_id: str, ended: float) -> bool:
    """Mark an open session ended (True), recording its content hash when no other session has it."""
    with db.atomic():
        row = db.execute("select status from sessions where id = ?", [session_id]).fetchone()
        if row is None:
            raise InputError(f"session {session_id}: no such session")
        if row[0] != "open":
            return False
        pairs = db.execute("select role, content from messages where session_id = ? order by seq",
                           [session_id]).fetchall()
        digest = conversation_hash(pairs) if pairs else None
        if digest and db.execute("select 1 from sessions where content_hash = ?", [digest]).fetchone():
            digest = None  # the same conversation twice: both kept, only one carries the hash
        db.conn.execute("update sessions set status = 'ended', ended = ?, content_hash = ? where id = ?",
                        (ended, digest, session_id))
    return True


def expire_idle_sessions(db: sqlite_utils.Database, idle_minutes: float, now: datetime) -> list[str]:
    """End every open session idle past the timeout (also ones a crashed process left open)."""
    cutoff = now.timestamp() - idle_minutes * 60
    rows = db.execute("select id, last_activity from sessions where status = 'open' and "
                      "last_activity < ? order by last_activity", [cutoff]).fetchall()
    return [sid for sid, last in rows if end_session(db, sid, last)]


def pending_sessions(db: sqlite_utils.Database) -> list[str]:
    """Ended but not yet processed (processing failed or the process died meanwhile)."""
    return [r[0] for r in db.execute(
        "select id from sessions where status = 'ended' order by last_activity, id")]


# -- processing ------------------------------------------------------------------------------
@dataclass
class Exchange:
    message_ids: list[int]
    ts: float
    text: str


def build_exchanges(rows: Iterable[tuple[int, str, str, float]]) -> list[Exchange]:
    """Each user message with the replies after it; system messages skipped, lone messages kept."""
    groups: list[list[tuple[int, str, str, float]]] = []
    for row in rows:
        if row[1] == "system":
            continue
        if row[1] == "user" or not groups:
            groups.append([row])
        else:
            groups[-1].append(row)

    def clip(text: str) -> str:
        text = text.strip()
        return text if len(text) <= EXCHANGE_PART_CHARS else text[:EXCHANGE_PART_CHARS].rstrip() + " …"

    return [Exchange([r[0] for r in g], g[0][3], "\n".join(f"{LABELS[r[1]]}: {clip(r[2])}" for r in g))
            for g in groups]


@dataclass
class SessionSummary:
    """What processing one session did; written to ``logs/sessions/<id>.json``."""

    session_id: str
    user: str | None
    source: str
    started: str | None
    ended: str | None
    messages: int
    exchanges: int
    memories_added: int
    memory_ids: list[int]
    duplicates: int
    topics: list[str]
    preferences: list[dict[str, Any]]
    processed_at: str | None
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plan:
    session_id: str
    user: str | None
    source: str
    started: float
    last: float
    ended: float | None
    messages: int
    exchanges: list[Exchange]
    topics: list[str]
    preferences: dict[tuple[str, str], int]
    items: list[NewMemory] = field(default_factory=list)


def _plan(db: sqlite_utils.Database, session_id: str) -> _Plan | None:
    row = db.execute("select user, source, started, last_activity, ended, status from sessions "
                     "where id = ?", [session_id]).fetchone()
    if row is None:
        raise InputError(f"session {session_id}: no such session")
    user, source, started, last, ended, status = row
    if status == "open":
        raise InputError(f"session {session_id}: still open; end it first")
    if status == "processed":
        return None
    rows = db.execute("select id, role, content, ts from messages where session_id = ? order by seq",
                      [session_id]).fetchall()
    exchanges = build_exchanges(rows)
    topics = extract_topics(r[2] for r in rows if r[1] != "system")
    plan = _Plan(session_id, user, source, started, last, ended, len(rows), exchanges, topics,
                 detect_preferences([(r[1], r[2]) for r in rows]))
    plan.items = [NewMemory(content=e.text, tier="short", category="exchange", session_id=session_id,
                            source_messages=e.message_ids, created=e.ts, tags=topics[:TOP_TOPICS])
                  for e in exchanges]
    return plan


def _write_logs(logs_dir: Path, summary: SessionSummary, now: datetime, started: datetime) -> None:
    folder = logs_dir / "sessions"
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", summary.session_id)
    target = folder / f"{name}.json"
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(summary.as_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)  # readers never see a half-written log
    metrics = {k: v for k, v in summary.as_dict().items()
               if k not in ("memory_ids", "session_id", "processed_at", "duration_s")}
    append_master_log(logs_dir, {
        "job": "session", "run_id": None, "session_id": summary.session_id, "status": "ok",
        "started": iso(started), "finished": iso(utcnow()), "duration_s": summary.duration_s,
        "now": iso(now), "metrics": metrics, "error": None, "host": socket.gethostname(),
        "pid": os.getpid(),
    })


def process_sessions(db: sqlite_utils.Database, embedder: Embedder, session_ids: Sequence[str],
                     now: datetime, logs_dir: Path, *, lock: AbstractContextManager | None = None,
                     progress: bool = False) -> list[SessionSummary]:
    """Process ended sessions (already processed ones are skipped); summaries of those done.

    ``lock`` guards every use of ``db`` (the tracker shares one connection across threads);
    embedding runs outside it.
    """
    guard = lock if lock is not None else nullcontext()
    done: list[SessionSummary] = []
    for start in range(0, len(session_ids), PROCESS_BATCH):
        t0 = time.monotonic()
        with guard:
            plans = [p for p in (_plan(db, sid) for sid in session_ids[start:start + PROCESS_BATCH]) if p]
            todo = new_texts(db, [i for p in plans for i in p.items])
        if not plans:
            continue
        vectors = dict(zip(todo, embedder.encode(list(todo.values()), progress=progress)))  # unlocked
        per_session = (time.monotonic() - t0) / len(plans)
        for plan in plans:
            t1, wall = time.monotonic(), utcnow()
            with guard, db.atomic():
                status = db.execute("select status from sessions where id = ?", [plan.session_id]).fetchone()
                if status is None or status[0] != "ended":
                    continue  # processed (or deleted) by someone else meanwhile
                ids = add_prepared(db, embedder, plan.items, vectors, now)
                upsert_preferences(db, plan.preferences, plan.ended or plan.last)
                db.conn.execute("update sessions set status = 'processed', topics = ? where id = ?",
                                (json.dumps(plan.topics), plan.session_id))
            added = [i for i in ids if i is not None]
            summary = SessionSummary(
                session_id=plan.session_id, user=plan.user, source=plan.source,
                started=iso(plan.started), ended=iso(plan.ended), messages=plan.messages,
                exchanges=len(plan.exchanges), memories_added=len(added), memory_ids=added,
                duplicates=len(ids) - len(added), topics=plan.topics,
                preferences=[{"key": k, "value": v, "evidence": n}
                             for (k, v), n in sorted(plan.preferences.items())],
                processed_at=iso(now), duration_s=round(per_session + time.monotonic() - t1, 4))
            try:
                _write_logs(logs_dir, summary, now, wall)
            except OSError as exc:  # the store is the record; a full disk must not undo it
                log.warning("session %s: cannot write its log: %s", plan.session_id, exc)
            done.append(summary)
    return done


def process_session(db: sqlite_utils.Database, embedder: Embedder, session_id: str, now: datetime,
                    logs_dir: Path, *, lock: AbstractContextManager | None = None) -> SessionSummary | None:
    """Process one ended session; None when it was already processed (idempotent)."""
    done = process_sessions(db, embedder, [session_id], now, logs_dir, lock=lock)
    return done[0] if done else None


# -- the live tracker --------------------------------------------------------------------------
class SessionTracker:
    """Sessions for a running process (serve): one open session per user key, idle timeout.

    Thread-safe: every use of ``db`` happens under one lock; embedding (processing an ended
    session) runs outside it. Give the tracker its own connection if other threads write on the
    same one. Processing failures are logged and leave the session 'ended' for the next
    :meth:`expire_idle` (or ``milton sessions end-idle``) to retry.
    """

    def __init__(self, db: sqlite_utils.Database, embedder: Embedder, config: MemoryConfig,
                 logs_dir: Path, clock: Callable[[], datetime] = utcnow, *, source: str = "live") -> None:
        self.db, self.embedder, self.config, self.logs_dir = db, embedder, config, Path(logs_dir)
        self.clock, self.source = clock, source
        self._lock = threading.RLock()
        self._current: str | None = None

    @property
    def idle_seconds(self) -> float:
        return self.config.session_idle_minutes * 60

    def start_session(self, user: str | None = None, metadata: dict[str, Any] | None = None) -> str:
        with self._lock:
            return self._start(user, metadata)

    def _start(self, user: str | None, metadata: dict[str, Any] | None) -> str:
        session_id = str(uuid.uuid4())
        ts = self.clock().timestamp()
        with self.db.atomic():
            insert_session(self.db, session_id=session_id, user=user, source=self.source, messages=[],
                           status="open", metadata=metadata, started=ts)
        self._current = session_id
        return session_id

    def session_for_user(self, user: str | None) -> str:
        """The user's open session (continued across restarts), or a new one if none or idle."""
        stale: list[str] = []
        with self._lock:
            row = self.db.execute(
                "select id, last_activity, metadata from sessions where status = 'open' and user is ? "
                "order by last_activity desc limit 1", [user]).fetchone()
            if row is not None and self.clock().timestamp() - row[1] <= self.idle_seconds:
                session_id = row[0]
            else:
                metadata = None
                if row is not None:
                    end_session(self.db, row[0], row[1])
                    stale.append(row[0])
                    metadata = json.loads(row[2]) if row[2] else None
                session_id = self._start(user, metadata)
        self._process(stale)
        return session_id

    def log_message(self, role: str, content: str, metadata: dict[str, Any] | None = None,
                    session_id: str | None = None) -> int:
        """Store one message; returns its ``messages.id``.

        ``session_id`` defaults to the session this tracker started or returned last (a new one
        for no user if none). If that session is idle past the timeout, or already ended, it is
        ended and processed and the message goes to a new session for the same user (same
        metadata); :meth:`message_session` tells which.
        """
        problem = message_problem(role, content, self.config.max_message_chars)
        if problem:
            raise InputError(f"message: {problem}")
        stale: list[str] = []
        with self._lock:
            sid = session_id or self._current
            if sid is None:
                sid = self._start(None, None)
            now = self.clock().timestamp()
            row = self.db.execute("select user, status, last_activity, metadata from sessions where id = ?",
                                  [sid]).fetchone()
            if row is None:
                raise InputError(f"session {sid}: no such session")
            user, status, last, meta = row
            if status != "open" or now - last > self.idle_seconds:
                if status == "open":
                    end_session(self.db, sid, last)
                stale.append(sid)
                sid = self._start(user, json.loads(meta) if meta else None)
            with self.db.atomic():
                seq = self.db.execute("select coalesce(max(seq), 0) + 1 from messages where session_id = ?",
                                      [sid]).fetchone()[0]
                cursor = self.db.conn.execute(
                    "insert into messages (session_id, seq, role, content, ts, metadata) values (?, ?, ?, ?, ?, ?)",
                    (sid, seq, role, content, now, json.dumps(metadata, ensure_ascii=False) if metadata else None))
                self.db.conn.execute("update sessions set last_activity = max(last_activity, ?) where id = ?",
                                     (now, sid))
                bump(self.db, "messages")
            self._current = sid
            message_id = int(cursor.lastrowid)
        self._process(stale)
        return message_id

    def message_session(self, message_id: int) -> str:
        with self._lock:
            row = self.db.execute("select session_id from messages where id = ?", [message_id]).fetchone()
        if row is None:
            raise InputError(f"message {message_id}: no such message")
        return row[0]

    def end_session(self, session_id: str | None = None) -> SessionSummary | None:
        """End and process a session (default: the current one); None if it was already processed."""
        with self._lock:
            sid = session_id or self._current
            if sid is None:
                raise InputError("no current session to end")
            end_session(self.db, sid, self.clock().timestamp())
            if sid == self._current:
                self._current = None
        done = self._process([sid], quiet=False)
        return done[0] if done else None

    def expire_idle(self, now: datetime | None = None) -> list[str]:
        """End and process every session idle past the timeout, and retry unprocessed ones;
        returns the ids ended or processed by this call."""
        now = now or self.clock()
        with self._lock:
            ended = expire_idle_sessions(self.db, self.config.session_idle_minutes, now)
            todo = pending_sessions(self.db)
            if self._current in ended:
                self._current = None
        done = self._process(todo)
        return list(dict.fromkeys([*ended, *(s.session_id for s in done)]))

    def _process(self, session_ids: Sequence[str], *, quiet: bool = True) -> list[SessionSummary]:
        if not session_ids:
            return []
        try:
            return process_sessions(self.db, self.embedder, list(session_ids), self.clock(),
                                    self.logs_dir, lock=self._lock)
        except Exception:
            if not quiet:
                raise
            log.exception("processing sessions %s failed; left 'ended' for a retry", list(session_ids))
            return []


def list_sessions(db: sqlite_utils.Database, limit: int = 20) -> list[dict[str, Any]]:
    """Sessions, most recently active first, with their message counts and topics."""
    return [{"id": r[0], "user": r[1], "source": r[2], "started": r[3], "last_activity": r[4],
             "status": r[5], "messages": r[6], "topics": json.loads(r[7]) if r[7] else []}
            for r in db.execute(
                "select s.id, s.user, s.source, s.started, s.last_activity, s.status, "
                "(select count(*) from messages m where m.session_id = s.id), s.topics "
                "from sessions s order by s.last_activity desc, s.id limit ?", [max(0, limit)])]
