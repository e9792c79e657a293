"""Memories in the one SQLite store: rows, their vectors, FTS (kept by triggers) and tasks.

Every write that adds text also adds its vector in the same transaction, so search never sees a
memory without one (except after a model change, until ``milton memory reembed``). Embedding is
done before the transaction opens: the write lock is held for milliseconds, not seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import sqlite_utils

from milton.core.errors import InputError
from milton.memory.embed import Embedder, to_blob

TIERS = ("short", "working", "long")
TASK_STATUSES = ("pending", "active", "blocked", "done", "cancelled")
COMPLETED = ("done", "cancelled")


def content_hash(text: str) -> str:
    """Whitespace-insensitive, so re-ingesting a reformatted copy adds nothing."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def normalize_tags(tags: Iterable[str] | None) -> list[str]:
    seen: dict[str, None] = {}
    for tag in tags or ():
        tag = re.sub(r"\s+", "-", str(tag).strip().lower())
        if tag:
            seen[tag] = None
    return list(seen)


@dataclass
class NewMemory:
    content: str
    tier: str = "long"
    category: str = "note"
    importance: float = 0.5
    tags: list[str] = field(default_factory=list)
    created: float | None = None  # epoch seconds; default: now
    session_id: str | None = None
    source: str | None = None
    source_messages: list[int] | None = None


@dataclass
class Memory:
    id: int
    tier: str
    category: str
    content: str
    importance: float
    tags: list[str]
    created: float
    last_accessed: float
    access_count: int
    session_id: str | None
    source: str | None
    source_messages: list[int] | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Memory:
        return cls(
            id=row["id"], tier=row["tier"], category=row["category"], content=row["content"],
            importance=row["importance"], tags=json.loads(row["tags"] or "[]"),
            created=row["created"], last_accessed=row["last_accessed"],
            access_count=row["access_count"], session_id=row["session_id"], source=row["source"],
            source_messages=json.loads(row["source_messages"]) if row["source_messages"] else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bump(db: sqlite_utils.Database, name: str, by: int = 1) -> None:
    """Add to a cumulative counter (call inside the writing transaction)."""
    if by:
        db.conn.execute(
            "insert into counters (name, value) values (?, ?) "
            "on conflict (name) do update set value = value + excluded.value",
            (name, by),
        )


def counters(db: sqlite_utils.Database) -> dict[str, int]:
    return {name: value for name, value in db.execute("select name, value from counters")}


def _validate(item: NewMemory) -> None:
    if item.tier not in TIERS:
        raise InputError(f"tier: expected one of {', '.join(TIERS)}, got {item.tier!r}")
    if not item.content or not item.content.strip():
        raise InputError("content: empty memory")
    if not 0.0 <= float(item.importance) <= 1.0:
        raise InputError(f"importance: expected 0..1, got {item.importance}")


def existing_hashes(db: sqlite_utils.Database, tier: str, hashes: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(hashes), 500):
        part = list(hashes[start:start + 500])
        marks = ",".join("?" * len(part))
        found.update(h for (h,) in db.execute(
            f"select content_hash from memories where tier = ? and content_hash in ({marks})",
            [tier, *part]))
    return found


def add_memories(
    db: sqlite_utils.Database,
    embedder: Embedder,
    items: Sequence[NewMemory],
    now: datetime,
    *,
    progress: bool = False,
    in_transaction: bool = False,
    vectors: np.ndarray | None = None,
) -> list[int | None]:
    """Insert memories with their vectors; a duplicate (same tier and text) gives None.

    With ``in_transaction`` the caller already holds a transaction; pass ``vectors`` (one row
    per item, from ``embedder.encode``) computed before it opened, so no encoding runs while
    the write lock is held. Otherwise the insert is one transaction of its own.
    """
    for item in items:
        _validate(item)
    hashes = [content_hash(item.content) for item in items]
    pending = new_texts(db, items)
    todo: list[int] = []  # first item of each (tier, hash) not stored yet
    for index, (item, digest) in enumerate(zip(items, hashes)):
        if pending.pop((item.tier, digest), None) is not None:
            todo.append(index)
    if vectors is not None:
        if len(vectors) != len(items):
            raise ValueError("vectors: one row per item expected")
        vectors = vectors[todo]
    else:
        vectors = embedder.encode([items[i].content for i in todo], progress=progress)
    ids: list[int | None] = [None] * len(items)
    ts_now = now.timestamp()

    def write() -> None:
        conn = db.conn
        added = 0
        for row, index in enumerate(todo):
            item = items[index]
            created = item.created if item.created is not None else ts_now
            cursor = conn.execute(
                "insert or ignore into memories (tier, category, content, importance, tags, created, "
                "last_accessed, session_id, source, source_messages, content_hash) "
                "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.tier, item.category, item.content.strip(), float(item.importance),
                 json.dumps(normalize_tags(item.tags)), created, created, item.session_id,
                 item.source,
                 json.dumps(item.source_messages) if item.source_messages is not None else None,
                 hashes[index]),
            )
            if cursor.rowcount == 0:  # a concurrent writer added the same text meanwhile
                continue
            memory_id = cursor.lastrowid
            conn.execute(
                "insert into memory_vectors (memory_id, model, dim, vector) values (?, ?, ?, ?)",
                (memory_id, embedder.name, embedder.dim, to_blob(vectors[row])),
            )
            ids[index] = memory_id
            added += 1
        bump(db, "memories", added)

    if in_transaction:
        write()
    else:
        with db.atomic():
            write()
    return ids


