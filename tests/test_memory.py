"""Memory store, hybrid search, context building, tasks and re-embedding (real model, real SQLite)."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
from helpers import assert_clean_error
from memory_fixture import CONVERSATIONS, QUESTIONS, distractors

from milton.core.config import MemoryConfig
from milton.core.errors import InputError
from milton.core.store import open_store
from milton.core.timeutil import parse_timestamp
from milton.memory.context import build_context, estimate_tokens, humanize_age
from milton.memory.memories import (
    NewMemory,
    add_memories,
    add_memory,
    add_task,
    delete_memories,
    get_memory,
    list_memories,
    list_tasks,
    memory_stats,
    reembed,
    update_task,
)
from milton.memory.search import fts_query, search
from milton.memory.summarize import ExtractiveSummarizer, heuristic_importance

NOW = parse_timestamp("2026-06-01T12:00:00Z")
CFG = MemoryConfig()


@pytest.fixture
def db(tmp_path):
    store = open_store(tmp_path / "m.db")
    yield store
    store.close()


def exchange(user: str, assistant: str) -> str:
    return f"User: {user}\nAssistant: {assistant}"


@pytest.fixture(scope="module")
def haystack(embedder, tmp_path_factory):
    """The labelled fixture as short-term exchanges (no sessions needed for search)."""
    store = open_store(tmp_path_factory.mktemp("hay") / "m.db")
    pairs = [p for conv in CONVERSATIONS for p in conv] + distractors(200)
    add_memories(store, embedder, [NewMemory(exchange(u, a), tier="short", category="exchange")
                                   for u, a in pairs], NOW)
    yield store
    store.close()


def recall_at(db, embedder, mode: str, k: int = 5) -> tuple[float, list[str]]:
    missed = []
    for _kind, question, needle in QUESTIONS:
        hits = search(db, embedder, question, CFG, NOW, k=k, mode=mode)
        if not any(needle in h.memory.content for h in hits):
            missed.append(question)
    return 1 - len(missed) / len(QUESTIONS), missed


def test_hybrid_recall_beats_vector_only_and_keyword_only(haystack, embedder):
    hybrid, missed = recall_at(haystack, embedder, "hybrid")
    vector, _ = recall_at(haystack, embedder, "vector")
    keyword, _ = recall_at(haystack, embedder, "keyword")
    assert hybrid >= 0.9, missed
    assert hybrid > vector, (hybrid, vector)
    assert hybrid > keyword, (hybrid, keyword)
    # Each single mode fails on its own kind of question: the fixture really tests fusion.
    kinds = {q: kind for kind, q, _ in QUESTIONS}
    assert any(kinds[q] == "identifier" for q in recall_at(haystack, embedder, "vector")[1])
    assert any(kinds[q] == "paraphrase" for q in recall_at(haystack, embedder, "keyword")[1])


def test_add_dedupes_and_round_trips(db, embedder):
    ids = add_memories(db, embedder, [NewMemory("Rex is my dog", tags=["Pets", "pets", " dogs "]),
                                      NewMemory("Rex  is my   dog"),  # same text, other spacing
                                      NewMemory("Rex is my dog", tier="short")], NOW)
    assert ids[0] is not None and ids[1] is None and ids[2] is not None
    m = get_memory(db, ids[0])
    assert m.tags == ["pets", "dogs"] and m.tier == "long" and m.created == NOW.timestamp()
    assert add_memory(db, embedder, NewMemory("Rex is my dog"), NOW) is None
    stats = memory_stats(db, embedder.name)
    assert stats["tiers"] == {"short": 1, "working": 0, "long": 1}
    assert stats["missing_vectors"] == 0 and stats["cumulative"]["memories"] == 2
    with pytest.raises(InputError, match="empty"):
        add_memory(db, embedder, NewMemory("   "), NOW)
    with pytest.raises(InputError, match="tier"):
        add_memory(db, embedder, NewMemory("x", tier="mid"), NOW)
    with pytest.raises(InputError, match="importance"):
        add_memory(db, embedder, NewMemory("x", importance=1.5), NOW)
    with pytest.raises(InputError, match="no such memory"):
        get_memory(db, 999)


def test_filters_and_incremental_index(db, embedder):
    old = NOW - timedelta(days=10)
    add_memories(db, embedder, [
        NewMemory("The cabin Wi-Fi password is bluefjord-88", tags=["cabin"], created=old.timestamp()),
        NewMemory("The office Wi-Fi password is greenhill-12", tier="short"),
    ], NOW)
    q = "wifi password"
    assert len(search(db, embedder, q, CFG, NOW, k=5)) == 2
    assert [h.memory.tier for h in search(db, embedder, q, CFG, NOW, tier="short")] == ["short"]
    since = (NOW - timedelta(days=1)).timestamp()
    assert [h.memory.tier for h in search(db, embedder, q, CFG, NOW, since=since)] == ["short"]
    assert [h.memory.tags for h in search(db, embedder, q, CFG, NOW, tag="cabin")] == [["cabin"]]
    assert [m.tier for m in list_memories(db, tag="cabin")] == ["long"]
    # A memory added after the index was loaded is found (picked up by rowid) ...
    new_id = add_memory(db, embedder, NewMemory("The garage Wi-Fi password is redbarn-3"), NOW)
    assert new_id in [h.memory.id for h in search(db, embedder, q, CFG, NOW, k=5, mode="vector")]
    # ... and a deleted one is gone from both halves at once (epoch reload, FTS trigger).
    assert delete_memories(db, [new_id]) == 1
    for mode in ("vector", "keyword", "hybrid"):
        assert new_id not in [h.memory.id for h in search(db, embedder, q, CFG, NOW, k=5, mode=mode)]


def test_ranking_weighs_recency_and_importance(db, embedder):
    """Equal relevance: the recent, important memory wins; with relevance weight only, ties stay."""
    old = (NOW - timedelta(days=60)).timestamp()
    a = add_memory(db, embedder, NewMemory("Standup is at 9:30 in room B", importance=0.2, created=old), NOW)
    b = add_memory(db, embedder, NewMemory("Standup is at 9:30 in room B!", importance=0.9), NOW)
    hits = search(db, embedder, "when is standup", CFG, NOW, k=2)
    assert [h.memory.id for h in hits] == [b, a]
    assert hits[0].recency > 0.99 and hits[1].recency < 0.01


def test_fts_query_is_safe_and_keeps_identifiers(db, embedder):
    assert fts_query('ERR-4471 "quoted" AND NOT (x OR') == '"err 4471" OR "quoted"'
    assert fts_query("the of and") is None  # stopwords only: keyword half sits out
    add_memory(db, embedder, NewMemory("Error ERR-4471 means a bad header"), NOW)
    for query in ['"', "AND", "NEAR(", "*", "col:value", "'; drop table memories; --", "\x00"]:
        search(db, embedder, query, CFG, NOW)  # never an FTS5 syntax error
    assert search(db, embedder, "ERR-4471", CFG, NOW, mode="keyword")


def test_build_context_budget_and_format(haystack, embedder):
    block = build_context(haystack, embedder, "Tell me about my dog", CFG, NOW, budget_tokens=120,
                          mark_used=False)
    lines = block.splitlines()
    assert lines[0].startswith("Relevant memories")
    assert "Biscuit" in lines[1] and lines[1].startswith("[just now] ")
    assert estimate_tokens(block) <= 120 + len(lines)  # per-line rounding slack
    assert build_context(haystack, embedder, "dog", CFG, NOW, budget_tokens=0) == ""
    big = build_context(haystack, embedder, "dog", CFG, NOW, budget_tokens=2000, mark_used=False)
    assert 200 < estimate_tokens(big) <= 2000
    assert humanize_age(2 * 86400 + 5) == "2 days ago" and humanize_age(30) == "just now"


def test_build_context_marks_memories_used(db, embedder):
    m = add_memory(db, embedder, NewMemory("Lena's birthday is on March 14",
                                           created=(NOW - timedelta(days=30)).timestamp()), NOW)
    assert "[1 month ago] Lena's birthday" in build_context(db, embedder, "birthday", CFG, NOW)
    assert get_memory(db, m).last_accessed == NOW.timestamp() and get_memory(db, m).access_count == 1


def test_tasks_dependencies_and_status(db, embedder):
    t1 = add_task(db, embedder, "write the migration", NOW, type="dev")
    t2 = add_task(db, embedder, "deploy the migration", NOW, depends_on=[t1])
    with pytest.raises(InputError, match="waits on unfinished task"):
        update_task(db, t2, NOW, status="active")
    with pytest.raises(InputError, match="does not exist"):
        add_task(db, embedder, "orphan", NOW, depends_on=[999])
    with pytest.raises(InputError, match="status"):
        update_task(db, t1, NOW, status="finished")
    update_task(db, t1, NOW, status="done")
    assert update_task(db, t2, NOW, status="active")["status"] == "active"
    assert [t["id"] for t in list_tasks(db)] == [t2]
    assert [t["id"] for t in list_tasks(db, include_completed=True)] == [t1, t2]
    # Tasks are working memory: searchable like any other tier.
    assert search(db, embedder, "deploy", CFG, NOW, tier="working")[0].memory.id == t2


def test_reembed_with_another_model_never_mixes_dimensions(db, embedder, tmp_path):
    """A local sentence-transformers model of another size (built here: MiniLM + a 64-d dense
    head) replaces every vector; search uses only the configured model's vectors."""
    from sentence_transformers import SentenceTransformer, models

    from milton.memory.embed import Embedder

    base = embedder.model
    dense = models.Dense(in_features=embedder.dim, out_features=64)
    small_dir = tmp_path / "small-model"
    SentenceTransformer(modules=[base[0], base[1], dense]).save(str(small_dir))
    small = Embedder(str(small_dir), small_dir)
    assert small.dim == 64

    add_memories(db, embedder, [NewMemory("The cat sleeps on the piano"),
                                NewMemory("Taxes are due in April")], NOW)
    assert memory_stats(db, small.name)["missing_vectors"] == 2
    assert search(db, small, "cat", CFG, NOW, mode="vector") == []  # no 64-d vectors yet
    assert reembed(db, small, batch=1) == 2
    rows = db.execute("select model, dim, length(vector) from memory_vectors").fetchall()
    assert rows == [(small.name, 64, 256)] * 2
    assert search(db, small, "kitten on a musical instrument", CFG, NOW, k=1, mode="vector")[0] \
        .memory.content.startswith("The cat")
    assert reembed(db, small) == 0  # nothing left to do
    # Back to the default model: the 64-d vectors are replaced, never compared with 384-d ones.
    assert reembed(db, embedder) == 2
    assert {r[0] for r in db.execute("select dim from memory_vectors")} == {embedder.dim}


