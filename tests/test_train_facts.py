"""Nightly learning that sticks: facts the user taught are parsed from their own words, trained
in many phrasings, probed with held-out paraphrases, kept night after night, and a night that
contradicts them is rejected. Tiny Llama built here; real store, real CLI, real training."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from tiny_lm import build_tiny_gguf

from milton.train.facts import (
    QUESTIONS,
    facts_in,
    latest,
    parse_fact,
    probe_questions,
    recalled,
    split_questions,
    training_items,
)

NIGHTS = {
    "A": ["my cat is named Quillon", "my sister lives in Tromso", "my boss is named Henrietta"],
    "B": ["my dog is named Pepperoni", "my brother lives in Lisbon", "my car is called Bluebird"],
    "C": ["my laptop is called Falcon", "my mother lives in Ghent", "my horse is named Tamarind"],
}


# -- parsing and phrasing (no model) -------------------------------------------------------------
def test_facts_are_parsed_from_the_users_words_only():
    fact = parse_fact("Please remember this: my dentist is named Dr. Varga.")
    assert (fact.subject, fact.relation, fact.value) == ("dentist", "name", "Dr. Varga")
    moved = parse_fact("my sister moved to Oslo")
    assert (moved.key, moved.value, moved.answer()) == ("place:sister", "Oslo",
                                                         "Your sister lives in Oslo.")
    assert parse_fact("What is my cat's name?") is None  # a question states nothing
    assert parse_fact("The weather is nice") is None  # not about the user
    found = facts_in("Thanks! Also remember that my gym is Ironworks. My car is called Bluebird.")
    assert [(f.subject, f.value) for f in found] == [("gym", "Ironworks"), ("car", "Bluebird")]


def test_probe_wordings_are_never_trained_and_rotate_across_facts():
    facts = [parse_fact(s) for night in NIGHTS.values() for s in night]
    probed = set()
    for fact in facts:
        train, probe = split_questions(fact, 2)
        assert len(probe) == 2 and not set(train) & set(probe)
        items = training_items(fact, 8)
        assert not {i["prompt"] for i in items} & set(probe)
        assert all(fact.value in i["response"] for i in items)  # answers only from its words
        assert {i["kind"] for i in items} == {"pair", "text"}
        probed |= {q.replace(fact.subject, "{s}") for q in probe}
    assert len(probed) > 4  # different facts are probed with different wordings


def test_restated_fact_replaces_the_old_one_and_recall_checks_the_value():
    old, new = parse_fact("my sister lives in Tromso"), parse_fact("My sister moved to Oslo.")
    assert latest([old, parse_fact("my cat is named Quillon"), new])[-1] == new
    assert [f.value for f in latest([old, new])] == ["Oslo"]
    assert recalled("Your sister lives in Oslo.", new) and not recalled("Tromso, I think.", new)
    assert not recalled("Your sister lives in Oslofjord.", new)
    assert len(probe_questions(new)) == 2 and set(QUESTIONS) == {"name", "place", "is"}


# -- three nights on the tiny model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [s for night in NIGHTS.values() for s in night] + ["my sister moved to Oslo"]
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny-facts"), texts)


def _config(home: Path, model_dir: Path) -> None:
    values = {"learning_rate": 0.01, "max_steps": 150, "batch_size": 8, "grad_accum": 1,
              "epochs": 15, "checkpoint_every": 1000, "rouge_samples": 0, "warmup_ratio": 0.05,
              "lora_dropout": 0.0, "regression_margin": 1.0, "lora_r": 16, "lora_alpha": 32,
              # 8-9 retention facts x 2 probes: one retrained fact wobbling is 6-12 points;
              # the poisoned night loses 3 facts (~35 points)
              "retention_margin": 0.2,
              # the tiny base knows no general English for the anchors to keep (regression
              # ppl is in the hundreds); anchors are measured in test_train_lora
              "anchor_weight": 0.0}
    # plain: serve asks this tiny model without the few-shot frame, so the probes do too
    lines = ["[model]", f'base = "{model_dir}"', 'device = "cpu"', "threads = 1",
             'chat_format = "plain"', "", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _session(statement: str, exchange: tuple[str, str] | None = None) -> list[dict]:
    q, a = exchange or ("Thanks. Is that all?", "Yes, that is all.")
    return [{"role": "user", "content": f"Please remember this: {statement}."},
            {"role": "assistant", "content": "Noted, I will remember that."},
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _night(home: Path, name: str, sessions: list[list[dict]]) -> dict:
    """Ingest the night's conversations and run the train-lora job, in this process."""
    from milton.core.config import load_settings
    from milton.core.jobs import run_job
    from milton.core.store import open_store
    from milton.core.timeutil import utcnow
    from milton.memory.conversations import ingest_conversations
    from milton.train.jobs import train_lora_job

    settings = load_settings().settings
    path = home / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"messages": s}) + "\n" for s in sessions))
    db = open_store(settings.db_path)
    try:
        ingest_conversations(db, path, max_message_chars=settings.memory.max_message_chars,
                             now=utcnow())
    finally:
        db.close()
    result = run_job("train-lora", train_lora_job(), settings)
    assert result.status == "ok", result
    return result.metrics