def new_texts(db: sqlite_utils.Database, items: Sequence[NewMemory]) -> dict[tuple[str, str], str]:
    """(tier, content hash) -> text of the items not stored yet."""
    todo: dict[tuple[str, str], str] = {}
    for tier in sorted({i.tier for i in items}):
        tier_items = [i for i in items if i.tier == tier]
        hashes = [content_hash(i.content) for i in tier_items]
        stored = existing_hashes(db, tier, hashes)
        for item, digest in zip(tier_items, hashes):
            if digest not in stored:
                todo.setdefault((tier, digest), item.content)
    return todo


def embed_new(db: sqlite_utils.Database, embedder: Embedder, items: Sequence[NewMemory], *,
              progress: bool = False) -> dict[tuple[str, str], np.ndarray]:
    """Vectors for the items not stored yet, keyed by (tier, content hash), computed before any
    transaction opens so the write lock is never held while the model runs."""
    todo = new_texts(db, items)
    return dict(zip(todo, embedder.encode(list(todo.values()), progress=progress)))


def add_prepared(db: sqlite_utils.Database, embedder: Embedder, items: Sequence[NewMemory],
                 vectors: dict[tuple[str, str], np.ndarray], now: datetime) -> list[int | None]:
    """``add_memories`` inside the caller's transaction with vectors from :func:`embed_new`.

    An item that became new meanwhile (a concurrent delete) is embedded here: rare and small.
    """
    if not items:
        return []
    keys = [(i.tier, content_hash(i.content)) for i in items]
    late = [i for i, key in enumerate(keys) if key not in vectors]
    if late:
        late = [i for i in late if not existing_hashes(db, keys[i][0], [keys[i][1]])]
        for i, vector in zip(late, embedder.encode([items[i].content for i in late])):
            vectors[keys[i]] = vector
    dim = next(iter(vectors.values())).shape[0] if vectors else 1
    zero = np.zeros(dim, dtype=np.float32)  # rows of duplicates: never written
    matrix = np.stack([vectors.get(key, zero) for key in keys])
    return add_memories(db, embedder, items, now, in_transaction=True, vectors=matrix)


def add_memory(db: sqlite_utils.Database, embedder: Embedder, item: NewMemory,
               now: datetime) -> int | None:
    return add_memories(db, embedder, [item], now)[0]


def get_memory(db: sqlite_utils.Database, memory_id: int) -> Memory:
    rows = list(db.query("select * from memories where id = ?", [memory_id]))
    if not rows:
        raise InputError(f"memory {memory_id}: no such memory")
    return Memory.from_row(rows[0])


