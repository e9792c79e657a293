"""Hybrid retrieval: exact vector search (numpy) + SQLite FTS5 keywords, fused, then re-ranked.

Vectors live in SQLite as blobs (no extensions needed); each process keeps one in-RAM matrix
per (database, model) that picks up new rows incrementally and reloads when anything was
deleted. The two candidate lists are fused with reciprocal-rank fusion, and the final order
weighs relevance, recency and importance as Generative Agents does (weights in config).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlite_utils

from milton.core.config import MemoryConfig
from milton.memory.embed import Embedder
from milton.memory.store import TIERS, Memory, _filters

RRF_K = 60
MODES = ("hybrid", "vector", "keyword")
_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves tell know remember please""".split()
)


@dataclass
class Hit:
    memory: Memory
    score: float
    relevance: float
    recency: float
    similarity: float | None
    vector_rank: int | None
    keyword_rank: int | None

    def as_dict(self) -> dict[str, Any]:
        return {**self.memory.as_dict(), "score": round(self.score, 6),
                "relevance": round(self.relevance, 6), "recency": round(self.recency, 6),
                "similarity": None if self.similarity is None else round(self.similarity, 6),
                "vector_rank": self.vector_rank, "keyword_rank": self.keyword_rank}


class VectorIndex:
    """One model's vectors as a contiguous float32 matrix, with tier and creation time beside it."""

    def __init__(self, model: str, dim: int) -> None:
        self.model, self.dim = model, dim
        self.ids = np.zeros(0, dtype=np.int64)
        self.matrix = np.zeros((0, dim), dtype=np.float32)
        self.tiers = np.zeros(0, dtype=np.int8)
        self.created = np.zeros(0, dtype=np.float64)
        self.size = 0
        self.epoch: int | None = None
        self.max_id = 0
        self.lock = threading.Lock()

    def refresh(self, db: sqlite_utils.Database) -> None:
        with self.lock:
            epoch = db.execute("select deletions from memory_epoch").fetchone()[0]
            if epoch != self.epoch:
                self.size, self.max_id, self.epoch = 0, 0, epoch
            rows = db.execute(
                "select v.memory_id, v.vector, m.tier, m.created from memory_vectors v "
                "join memories m on m.id = v.memory_id "
                "where v.model = ? and v.dim = ? and v.memory_id > ? order by v.memory_id",
                (self.model, self.dim, self.max_id),
            ).fetchall()
            if rows:
                self._append(rows)

    def _append(self, rows: list[tuple]) -> None:
        n = len(rows)
        need = self.size + n
        if need > self.matrix.shape[0]:
            capacity = max(need, int(self.matrix.shape[0] * 1.5) + 1024)
            self.matrix = _grow(self.matrix, capacity, (capacity, self.dim))
            self.ids = _grow(self.ids, capacity, (capacity,))
            self.tiers = _grow(self.tiers, capacity, (capacity,))
            self.created = _grow(self.created, capacity, (capacity,))
        block = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(n, self.dim)
        end = self.size + n
        self.matrix[self.size:end] = block
        self.ids[self.size:end] = [r[0] for r in rows]
        self.tiers[self.size:end] = [TIERS.index(r[2]) for r in rows]
        self.created[self.size:end] = [r[3] for r in rows]
        self.size = end
        self.max_id = int(rows[-1][0])

    def top(self, query: np.ndarray, n: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(memory ids, cosine similarities) of the ``n`` nearest, best first. Exact search."""
        if self.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        sims = self.matrix[:self.size] @ query.astype(np.float32, copy=False)
        if mask is not None:
            sims = np.where(mask, sims, -np.inf)
        n = min(n, self.size)
        part = np.argpartition(-sims, n - 1)[:n] if n < self.size else np.arange(self.size)
        order = part[np.argsort(-sims[part], kind="stable")]
        order = order[np.isfinite(sims[order])]
        return self.ids[order], sims[order]


def _grow(array: np.ndarray, capacity: int, shape: tuple[int, ...]) -> np.ndarray:
    grown = np.zeros(shape, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


_INDEXES: dict[tuple[str, str, int], VectorIndex] = {}
_INDEXES_LOCK = threading.Lock()


def vector_index(db: sqlite_utils.Database, model: str, dim: int) -> VectorIndex:
    """The process-wide, up-to-date index for this database file and model."""
    key = (_db_key(db), model, dim)
    with _INDEXES_LOCK:
        index = _INDEXES.get(key)
        if index is None:
            index = _INDEXES[key] = VectorIndex(model, dim)
    index.refresh(db)
    return index


def _db_key(db: sqlite_utils.Database) -> str:
    row = db.execute("pragma database_list").fetchone()
    return row[2] or f"memory:{id(db.conn)}"


def fts_query(text: str) -> str | None:
    """Terms OR-ed, each quoted (so user text can never be FTS5 syntax); stopwords dropped."""
    words = [w for w in re.findall(r"\w+", text.lower()) if len(w) > 1 and w not in _STOPWORDS]
    words = list(dict.fromkeys(words))[:32]
    return " OR ".join(f'"{w}"' for w in words) if words else None


def keyword_top(db: sqlite_utils.Database, query: str, n: int, *, tier: str | None = None,
                since: float | None = None, tag: str | None = None) -> list[int]:
    match = fts_query(query)
    if match is None:
        return []
    where, params = _filters(tier=tier, since=since, tag=tag, alias="m")
    extra = (" and " + where[len("where "):]) if where else ""
    rows = db.execute(
        "select f.rowid from memories_fts f join memories m on m.id = f.rowid "
        f"where memories_fts match ?{extra} order by bm25(memories_fts) limit ?",
        [match, *params, n],
    ).fetchall()
    return [r[0] for r in rows]


def _vector_mask(db: sqlite_utils.Database, index: VectorIndex, *, tier: str | None,
                 since: float | None, tag: str | None) -> np.ndarray | None:
    if tier is None and since is None and tag is None:
        return None
    mask = np.ones(index.size, dtype=bool)
    if tier is not None:
        mask &= index.tiers[:index.size] == TIERS.index(tier)
    if since is not None:
        mask &= index.created[:index.size] >= since
    if tag is not None:
        where, params = _filters(tier=None, since=None, tag=tag)
        allowed = np.fromiter((r[0] for r in db.execute(f"select id from memories {where}", params)),
                              dtype=np.int64)
        mask &= np.isin(index.ids[:index.size], allowed)
    return mask


def search(
    db: sqlite_utils.Database,
    embedder: Embedder | None,
    query: str,
    config: MemoryConfig,
    now: datetime,
    *,
    k: int = 5,
    tier: str | None = None,
    since: float | None = None,
    tag: str | None = None,
    mode: str = "hybrid",
    query_vector: np.ndarray | None = None,
) -> list[Hit]:
    """The ``k`` most useful memories for ``query``; see the module docstring for the ranking."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}")
    _filters(tier=tier, since=since, tag=tag)  # validates tier
    pool = max(config.candidates, k * 2)
    vector_ranks: dict[int, int] = {}
    similarity: dict[int, float] = {}
    if mode in ("hybrid", "vector"):
        if query_vector is None:
            if embedder is None:
                raise ValueError("an embedder or a query vector is needed for vector search")
            query_vector = embedder.encode_one(query)
            model, dim = embedder.name, embedder.dim
        else:
            model, dim = (embedder.name, embedder.dim) if embedder else _default_model(db)
        index = vector_index(db, model, dim)
        mask = _vector_mask(db, index, tier=tier, since=since, tag=tag)
        ids, sims = index.top(query_vector, pool, mask)
        for rank, (memory_id, sim) in enumerate(zip(ids.tolist(), sims.tolist())):
            vector_ranks[memory_id] = rank
            similarity[memory_id] = sim
    keyword_ranks: dict[int, int] = {}
    if mode in ("hybrid", "keyword"):
        for rank, memory_id in enumerate(keyword_top(db, query, pool, tier=tier, since=since, tag=tag)):
            keyword_ranks[memory_id] = rank
    candidates = list(dict.fromkeys([*vector_ranks, *keyword_ranks]))
    if not candidates:
        return []
    rows = {r["id"]: r for r in db.query(
        f"select * from memories where id in ({','.join('?' * len(candidates))})", candidates)}
    fused = {
        i: (1.0 / (RRF_K + 1 + vector_ranks[i]) if i in vector_ranks else 0.0)
        + (1.0 / (RRF_K + 1 + keyword_ranks[i]) if i in keyword_ranks else 0.0)
        for i in candidates if i in rows
    }
    if not fused:
        return []
    # Min-max over the candidates, as Generative Agents normalises each component: raw RRF
    # values differ by a few percent between ranks and would let importance swamp relevance.
    high, low = max(fused.values()), min(fused.values())
    spread = high - low
    ts_now = now.timestamp()
    hits = []
    for memory_id, value in fused.items():
        memory = Memory.from_row(rows[memory_id])
        relevance = (value - low) / spread if spread > 0 else 1.0
        hours = max(0.0, ts_now - memory.last_accessed) / 3600.0
        recency = config.recency_decay_per_hour ** hours
        score = (config.weight_relevance * relevance + config.weight_recency * recency
                 + config.weight_importance * memory.importance)
        hits.append(Hit(memory, score, relevance, recency, similarity.get(memory_id),
                        vector_ranks.get(memory_id), keyword_ranks.get(memory_id)))
    hits.sort(key=lambda h: (-h.score, h.memory.id))
    return hits[:k]


def _default_model(db: sqlite_utils.Database) -> tuple[str, int]:
    row = db.execute("select model, dim from memory_vectors group by model, dim "
                     "order by count(*) desc limit 1").fetchone()
    if row is None:
        return "none", 0
    return row[0], row[1]


def hits_json(hits: list[Hit]) -> list[dict[str, Any]]:
    return json.loads(json.dumps([h.as_dict() for h in hits]))