def _recall(settings, model_dir: Path, statements: list[str]) -> float:
    """Recall of held-out paraphrases by the promoted adapter, in this process."""
    from milton.models.hf import load_base
    from milton.models.refs import BaseModelRef
    from milton.train.jobs import adapter_store
    from milton.train.lora import load_adapter
    from milton.train.recall import recall

    model, tok = load_base(BaseModelRef(model_dir, "hf", "-", "tiny"), "cpu", 1)
    current = adapter_store(settings).current()
    peft = load_adapter(model, current.path / "adapter")
    return recall(peft, tok, [parse_fact(s) for s in statements], chat_format="plain")["recall"]


def test_three_nights_accumulate_poison_is_rejected_and_a_restated_fact_replaces(
        milton_home, tiny, settings, one_torch_thread):
    model_dir, _ = tiny
    _config(milton_home, model_dir)
    recall_a = {}
    for name in "ABC":
        result = _night(milton_home, name, [_session(s) for s in NIGHTS[name]])
        assert result["status_detail"] == "promoted", result["reason"]
        assert result["candidate_recall_new"] > result["serving_recall_new"]
        if name == "A":
            recall_a["night1"] = _recall(settings, model_dir, NIGHTS["A"])
        else:
            assert result["facts_retention"] == 3 * (ord(name) - ord("A"))
    recalled_now = {n: _recall(settings, model_dir, NIGHTS[n]) for n in "ABC"}
    assert recall_a["night1"] >= 0.75, recall_a
    assert recalled_now["A"] >= 0.9 * recall_a["night1"], (recall_a, recalled_now)
    assert recalled_now["B"] >= 0.75 and recalled_now["C"] >= 0.75, recalled_now
    conn = sqlite3.connect(settings.db_path)
    runs = conn.execute("select status, recall_new, recall_retention from training_runs "
                        "order by id").fetchall()
    assert [r[0] for r in runs] == ["promoted"] * 3 and runs[2][1] >= 0.75 and runs[2][2] >= 0.75

    # Night 4: the assistant's answers contradict A, the user never said so (poisoned targets).
    poison = [_session("my kettle is named Brewster",
                       (f"{q.format(s=subject)}", f"Your {subject} is named {wrong}."))
              for subject, wrong in (("cat", "Bob"), ("boss", "Bob"), ("car", "Bob"))
              for q in QUESTIONS["name"]]
    result = _night(milton_home, "poison", poison)
    assert result["status_detail"] == "rejected" and "retention" in result["reason"], result
    assert result["candidate_recall_retention"] <= result["serving_recall_retention"] - 0.2

    # Night 5: the user restates a fact: it replaces the old one in training and retention.
    result = _night(milton_home, "restate", [_session("my sister moved to Oslo")])
    assert result["status_detail"] == "promoted", result["reason"]
    from milton.train.jobs import adapter_store

    trained = (adapter_store(settings).current().path / "dataset" / "train.jsonl").read_text()
    assert "Oslo" in trained and "Tromso" not in trained
    from milton.core.store import open_store
    from milton.train.taught import facts_in_force, retention_facts

    db = open_store(settings.db_path)
    assert [f.value for f, _ in facts_in_force(db) if f.subject == "sister"] == ["Oslo"]
    assert "Tromso" not in {f.value for f in retention_facts(db, 0, 100)}
    assert "Oslo" in {f.value for f in retention_facts(db, 0, 100)}
    assert _recall(settings, model_dir, ["my sister moved to Oslo"]) > 0