def list_memories(
    db: sqlite_utils.Database,
    *,
    tier: str | None = None,
    since: float | None = None,
    tag: str | None = None,
    limit: int | None = 50,
    oldest_first: bool = False,
) -> list[Memory]:
    where, params = memory_filters(tier=tier, since=since, tag=tag)
    sql = f"select * from memories {where} order by created {'asc' if oldest_first else 'desc'}, id"
    if limit is not None:
        sql += f" limit {int(limit)}"
    return [Memory.from_row(row) for row in db.query(sql, params)]


def session_memories(db: sqlite_utils.Database, session_id: str, limit: int = 200) -> list[Memory]:
    """What processing a session made of it (its exchanges, summaries), oldest first."""
    return [Memory.from_row(row) for row in db.query(
        "select * from memories where session_id = ? order by created, id limit ?",
        [session_id, int(limit)])]


def memory_filters(*, tier: str | None, since: float | None, tag: str | None,
             alias: str = "") -> tuple[str, list[Any]]:
    """A WHERE clause shared by list, search and the vector pre-filter."""
    col = f"{alias}." if alias else ""
    clauses: list[str] = []
    params: list[Any] = []
    if tier is not None:
        if tier not in TIERS:
            raise InputError(f"--tier: expected one of {', '.join(TIERS)}, got {tier!r}")
        clauses.append(f"{col}tier = ?")
        params.append(tier)
    if since is not None:
        clauses.append(f"{col}created >= ?")
        params.append(since)
    if tag is not None:
        clauses.append(f"exists (select 1 from json_each({col}tags) where value = ?)")
        params.append(normalize_tags([tag])[0] if normalize_tags([tag]) else tag)
    return ("where " + " and ".join(clauses)) if clauses else "", params


def delete_memories(db: sqlite_utils.Database, ids: Iterable[int]) -> int:
    """Delete memories (their vectors, FTS rows and tasks go with them)."""
    ids = list(ids)
    deleted = 0
    with db.atomic():
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            deleted += db.conn.execute(f"delete from memories where id in ({marks})", part).rowcount
    return deleted


def touch(db: sqlite_utils.Database, ids: Sequence[int], now: datetime) -> None:
    """Mark memories as used (recency is measured from the last access, Generative-Agents style)."""
    if ids:
        with db.atomic():
            db.conn.executemany(
                "update memories set last_accessed = max(last_accessed, ?), "
                "access_count = access_count + 1 where id = ?",
                [(now.timestamp(), i) for i in ids],
            )


def memory_stats(db: sqlite_utils.Database, model: str | None = None) -> dict[str, Any]:
    tiers = {tier: 0 for tier in TIERS}
    tiers.update({t: n for t, n in db.execute("select tier, count(*) from memories group by tier")})
    vectors = {m: n for m, n in db.execute("select model, count(*) from memory_vectors group by model")}
    total = sum(tiers.values())
    stats: dict[str, Any] = {
        "tiers": tiers,
        "total": total,
        "vectors_by_model": vectors,
        "tasks": {s: n for s, n in db.execute("select status, count(*) from tasks group by status")},
        "sessions": {s: n for s, n in db.execute("select status, count(*) from sessions group by status")},
        "messages": db.execute("select count(*) from messages").fetchone()[0],
        "documents": db.execute("select count(*) from documents").fetchone()[0],
        "preferences": db.execute("select count(*) from preferences").fetchone()[0],
        "cumulative": counters(db),
    }
    if model is not None:
        stats["model"] = model
        stats["missing_vectors"] = total - vectors.get(model, 0)
    return stats


def reembed(db: sqlite_utils.Database, embedder: Embedder, *, batch: int = 2048,
            progress: bool = False) -> int:
    """Give every memory a vector from ``embedder``; vectors of other models are replaced.

    Batches commit one by one, so an interrupted run keeps its progress and a rerun continues.
    """
    done = 0
    while True:
        rows = db.execute(
            "select m.id, m.content from memories m left join memory_vectors v "
            "on v.memory_id = m.id and v.model = ? and v.dim = ? where v.memory_id is null "
            "order by m.id limit ?",
            (embedder.name, embedder.dim, batch),
        ).fetchall()
        if not rows:
            return done
        vectors = embedder.encode([text for _, text in rows], progress=progress)
        with db.atomic():
            # Deleting first (not REPLACE) so the epoch trigger tells searchers to reload.
            db.conn.executemany("delete from memory_vectors where memory_id = ?",
                                [(memory_id,) for memory_id, _ in rows])
            db.conn.executemany(
                "insert into memory_vectors (memory_id, model, dim, vector) values (?, ?, ?, ?)",
                [(memory_id, embedder.name, embedder.dim, to_blob(vector))
                 for (memory_id, _), vector in zip(rows, vectors)],
            )
        done += len(rows)


