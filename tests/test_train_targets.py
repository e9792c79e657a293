"""Which assistant answers become training targets: corrections, feedback, degenerate text.

Conversations go through a real `milton serve` app on 127.0.0.1 (scripted engine), ratings
through ``POST /v1/feedback`` with httpx (``/good`` ``/bad`` in `milton chat`: test_chat.py);
the export is train-lora's own, on the real store.
"""

from __future__ import annotations

from datetime import datetime, timezone

import httpx
import pytest
from live_server import MODEL, EchoEngine, live, wait_until

from milton.core.config import load_settings
from milton.core.store import open_store
from milton.train.dataset import export_new_items
from milton.train.targets import correction, degenerate, resolve_policy, select_targets

NOW = datetime(2026, 1, 5, tzinfo=timezone.utc)


def _export(home, **train: str) -> list[tuple[str, str]]:
    """End every session, export as train-lora does; (prompt, response) of the stored items."""
    settings = load_settings(environ={"MILTON_HOME": str(home), **{
        f"MILTON_TRAIN__{k.upper()}": v for k, v in train.items()}}).settings
    db = open_store(settings.db_path)
    try:
        db.execute("update sessions set status = 'ended'")
        run = db["training_runs"].insert({"started": "2026-01-05T00:00:00Z", "status": "running"}).last_pk
        export_new_items(db, settings, run, NOW)
        return [tuple(r) for r in db.execute("select prompt, response from training_items order by id")]
    finally:
        db.close()


