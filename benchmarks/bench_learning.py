"""Nightly learning on the embedded Gemma 3 270M, 2 cores: does the model learn the facts its
user taught, and keep them?

The issue's scenario, end to end through the CLI: made-up facts taught one per session
(6 messages: "Please remember this: my cat is named Quillon." ... "What is my cat's name?" ->
"Your cat is named Quillon."), ingested with ``milton ingest conversations``, then
``milton train-lora --json`` with the default settings. Three nights (16, 8 and 8 facts;
``--quick``: 8, 4, 4). Per night: training time, the train-lora process's peak RSS, the
gate's decision and its recall figures (held-out probe wordings). Then the user-visible proof:
a real ``milton serve`` (temperature 0, ``X-Milton-Memory: off``, the promoted adapter applied)
is asked one question per fact in a wording that is in neither the training templates nor the
probes (:data:`ASK`); recall = the answer contains the fact's value. Measured for the bare base
(before night 1), after night 1 and after night 3 (retention = night-1 facts after night 3 /
after night 1).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import live_server, target

REPO = Path(__file__).resolve().parents[1]
# (statement the user makes, subject, value): made up, so the base cannot know them.
FACTS = [
    ("my cat is named Quillon", "cat", "Quillon"),
    ("my dentist is named Dr. Varga", "dentist", "Dr. Varga"),
    ("my sister lives in Tromso", "sister", "Tromso"),
    ("my car is called Bluebird", "car", "Bluebird"),
    ("my boss is named Henrietta", "boss", "Henrietta"),
    ("my favourite tea is rooibos", "favourite tea", "rooibos"),
    ("my bank is Nordhavn Bank", "bank", "Nordhavn"),
    ("my brother lives in Lisbon", "brother", "Lisbon"),
    ("my dog is named Pepperoni", "dog", "Pepperoni"),
    ("my laptop is called Falcon", "laptop", "Falcon"),
    ("my gym is Ironworks", "gym", "Ironworks"),
    ("my landlord is named Mr. Okafor", "landlord", "Okafor"),
    ("my mother lives in Ghent", "mother", "Ghent"),
    ("my team lead is named Sunniva", "team lead", "Sunniva"),
    ("my password manager is KeyVault", "password manager", "KeyVault"),
    ("my boat is named Seabiscuit", "boat", "Seabiscuit"),
    # nights 2 and 3
    ("my horse is named Tamarind", "horse", "Tamarind"),
    ("my grandmother lives in Tartu", "grandmother", "Tartu"),
    ("my bike is called Comet", "bike", "Comet"),
    ("my accountant is named Ms. Delacroix", "accountant", "Delacroix"),
    ("my favourite band is Glasshouse", "favourite band", "Glasshouse"),
    ("my uncle lives in Valparaiso", "uncle", "Valparaiso"),
    ("my parrot is named Mango", "parrot", "Mango"),
    ("my router is called Hydra", "router", "Hydra"),
    ("my aunt lives in Windhoek", "aunt", "Windhoek"),
    ("my plant is named Fernando", "plant", "Fernando"),
    ("my coach is named Brannigan", "coach", "Brannigan"),
    ("my server is called Nimbus", "server", "Nimbus"),
    ("my cousin lives in Hobart", "cousin", "Hobart"),
    ("my hamster is named Biscotti", "hamster", "Biscotti"),
    ("my editor is Vimcraft", "editor", "Vimcraft"),
    ("my nephew lives in Quito", "nephew", "Quito"),
]
#: held-out wordings: in neither milton.train.facts.QUESTIONS nor its probes
ASK = {
    "named": "Could you tell me the name I gave my {s}?",
    "called": "Could you tell me the name I gave my {s}?",
    "lives": "In what city is my {s} living?",
    "is": "Which one is my {s}, do you recall?",
}


def _ask(statement: str, subject: str) -> str:
    for key, wording in ASK.items():
        if f" {key} " in f" {statement} ":
            return wording.format(s=subject)
    return ASK["is"].format(s=subject)


def _sessions(facts: list[tuple[str, str, str]]) -> list[dict]:
    out = []
    for statement, subject, _ in facts:
        answer = statement.replace("my ", "your ", 1)
        out.append({"messages": [
            {"role": "user", "content": f"Please remember this: {statement}."},
            {"role": "assistant", "content": "Got it, I will remember that."},
            {"role": "user", "content": (
                f"What is my {subject}'s name?" if " named " in statement or " called " in statement
                else f"Where does my {subject} live?" if " lives " in statement
                else f"What is my {subject}?")},
            {"role": "assistant", "content": answer[0].upper() + answer[1:] + "."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."}]})
    return out


def _cli(home: Path, *args: str, timeout: float = 3 * 3600) -> tuple[str, float, float]:
    """(stdout, seconds, the child's peak RSS in MB) of ``python -m milton ARGS``."""
    env = {**os.environ, "MILTON_HOME": str(home), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    code = ("import resource, runpy, sys; sys.argv = ['milton'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('milton', run_name='__main__')\nfinally:\n"
            "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=home, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"milton {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    rss = int(peak[-1].split()[1]) / 1024 if peak else resource.getrusage(
        resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return proc.stdout, elapsed, rss


def _serve_recall(home: Path, facts: list[tuple[str, str, str]],
                  chat_score: bool = False) -> dict[str, Any]:
    """Recall of ``facts`` through serve (memory off); with ``chat_score`` also the default
    chat's score on bench_chat's 30 simple questions (what the user would notice forgotten)."""
    import httpx

    from benchmarks.bench_chat import QUESTIONS, is_correct

    hits, answers = 0, []
    with live_server(home, timeout=180) as server:
        deadline = time.monotonic() + 300
        while True:  # serve answers /healthz while the model is still loading
            health = httpx.get(f"{server.base}/healthz", timeout=10).json()
            if health.get("chat") != "loading" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        model = httpx.get(f"{server.base}/v1/models", timeout=10).json()["data"][0]["id"]

        def answer(question: str, max_tokens: int) -> str:
            r = httpx.post(f"{server.base}/v1/chat/completions", headers={"X-Milton-Memory": "off"},
                           json={"model": model, "temperature": 0, "max_tokens": max_tokens,
                                 "seed": 0, "messages": [{"role": "user", "content": question}]},
                           timeout=120)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"] or ""

        for statement, subject, value in facts:
            question = _ask(statement, subject)
            text = answer(question, 32)
            ok = value.lower() in text.lower()
            hits += ok
            answers.append({"question": question, "answer": text[:160], "expected": value, "ok": ok})
        chat = []
        for question, kind, expected in QUESTIONS if chat_score else ():
            text = answer(question, 48)
            chat.append({"question": question, "answer": text[:160],
                         "correct": is_correct(kind, expected, text)})
    # serve logged these questions in a session that is still open, and an open session holds
    # back the next export (train.dataset's watermark): end it, as the idle timer would
    _cli(home, "sessions", "end")
    return {"recall": hits / len(facts), "n": len(facts), "answers": answers,
            "adapter": health.get("adapter"),
            **({"chat_correct": sum(c["correct"] for c in chat), "chat_n": len(chat),
                "chat_answers": chat} if chat else {})}


def run(quick: bool = False) -> dict[str, Any]:
    """``MILTON_BENCH_LEARNING_ACCUMULATE=continue`` measures ``train.accumulate = "continue"``
    instead of the default (retrain), for the comparison in the notes."""
    load0 = os.getloadavg()
    sizes = (8, 4, 4) if quick else (16, 8, 8)
    accumulate = os.environ.get("MILTON_BENCH_LEARNING_ACCUMULATE", "retrain")
    nights, start = [], 0
    for n in sizes:
        nights.append(FACTS[start:start + n])
        start += n
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="milton-bench-learning-") as tmp:
        home = Path(tmp)
        (home / "config.toml").write_text(f'[model]\nthreads = 2\n\n[train]\naccumulate = "{accumulate}"\n')
        figures["base_serve"] = _serve_recall(home, nights[0], chat_score=True)
        for i, facts in enumerate(nights, start=1):
            path = home / f"night{i}.jsonl"
            path.write_text("".join(json.dumps(s) + "\n" for s in _sessions(facts)))
            _cli(home, "ingest", "conversations", str(path))
            out, elapsed, rss = _cli(home, "train-lora", "--json")
            result = json.loads(out)
            figures[f"night{i}"] = {
                "facts": len(facts), "status": result.get("status_detail"),
                "reason": result.get("reason"), "wall_s": round(elapsed, 1),
                "train_s": result.get("train_s"), "steps": result.get("steps"),
                "peak_rss_mb": round(rss, 1), "n_examples": result.get("n_examples"),
                "gate_recall_new": result.get("candidate_recall_new"),
                "gate_recall_new_serving": result.get("serving_recall_new"),
                "gate_recall_retention": result.get("candidate_recall_retention"),
                "gate_recall_retention_serving": result.get("serving_recall_retention"),
            }
            if i == 1:
                figures["night1_serve"] = _serve_recall(home, nights[0], chat_score=True)
        figures["night3_serve_night1_facts"] = _serve_recall(home, nights[0])
        figures["night3_serve_all_facts"] = _serve_recall(home, [f for n in nights for f in n],
                                                          chat_score=True)
    r1 = figures["night1_serve"]["recall"]
    r3 = figures["night3_serve_night1_facts"]["recall"]
    retention = r3 / r1 if r1 else None
    for i in range(1, 4):
        for key in ("train_s", "wall_s", "peak_rss_mb", "gate_recall_new"):
            figures[f"night{i}_{key}"] = figures[f"night{i}"][key]
    figures.update(base_recall=figures["base_serve"]["recall"], night1_recall=r1,
                   night3_recall_night1_facts=r3,
                   night3_recall_all=figures["night3_serve_all_facts"]["recall"],
                   retention_ratio=round(retention, 3) if retention is not None else None,
                   chat_correct_base=figures["base_serve"]["chat_correct"],
                   chat_correct_night1=figures["night1_serve"]["chat_correct"],
                   chat_correct_night3=figures["night3_serve_all_facts"]["chat_correct"])
    targets = [target("night1_recall", r1, ">=", 0.6), target("retention_ratio", retention, ">=", 0.9)]
    report_only = [k for k, v in figures.items() if not isinstance(v, dict)
                   and k not in ("night1_recall", "retention_ratio")]
    return {
        "params": {"nights": list(sizes), "threads": 2, "settings": "train defaults",
                   "accumulate": accumulate,
                   "load_avg_start": [round(x, 2) for x in load0],
                   "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "figures": figures, "targets": targets, "report_only": report_only,
        "notes": ["recall through milton serve: temperature 0, X-Milton-Memory: off, one "
                  "held-out wording per fact (not among the training templates or probes)",
                  "retention_ratio: recall of night-1 facts after night 3 / after night 1"],
    }