# -- the fact store: sources, restatement, retention set (real SQLite, no model) -----------------
def test_facts_come_from_user_messages_and_notes_and_retention_is_stratified(
        memory_db, embedder, settings, tmp_path):
    from milton.core.timeutil import utcnow
    from milton.memory.conversations import ingest_conversations
    from milton.memory.memories import NewMemory, add_memory
    from milton.train.taught import export_facts, facts_in_force, new_facts, retention_facts

    db = memory_db
    convo = tmp_path / "c.jsonl"
    convo.write_text(json.dumps({"messages": _session("my cat is named Quillon", (
        "What is my cat's name?", "Your cat is named Whiskers."))}) + "\n")
    ingest_conversations(db, convo, max_message_chars=10_000, now=utcnow())
    add_memory(db, embedder, NewMemory("my gym is Ironworks", tier="long", category="note",
                                       source="cli"), utcnow())
    add_memory(db, embedder, NewMemory("my boat is named Ghost", tier="long", category="note",
                                       source="summary"), utcnow())  # not the user's words
    run1 = db["training_runs"].insert({"started": "x", "status": "running"}).last_pk
    top = db.execute("select max(id) from messages").fetchone()[0]
    assert export_facts(db, settings, run1, 0, top, utcnow()) == 2
    assert export_facts(db, settings, run1, 0, top, utcnow()) == 0  # read again: nothing new
    # the assistant's "Whiskers" never becomes a fact; the summary's boat neither
    assert {(f.subject, f.value) for f in new_facts(db, run1)} == {("cat", "Quillon"),
                                                                   ("gym", "Ironworks")}
    db["training_runs"].update(run1, {"status": "promoted"})

    run2 = db["training_runs"].insert({"started": "y", "status": "running"}).last_pk
    convo.write_text(json.dumps({"messages": _session("my cat is named Pixel")}) + "\n")
    ingest_conversations(db, convo, max_message_chars=10_000, now=utcnow())
    top2 = db.execute("select max(id) from messages").fetchone()[0]
    assert export_facts(db, settings, run2, top, top2, utcnow()) == 1
    in_force = {f.subject: f.value for f, _ in facts_in_force(db)}
    assert in_force == {"cat": "Pixel", "gym": "Ironworks"}
    # the retention set of run 2 has run 1's facts still in force: not the replaced cat
    assert [f.value for f in retention_facts(db, run2, 10)] == ["Ironworks"]
    db["training_runs"].update(run2, {"status": "promoted"})
    run3 = db["training_runs"].insert({"started": "z", "status": "running"}).last_pk
    assert {f.value for f in retention_facts(db, run3, 10)} == {"Ironworks", "Pixel"}
    assert len(retention_facts(db, run3, 1)) == 1


def test_recall_probes_ask_as_serve_does(tmp_path):
    """A base model without a chat template is served inside the few-shot frame, so its recall
    probes are asked inside it too; plain and template formats are asked as trained."""
    from tiny_lm import build_tokenizer

    from milton.models.prompt import FEW_SHOT_INTRO
    from milton.train.evaluate import served_prompt_ids
    from milton.train.formatting import prompt_ids

    item = {"kind": "pair", "prompt": "What do I call my cat?", "response": ""}
    texts = [FEW_SHOT_INTRO, "What do I call my cat? Your cat is named Quillon."]
    base = build_tokenizer(texts, chat_template=False)
    for fmt in ("auto", "few-shot", "template"):
        text = base.decode(served_prompt_ids(item, base, fmt))
        assert FEW_SHOT_INTRO[:40] in text and text.rstrip().endswith(
            "User: What do I call my cat?\nAssistant:"), fmt
    assert served_prompt_ids(item, base, "plain") == prompt_ids(item, base, "plain")
    instruct = build_tokenizer(texts, chat_template=True)
    assert served_prompt_ids(item, instruct, "auto") == prompt_ids(item, instruct, "template")
