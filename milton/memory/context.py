"""The memory block serve puts in the system prompt: most useful first, within a token budget."""

from __future__ import annotations

from datetime import datetime

import sqlite_utils

from milton.core.config import MemoryConfig
from milton.core.secrets import SecretFilter
from milton.memory.embed import Embedder
from milton.memory.memories import touch
from milton.memory.search import search

HEADER = "Relevant memories (most useful first):"


def estimate_tokens(text: str) -> int:
    """~4 characters a token for English with BPE/SentencePiece vocabularies; errs high for
    short words, which is the safe side for a budget."""
    return max(1, (len(text) + 3) // 4)


def humanize_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                       ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def guard_secrets(text: str, secrets: SecretFilter, mode: str) -> str | None:
    """``text`` fit for a prompt: unchanged, with its secrets redacted, or None (``omit``)."""
    redacted, found = secrets.redact(text)
    if not found:
        return text
    return None if mode == "omit" else redacted


def preference_lines(db: sqlite_utils.Database, min_evidence: int = 2, limit: int = 8) -> list[str]:
    rows = db.execute(
        "select key, value from preferences where evidence >= ? order by evidence desc, last_seen desc "
        "limit ?", (min_evidence, limit)).fetchall()
    return [f"{key.replace('_', ' ')}: {value}" for key, value in rows]


def build_context(
    db: sqlite_utils.Database,
    embedder: Embedder,
    query: str,
    config: MemoryConfig,
    now: datetime,
    *,
    budget_tokens: int | None = None,
    k: int = 20,
    mark_used: bool = True,
    secrets: SecretFilter | None = None,
) -> str:
    """Lines like ``[2 days ago] ...`` that fit ``budget_tokens`` (header included); '' if none.

    Items are taken in ranking order; one that does not fit is skipped so a shorter, less
    useful one may still fit. Used memories get their recency refreshed (``mark_used``).
    A memory (or preference) holding a secret found by ``secrets`` (default: the built-in
    detectors) is redacted or left out per ``memory.secrets_in_context``: the block goes to
    whatever model answers, and an unrelated question must not carry a pasted key along.
    """
    secrets = SecretFilter() if secrets is None else secrets
    budget = config.context_budget_tokens if budget_tokens is None else budget_tokens
    if budget <= 0 or not query.strip():
        return ""
    lines: list[str] = []
    used_ids: list[int] = []
    spent = estimate_tokens(HEADER)
    for hit in search(db, embedder, query, config, now, k=k):
        age = humanize_age(now.timestamp() - hit.memory.created)
        content = guard_secrets(hit.memory.content, secrets, config.secrets_in_context)
        if content is None:
            continue
        line = f"[{age}] " + " ".join(content.split())
        cost = estimate_tokens(line) + 1
        if spent + cost > budget:
            continue
        lines.append(line)
        used_ids.append(hit.memory.id)
        spent += cost
    prefs = [p for p in (guard_secrets(line, secrets, config.secrets_in_context)
                         for line in preference_lines(db)) if p is not None]
    if prefs:
        line = "Known preferences: " + "; ".join(prefs)
        if spent + estimate_tokens(line) + 1 <= budget:
            lines.append(line)
    if not lines:
        return ""
    if mark_used:
        touch(db, used_ids, now)
    return "\n".join([HEADER, *lines])
