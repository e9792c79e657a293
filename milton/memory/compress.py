"""compress-memory: short-term exchanges past the horizon become long-term summaries.

Exchanges are grouped per session by topic (greedy clustering on their stored vectors), each
group is summarised, and in ONE transaction the summaries are inserted, the grouped short-term
rows deleted, old unimportant long-term rows pruned and completed tasks cleared. A crash leaves
the store as it was; a second run finds nothing to do. Raw messages stay in ``messages``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import sqlite_utils

from milton.core.config import MemoryConfig
from milton.core.jobs import JobContext
from milton.memory.embed import Embedder, embedder_for, from_blob
from milton.memory.memories import (
    NewMemory,
    add_prepared,
    completed_task_ids,
    delete_memories,
    embed_new,
)
from milton.memory.search import STOPWORDS
from milton.memory.summarize import ExtractiveSummarizer, Summarizer, choose_summarizer

SIMILAR = 0.45  # cosine to a group's centroid to join it (MiniLM: same-topic pairs ~0.5+)
MAX_GROUP = 8  # exchanges per summary, so each summary stays focused enough to keep facts


@dataclass
class Group:
    session_id: str | None
    memory_ids: list[int]
    texts: list[str]
    created: float
    tags: list[str]
    source_messages: list[int]
    label: str = ""
    summary: str = ""
    importance: float = 0.0
    summarizer: str = ""


@dataclass
class Plan:
    groups: list[Group] = field(default_factory=list)
    prune_ids: list[int] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)
    summarizer: str = ""
    fallbacks: int = 0

    @property
    def empty(self) -> bool:
        return not (self.groups or self.prune_ids or self.task_ids)

    def as_dict(self) -> dict[str, Any]:
        return {
            "summarizer": self.summarizer,
            "groups": [{k: v for k, v in asdict(g).items() if k not in ("texts",)}
                       for g in self.groups],
            "short_term_compressed": sum(len(g.memory_ids) for g in self.groups),
            "prune": self.prune_ids,
            "tasks_cleared": self.task_ids,
            "llm_fallbacks": self.fallbacks,
        }


def _keywords(texts: list[str], n: int = 3) -> list[str]:
    words = Counter(
        w for text in texts for w in re.findall(r"[a-z][a-z0-9+#.-]{2,}", text.lower())
        if w not in STOPWORDS and w not in {"user", "assistant"}
    )
    return [w for w, _ in words.most_common(n)]


def _vectors(db: sqlite_utils.Database, embedder: Embedder, rows: list[dict]) -> np.ndarray:
    """Stored vectors of the current model; anything missing (a model change) is embedded."""
    stored = {
        memory_id: from_blob(blob, embedder.dim)
        for memory_id, blob in db.execute(
            f"select memory_id, vector from memory_vectors where model = ? and dim = ? and memory_id in "
            f"({','.join('?' * len(rows))})",
            [embedder.name, embedder.dim, *[r["id"] for r in rows]])
    }
    missing = [r for r in rows if r["id"] not in stored]
    if missing:
        for r, v in zip(missing, embedder.encode([r["content"] for r in missing])):
            stored[r["id"]] = v
    return np.stack([stored[r["id"]] for r in rows])


def group_exchanges(rows: list[dict], vectors: np.ndarray) -> list[list[int]]:
    """Greedy topic clustering within one session, in time order: an exchange joins the most
    similar open group whose centroid it matches, else starts one. Returns row indexes."""
    groups: list[list[int]] = []
    sums: list[np.ndarray] = []
    for i, vector in enumerate(vectors):
        best, best_sim = None, SIMILAR
        for g, total in enumerate(sums):
            if len(groups[g]) >= MAX_GROUP:
                continue
            sim = float(vector @ total) / (float(np.linalg.norm(total)) or 1.0)
            if sim >= best_sim:
                best, best_sim = g, sim
        if best is None:
            groups.append([i])
            sums.append(vector.astype(np.float64).copy())
        else:
            groups[best].append(i)
            sums[best] += vector
    return groups


def plan_compression(db: sqlite_utils.Database, embedder: Embedder, config: MemoryConfig,
                     now: datetime, summarizer: Summarizer) -> Plan:
    horizon = now.timestamp() - config.short_term_hours * 3600
    rows = list(db.query(
        "select id, session_id, content, created, tags, source_messages from memories "
        "where tier = 'short' and created < ? order by coalesce(session_id, ''), created, id",
        [horizon]))
    plan = Plan(summarizer=summarizer.name)
    by_session: dict[str | None, list[dict]] = {}
    for row in rows:
        key = row["session_id"] or "day:" + datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d")
        by_session.setdefault(key, []).append(row)
    extractive = ExtractiveSummarizer(embedder)
    for session_rows in by_session.values():
        vectors = _vectors(db, embedder, session_rows)
        for indexes in group_exchanges(session_rows, vectors):
            members = [session_rows[i] for i in indexes]
            texts = [m["content"] for m in members]
            tags = list(dict.fromkeys(t for m in members for t in json.loads(m["tags"] or "[]")))
            sources = [s for m in members for s in json.loads(m["source_messages"] or "[]")]
            group = Group(session_id=members[0]["session_id"], memory_ids=[m["id"] for m in members],
                          texts=texts, created=max(m["created"] for m in members),
                          tags=tags, source_messages=sources)
            group.label = ", ".join(_keywords(texts)) or "conversation"
            budget = int(min(1500, max(400, 0.6 * sum(len(t) for t in texts))))
            try:
                group.summary = summarizer.summarize(texts, budget)
                group.importance = summarizer.importance(texts)
                group.summarizer = summarizer.name
            except Exception:  # noqa: BLE001 - an LLM misbehaving must not stop the job
                plan.fallbacks += 1
                group.summary = extractive.summarize(texts, budget)
                group.importance = extractive.importance(texts)
                group.summarizer = extractive.name
            plan.groups.append(group)
    prune_before = now.timestamp() - config.prune_days * 86400
    plan.prune_ids = [r[0] for r in db.execute(
        "select id from memories where tier = 'long' and importance < ? and created < ? order by id",
        (config.prune_importance, prune_before))]
    for group in plan.groups:
        # A summary that would be pruned at once is not written (so a second run has nothing
        # to prune); its exchanges still leave short-term.
        if group.importance < config.prune_importance and group.created < prune_before:
            group.summary = ""
    plan.task_ids = completed_task_ids(db)
    return plan


def apply_plan(db: sqlite_utils.Database, embedder: Embedder, plan: Plan, now: datetime) -> dict[str, int]:
    written = [g for g in plan.groups if g.summary.strip()]
    items = [NewMemory(content=g.summary, tier="long", category="summary", importance=g.importance,
                       tags=[*g.label.split(", "), *g.tags][:8], created=g.created,
                       session_id=g.session_id, source="compress-memory",
                       source_messages=g.source_messages) for g in written]
    vectors = embed_new(db, embedder, items)  # before the write lock; known summaries skipped
    with db.atomic():
        ids = add_prepared(db, embedder, items, vectors, now)
        short_ids = [i for g in plan.groups for i in g.memory_ids]
        removed = delete_memories(db, short_ids)
        pruned = delete_memories(db, plan.prune_ids)
        cleared = delete_memories(db, plan.task_ids)
    return {"summaries_written": sum(1 for i in ids if i is not None),
            "short_term_removed": removed, "long_term_pruned": pruned, "tasks_cleared": cleared}


def compress_memory(db: sqlite_utils.Database, embedder: Embedder, config: MemoryConfig,
                    now: datetime, *, dry_run: bool = False,
                    summarizer: Summarizer | None = None) -> tuple[Plan, dict[str, Any]]:
    why = "given"
    if summarizer is None:
        summarizer, why = choose_summarizer(config.summarizer, config.llm_model, embedder)
    plan = plan_compression(db, embedder, config, now, summarizer)
    metrics: dict[str, Any] = {"summarizer": summarizer.name, "summarizer_choice": why,
                               "groups": len(plan.groups),
                               "short_term_candidates": sum(len(g.memory_ids) for g in plan.groups),
                               "prune_candidates": len(plan.prune_ids),
                               "completed_tasks": len(plan.task_ids),
                               "llm_fallbacks": plan.fallbacks, "dry_run": dry_run}
    if not dry_run and not plan.empty:
        metrics.update(apply_plan(db, embedder, plan, now))
    return plan, metrics


def compress_memory_job(dry_run: bool = False,
                        on_plan: Callable[[Plan], None] | None = None) -> Callable[[JobContext], dict[str, Any]]:
    def job(ctx: JobContext) -> dict[str, Any]:
        cfg = ctx.settings.memory
        embedder = embedder_for(cfg)
        swept: dict[str, Any] = {}
        if not dry_run:
            # Sessions a crashed or idle server left open hold exchanges not yet in memory.
            from milton.memory.sessions import (
                expire_idle_sessions,
                pending_sessions,
                process_sessions,
            )

            ended = expire_idle_sessions(ctx.db, cfg.session_idle_minutes, ctx.now)
            done = process_sessions(ctx.db, embedder, pending_sessions(ctx.db), ctx.now,
                                    ctx.settings.logs_dir)
            swept = {"sessions_ended": len(ended), "sessions_processed": len(done)}
        plan, metrics = compress_memory(ctx.db, embedder, cfg, ctx.now, dry_run=dry_run)
        metrics.update(swept)
        if on_plan is not None:
            on_plan(plan)
        ctx.log("compressed", **metrics)
        return metrics

    return job
