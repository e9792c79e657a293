"""What the user taught, kept in the store: facts parsed from their messages, their
``/remember`` / ``milton memory add`` notes and their documents, one ``training_facts`` row per
statement (see :mod:`milton.train.facts` for the parsing and the phrasings).

* :func:`export_facts` stores the facts stated since the last finished run (called in the same
  transaction as the training-item export, with the same message watermark).
* :func:`facts_in_force` is the cumulative set a night trains on: the newest statement per
  fact key, of every run so far, so a restated fact replaces the old one.
* :func:`retention_facts` is the retention set the gate probes: facts in force that promoted
  runs taught, bounded, taken round-robin by run (stratified) so no night is forgotten unseen.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime

import sqlite_utils

from milton.core.config import Settings
from milton.train.facts import Fact, facts_in, training_items

#: memory sources a user wrote themselves (chat's /remember, milton memory add)
USER_MEMORY_SOURCES = ("chat", "cli")


def _user_statements(db: sqlite_utils.Database, since_id: int, until_id: int,
                     min_messages: int) -> Iterable[tuple[str, str]]:
    """(text, source) of user messages in ended sessions, ids in (since_id, until_id]."""
    rows = db.execute(
        "select m.id, m.content from messages m join sessions s on s.id = m.session_id "
        "where m.role = 'user' and m.id > ? and m.id <= ? and s.status in ('ended', 'processed') "
        "and (select count(*) from messages o where o.session_id = s.id "
        "and o.role in ('user', 'assistant')) >= ? order by m.id",
        [since_id, until_id, min_messages]).fetchall()
    for msg_id, content in rows:
        yield content, f"message:{msg_id}"


def _memory_statements(db: sqlite_utils.Database) -> Iterable[tuple[str, str]]:
    """Notes the user added, and ingested document chunks, not yet looked at."""
    marks = ",".join("?" * len(USER_MEMORY_SOURCES))
    rows = db.execute(
        f"select id, content from memories where tier = 'long' and (source in ({marks}) or "
        "(category = 'knowledge' and source in (select path from documents))) "
        "and not exists (select 1 from training_facts f where f.source = 'memory:' || memories.id)"
        " order by created, id", list(USER_MEMORY_SOURCES)).fetchall()
    for memory_id, content in rows:
        yield content, f"memory:{memory_id}"


def export_facts(db: sqlite_utils.Database, settings: Settings, run_id: int, since_id: int,
                 until_id: int, now: datetime) -> int:
    """Store the facts stated since the last finished run under ``run_id``; how many are new.

    Re-reading the same statement (a failed run's messages read again) adds nothing: a fact
    is unique per (key, value, source); one stored by an unfinished run moves to this run.
    """
    from milton.core.secrets import secret_filter_for

    filt = secret_filter_for(settings)
    statements = list(_user_statements(db, since_id, until_id, settings.train.min_session_messages))
    statements += list(_memory_statements(db))
    added = 0
    ts = now.timestamp()
    for text, source in statements:
        if filt.find(text):
            continue  # a secret is never a fact to learn
        for fact in facts_in(text, source):
            cursor = db.conn.execute(
                "insert or ignore into training_facts (key, subject, relation, verb, value, source, "
                "run_id, created) values (?, ?, ?, ?, ?, ?, ?, ?)",
                (fact.key, fact.subject, fact.relation, fact.verb, fact.value, source, run_id, ts))
            if cursor.rowcount:
                added += 1
            else:
                db.conn.execute(
                    "update training_facts set run_id = ? where key = ? and value = ? and source = ? "
                    "and (run_id is null or run_id not in (select id from training_runs "
                    "where status in ('promoted', 'rejected')))",
                    (run_id, fact.key, fact.value, source))
    return added


def _rows(db: sqlite_utils.Database, where: str = "1", params: Iterable[object] = ()) \
        -> list[tuple[Fact, int | None]]:
    rows = db.execute(
        "select f.subject, f.relation, f.verb, f.value, f.source, f.run_id from training_facts f "
        f"where f.id in (select max(id) from training_facts group by key) and {where} "
        "order by f.id", list(params)).fetchall()
    return [(Fact(r[0], r[1], r[2], r[3], r[4]), r[5]) for r in rows]


def facts_in_force(db: sqlite_utils.Database) -> list[tuple[Fact, int | None]]:
    """(fact, run that stored it): the newest statement per key, oldest first."""
    return _rows(db)


def new_facts(db: sqlite_utils.Database, run_id: int) -> list[Fact]:
    """Facts in force that this run taught (new or restated)."""
    return [f for f, owner in _rows(db, "f.run_id = ?", [run_id])]


def retention_facts(db: sqlite_utils.Database, run_id: int, limit: int) -> list[Fact]:
    """Up to ``limit`` facts in force taught by earlier promoted runs, round-robin by run
    (each run's own order a seeded hash), so every night keeps a share of the probes."""
    rows = _rows(db, "f.run_id != ? and f.run_id in (select id from training_runs where "
                     "status = 'promoted')", [run_id])
    by_run: dict[int | None, list[Fact]] = defaultdict(list)
    for fact, owner in rows:
        by_run[owner].append(fact)
    for facts in by_run.values():
        facts.sort(key=lambda f: hashlib.sha256(f.key.encode()).hexdigest())
    out: list[Fact] = []
    queues = [list(v) for _, v in sorted(by_run.items(), key=lambda kv: kv[0] or 0)]
    while len(out) < limit and any(queues):
        for queue in queues:
            if queue and len(out) < limit:
                out.append(queue.pop(0))
    return out


def items_in_force(db: sqlite_utils.Database, settings: Settings) -> list[dict[str, str | None]]:
    """:func:`fact_items` of every fact in force: what the user taught, as it is trained."""
    return fact_items([fact for fact, _ in facts_in_force(db)], settings)


def fact_items(facts: Iterable[Fact], settings: Settings) -> list[dict[str, str | None]]:
    """Every fact in ``train.fact_phrasings`` question forms plus its statement forms."""
    cfg = settings.train
    return [item for fact in facts
            for item in training_items(fact, cfg.fact_phrasings, cfg.recall_probes, cfg.seed)]