def test_extractive_summary_keeps_distinct_facts_within_budget(embedder):
    texts = [exchange("My sister Ana lives in Porto and works as an architect.", "Porto is beautiful."),
             exchange("Ana's birthday is on 3 May.", "I'll remember 3 May."),
             exchange("She loves hiking in the Peneda-Gerês park.", "A lovely national park."),
             exchange("Ana also designed the new library in Braga.", "Impressive work."),
             exchange("Her partner is called Tiago.", "Nice to know.")]
    summary = ExtractiveSummarizer(embedder).summarize(texts, 220)
    assert 0 < len(summary) <= 220
    kept = [s for s in ("Porto", "3 May", "Peneda", "Braga", "Tiago") if s in summary]
    assert len(kept) >= 2, summary
    # Original order is kept.
    positions = [summary.index(s) for s in kept]
    assert positions == sorted(positions)
    short = ExtractiveSummarizer(embedder).summarize(texts[:1], 1000)
    assert short == "User: My sister Ana lives in Porto and works as an architect. Assistant: Porto is beautiful."
    assert heuristic_importance([exchange("hi", "hello!")]) < 0.5
    assert heuristic_importance([exchange("Please remember my locker code is 4411", "OK")]) >= 0.5


def test_memory_cli(cli):
    rc, out, err = cli("memory", "add", "The build server is called zephyr-07", "--tag", "infra")
    assert rc == 0, err
    rc, out, err = cli("memory", "search", "which server builds", "--json")
    assert rc == 0, err
    hits = json.loads(out)
    assert hits[0]["content"] == "The build server is called zephyr-07" and hits[0]["tags"] == ["infra"]
    rc, out, err = cli("memory", "search", "x", "--tier", "mid")
    assert rc == 2 and "--tier" in err and len(err.strip().splitlines()) == 1
    rc, out, err = cli("memory", "delete", "1", "99")
    assert rc == 2 and "99" in err
    rc, out, err = cli("memory", "stats", "--json")
    assert json.loads(out)["tiers"]["long"] == 1
    rc, out, err = cli("memory", "delete", "1")
    assert rc == 0 and "Deleted 1 memory" in out
    chat = {"messages": [{"role": "user", "content": "Briefly: how do I squash commits in git?"},
                         {"role": "assistant", "content": "git rebase -i HEAD~3"},
                         {"role": "user", "content": "Keep it short, and git push after?"},
                         {"role": "assistant", "content": "git push --force-with-lease"}]}
    rc, out, err = cli("ingest", "conversations", "-", input=json.dumps(chat) + "\n")
    assert rc == 0, err
    rc, out, err = cli("memory", "preferences", "--json")
    prefs = {(p["key"], p["value"]): p["evidence"] for p in json.loads(out)}
    assert prefs[("response_style", "concise")] == 2 and prefs[("tool", "git")] == 2
    rc, out, err = cli("memory", "context", "squash my commits")
    assert "git rebase -i HEAD~3" in out and "response style: concise" in out