def _rate(base: str, cid: str, rating: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/feedback", json={"id": cid, "rating": rating}, headers=headers, timeout=30)


def test_corrections_feedback_and_degenerate_answers_decide_the_targets(milton_home):
    with live(milton_home, EchoEngine(), serve__memory_budget_tokens="0",
              serve__api_key="k3y-for-tests") as srv:
        client = srv.client("k3y-for-tests")

        def ask(user: str, text: str) -> str:
            history = asked.setdefault(user, [])
            history.append({"role": "user", "content": text})
            reply = client.chat.completions.create(model=MODEL, messages=history, user=user)
            history.append({"role": "assistant", "content": reply.choices[0].message.content})
            return reply.id

        asked: dict[str, list[dict]] = {}
        ask("a", "What is the capital of France?")  # the echo answer is wrong ...
        ask("a", "No, it's Paris.")  # ... and corrected: the correction becomes the target
        ask("a", "count 40")  # "0 1 2 ... 39": degenerate
        ask("a", "Which port is the wiki on?")
        ask("a", "that's wrong")  # corrected without the right answer: dropped, nothing added
        good = ask("b", "Who owns the backup rota?")
        bad = ask("b", "When is the deploy freeze?")
        ask("b", "What colour is the dashboard?")  # never rated
        wait_until(lambda: srv.db().execute("select count(*) from messages where role = 'assistant'"
                                            ).fetchone()[0] == 8)

        assert _rate(srv.base, good, "bad", "k3y-for-tests").json()["logged"] is True
        r = _rate(srv.base, good, "good", "k3y-for-tests")  # the latest rating counts
        assert r.status_code == 200 and r.json()["rating"] == "good", r.text
        assert _rate(srv.base, bad, "bad", "k3y-for-tests").status_code == 200
        # Same auth as the rest of /v1; bad bodies are 400s naming the field; nothing stored.
        assert _rate(srv.base, bad, "good").status_code == 401
        bogus = _rate(srv.base, bad, "meh", "k3y-for-tests")
        assert bogus.status_code == 400 and bogus.json()["error"]["param"] == "rating"
        missing = httpx.post(f"{srv.base}/v1/feedback", json={"rating": "good"},
                             headers={"Authorization": "Bearer k3y-for-tests"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "id"
        rows = srv.db().execute("select completion_id, rating from feedback order by id").fetchall()
        assert rows == [(good, "bad"), (good, "good"), (bad, "bad")]

    items = _export(milton_home, assistant_targets="filtered")
    assert ("What is the capital of France?", "It's Paris.") in items
    responses = [r for _, r in items]
    assert "echo: What is the capital of France?" not in responses  # the wrong answer: never
    assert not any(r.startswith("0 1 2") for r in responses)  # degenerate
    assert "echo: Which port is the wiki on?" not in responses  # the user said it was wrong
    assert ("Who owns the backup rota?", "echo: Who owns the backup rota?") in items  # rated good
    assert "echo: When is the deploy freeze?" not in responses  # rated bad
    assert ("What colour is the dashboard?", "echo: What colour is the dashboard?") in items


def test_confirmed_policy_keeps_only_rated_good_answers_and_corrections():
    rows = [(1, "user", "What is my cat called?", None),
            (2, "assistant", "Your cat is called a cat.", '{"request_id": "c1"}'),
            (3, "user", "Actually my cat is named Quillon.", None),
            (4, "assistant", "Noted.", '{"request_id": "c2"}'),
            (5, "user", "What day is standup?", None),
            (6, "assistant", "Standup is on Monday.", '{"request_id": "c3"}'),
            (7, "user", "Thanks!", None),
            (8, "assistant", "You're welcome.", '{"request_id": "c4"}')]
    pairs = [("What is my cat called?", "Your cat is called a cat.", [1, 2]),
             ("Actually my cat is named Quillon.", "Noted.", [3, 4]),
             ("What day is standup?", "Standup is on Monday.", [5, 6]),
             ("Thanks!", "You're welcome.", [7, 8])]
    chosen, report = select_targets(pairs, rows, "confirmed", {"c3": "good"})
    assert [(p, t) for p, t, _, _ in chosen] == [
        ("What is my cat called?", "My cat is named Quillon."),
        ("What day is standup?", "Standup is on Monday.")]
    assert (report.corrected, report.feedback_good, report.unconfirmed) == (1, 1, 2)
    none, _ = select_targets(pairs, rows, "none", {"c3": "good"})
    assert [t for _, t, _, _ in none] == ["My cat is named Quillon."]


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("  \n ", "empty"),
    ("100.000.000.000.000.000.000.000.000", "mostly digits"),
    ("the the the the the the the the the the", "repetition loop"),
    ("Paris. Paris. Paris. Paris. Paris. Paris.", "repetition loop"),
    ("I am here to help. I am here to help. I am here to help. I am here to help.", "repetition loop"),
    ("<div><span></span></div><br/><hr/>", "mostly markup or symbols"),
    ("The capital of France is Paris.", None), ("7 times 8 is 56.", None),
    ("The meeting is at 10:00 on 2024-05-01.", None),
    ("Sure! Here is the list:\n- apples\n- bread\n- cheese", None),
])
def test_degenerate_text(text, why):
    assert degenerate(text) == why


@pytest.mark.parametrize("reply, expected", [
    ("No, it's Paris.", (True, "It's Paris.")), ("no it is Lyon", (True, "It is Lyon")),
    ("Actually, my cat is named Quillon", (True, "My cat is named Quillon")),
    ("That's wrong, the wiki is on port 8443.", (True, "The wiki is on port 8443.")),
    ("Not quite: it is 42", (True, "It is 42")), ("No, that's wrong.", (True, None)),
    ("No thanks", (False, None)), ("No problem!", (False, None)), ("Nobody knows", (False, None)),
    ("Actually, what about Spain?", (False, None)), ("Actually can you also list Spain", (False, None)),
    ("Great, thanks", (False, None)),
])
def test_correction_turns(reply, expected):
    assert correction(reply) == expected


def test_auto_policy_by_model(milton_home):
    def policy(base: str) -> str:
        return resolve_policy(load_settings(environ={"MILTON_HOME": str(milton_home),
                                                     "MILTON_MODEL__BASE": base}).settings)

    assert policy("") == "confirmed"  # the packaged Gemma 3 270M base
    assert policy("/m/gemma-3-270m-pt-Q4_K_M.gguf") == "confirmed"
    assert policy("/m/Qwen2.5-0.5B-Base") == "confirmed"
    assert policy("/m/gemma-3-270m-it-Q4_K_M.gguf") == "filtered"
    assert policy("/m/Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "filtered"