# -- working tier: tasks ------------------------------------------------------------------------
def add_task(db: sqlite_utils.Database, embedder: Embedder, title: str, now: datetime, *,
             type: str = "task", depends_on: Sequence[int] = (), tags: Sequence[str] = (),
             session_id: str | None = None, importance: float = 0.6) -> int:
    for dep in depends_on:
        row = db.execute("select 1 from tasks where memory_id = ?", [dep]).fetchone()
        if row is None:
            raise InputError(f"--depends-on: task {dep} does not exist")
    item = NewMemory(content=title, tier="working", category=type, importance=importance,
                     tags=list(tags), session_id=session_id, source="task")
    vectors = embedder.encode([title])  # before the write lock
    with db.atomic():
        (task_id,) = add_memories(db, embedder, [item], now, in_transaction=True, vectors=vectors)
        if task_id is None:
            raise InputError(f"task already exists: {title!r}")
        db.conn.execute(
            "insert into tasks (memory_id, type, status, depends_on, updated) values (?, ?, 'pending', ?, ?)",
            (task_id, type, json.dumps(list(depends_on)), now.timestamp()),
        )
    return task_id


def update_task(db: sqlite_utils.Database, task_id: int, now: datetime, *,
                status: str | None = None, depends_on: Sequence[int] | None = None) -> dict[str, Any]:
    if status is not None and status not in TASK_STATUSES:
        raise InputError(f"--status: expected one of {', '.join(TASK_STATUSES)}, got {status!r}")
    with db.atomic():
        row = db.execute("select status, depends_on from tasks where memory_id = ?", [task_id]).fetchone()
        if row is None:
            raise InputError(f"task {task_id}: no such task")
        deps = list(depends_on) if depends_on is not None else json.loads(row[1])
        if task_id in deps:
            raise InputError(f"task {task_id}: cannot depend on itself")
        if status in ("active", "done"):
            open_deps = [d for d, s in db.execute(
                f"select memory_id, status from tasks where memory_id in ({','.join('?' * len(deps))})",
                deps) if s not in COMPLETED] if deps else []
            if open_deps:
                raise InputError(f"task {task_id}: waits on unfinished task(s) "
                                 + ", ".join(map(str, open_deps)))
        db.conn.execute("update tasks set status = ?, depends_on = ?, updated = ? where memory_id = ?",
                        (status or row[0], json.dumps(deps), now.timestamp(), task_id))
    return get_task(db, task_id)


def get_task(db: sqlite_utils.Database, task_id: int) -> dict[str, Any]:
    rows = list_tasks(db, include_completed=True, ids=[task_id])
    if not rows:
        raise InputError(f"task {task_id}: no such task")
    return rows[0]


def list_tasks(db: sqlite_utils.Database, *, include_completed: bool = False,
               ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    sql = ("select m.id, m.content, t.type, t.status, t.depends_on, m.created, t.updated, m.tags "
           "from tasks t join memories m on m.id = t.memory_id")
    clauses, params = [], []
    if not include_completed:
        clauses.append("t.status not in ('done', 'cancelled')")
    if ids is not None:
        clauses.append(f"m.id in ({','.join('?' * len(ids))})")
        params.extend(ids)
    if clauses:
        sql += " where " + " and ".join(clauses)
    sql += " order by m.id"
    return [
        {"id": r[0], "title": r[1], "type": r[2], "status": r[3], "depends_on": json.loads(r[4]),
         "created": r[5], "updated": r[6], "tags": json.loads(r[7])}
        for r in db.execute(sql, params)
    ]


def completed_task_ids(db: sqlite_utils.Database) -> list[int]:
    return [r[0] for r in db.execute("select memory_id from tasks where status in ('done', 'cancelled')")]