def test_common_terms_are_dropped_or_anded(db, embedder, monkeypatch):
    """A word in most memories costs bm25 on all of them and ranks nothing: it is left out,
    unless it is all the query has, then common words narrow each other (AND)."""
    import milton.memory.search as search_mod

    monkeypatch.setattr(search_mod, "COMMON_MIN_DOCS", 3)
    monkeypatch.setattr(search_mod, "COMMON_FRACTION", 0.0)
    texts = [f"The wifi password for room {i} is secret-{i}" for i in range(8)]
    texts += ["The printer in room 4 jams on glossy paper", "Guest wifi has no password at all"]
    add_memories(db, embedder, [NewMemory(t) for t in texts], NOW)
    assert search_mod.common_terms(db, "wifi password printing") == {"wifi", "password"}
    assert fts_query("wifi password printing", frozenset({"wifi", "password"})) == '"printing"'
    assert fts_query("wifi password", frozenset({"wifi", "password"})) == '"wifi" AND "password"'
    hits = search_mod.keyword_top(db, "wifi password jams", 5)
    assert len(hits) == 1 and "printer" in get_memory(db, hits[0][0]).content  # "jams" only
    both = {get_memory(db, i).content for i, _ in search_mod.keyword_top(db, "wifi password", 20)}
    assert len(both) == 9 and not any("printer" in t for t in both)


def test_index_loads_in_chunks(db, embedder, monkeypatch):
    import milton.memory.search as search_mod

    monkeypatch.setattr(search_mod, "LOAD_CHUNK", 2)
    texts = [f"Locker {i} holds the {thing}" for i, thing in
             enumerate(["tent", "stove", "rope", "lantern", "kayak"])]
    ids = add_memories(db, embedder, [NewMemory(t) for t in texts], NOW)
    index = search_mod.vector_index(db, embedder.name, embedder.dim)
    assert index.size == 5 and index.ids[:5].tolist() == ids
    assert np.allclose(index.matrix[:5], embedder.encode(texts), atol=1e-5)
    assert search(db, embedder, "boat", CFG, NOW, k=1, mode="vector")[0].memory.content.endswith("kayak")


def test_memory_cli_bad_input_is_one_line_and_writes_nothing(cli, db_rows):
    cases = [
        (("memory", "add", "   "), ["content: empty memory"]),
        (("memory", "add", "x", "--tier", "working"), ["--tier", "memory tasks add"]),
        (("memory", "search", "x", "--mode", "fuzzy"), ["--mode", "fuzzy"]),
        (("memory", "search", "x", "--since", "last tuesday"), ["--since", "last tuesday"]),
        (("memory", "show", "42"), ["memory 42: no such memory"]),
        (("memory", "tasks", "update", "7", "--status", "done"), ["task 7: no such task"]),
        (("memory", "tasks", "add", "ship it", "--depends-on", "9"), ["--depends-on: task 9 does not exist"]),
    ]
    for args, needles in cases:
        rc, out, err = cli(*args)
        assert rc == 2, (args, rc, err)
        assert_clean_error(err, *needles)
    assert db_rows("memories") == 0 and db_rows("tasks") == 0
