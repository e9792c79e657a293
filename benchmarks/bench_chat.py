"""The default assistant: share of 30 simple questions answered correctly through serve.

A real ``milton serve`` child on the packaged Gemma 3 270M Q4_K_M (a base model: no chat
template), asked through the official ``openai`` client at temperature 0, memory injection
off, once per prompt format (``model.chat_format``): ``plain`` (the bare ``User:/Assistant:``
turns serve used before) and ``few-shot`` (what ``auto`` now gives a base model: an assistant
frame with example turns, stop at the next turn, answers cut where they loop). Each format gets
a fresh server; the questions go in the same order.

The questions: 10 capital cities, 10 small arithmetic problems, 10 definitions and everyday
facts, none of them in the few-shot examples. An answer is correct when its first line (at
most 200 characters) names the expected word (word boundary, any case), or, for a number,
when the last number in it (digits or a word up to twenty) is the expected one: "2 + 2 = 4."
and "A spider has eight legs." are right, "What is 2 + 2?" and "100.000.000..." are not.
An answer is *degenerate* when it is empty, repeats the question, or ended on the token limit.
"""

from __future__ import annotations

import re
import time
from typing import Any

from benchmarks._common import live_server, target, temp_home

QUESTIONS: tuple[tuple[str, str, str], ...] = (
    # (question, "word" | "number", expected: a regex of words, or the number)
    ("What is the capital of France?", "word", r"paris"),
    ("What is the capital of Japan?", "word", r"tokyo"),
    ("What is the capital of Italy?", "word", r"rome"),
    ("What is the capital of Germany?", "word", r"berlin"),
    ("What is the capital of Spain?", "word", r"madrid"),
    ("What is the capital of England?", "word", r"london"),
    ("What is the capital of Russia?", "word", r"moscow"),
    ("What is the capital of Egypt?", "word", r"cairo"),
    ("What is the capital of China?", "word", r"beijing"),
    ("What is the capital of Greece?", "word", r"athens"),
    ("What is 2 + 2?", "number", "4"),
    ("What is 3 + 5?", "number", "8"),
    ("What is 10 - 3?", "number", "7"),
    ("What is 9 + 1?", "number", "10"),
    ("What is 5 times 2?", "number", "10"),
    ("What is 4 times 4?", "number", "16"),
    ("What is 12 divided by 3?", "number", "4"),
    ("What is 7 + 6?", "number", "13"),
    ("What is 100 - 1?", "number", "99"),
    ("What is 6 + 6?", "number", "12"),
    ("What is a triangle?", "word", r"three|3"),
    ("What is ice?", "word", r"frozen|water"),
    ("What is a puppy?", "word", r"dog"),
    ("What does a thermometer measure?", "word", r"temperature|heat"),
    ("What do bees make?", "word", r"honey"),
    ("What color is the sky on a clear day?", "word", r"blue"),
    ("How many days are in a week?", "number", "7"),
    ("How many legs does a spider have?", "number", "8"),
    ("What is the largest planet in the solar system?", "word", r"jupiter"),
    ("What is the opposite of hot?", "word", r"cold"),
)
FORMATS = ("plain", "few-shot")
MAX_TOKENS = 48
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}


def is_correct(kind: str, expected: str, answer: str) -> bool:
    """See the module docstring: the expected word in the first line, or the last number."""
    line = answer.strip().split("\n", 1)[0] if answer.strip() else ""
    if not line or len(line) > 200:
        return False
    if kind == "word":
        return re.search(rf"\b({expected})\b", line, re.IGNORECASE) is not None
    numbers = [_NUMBER_WORDS.get(tok.lower(), tok) for tok in re.findall(r"\d+(?:\.\d+)?|[A-Za-z]+", line)
               if tok[0].isdigit() or tok.lower() in _NUMBER_WORDS]
    if not numbers:
        return False
    last = numbers[-1]
    if "." in last and last.rstrip("0").endswith("."):
        last = last.split(".")[0]
    return last == expected


def is_degenerate(question: str, answer: str, finish_reason: str | None) -> bool:
    """Empty, the question repeated, or cut by the token limit (a loop, or rambling)."""
    text = answer.strip()
    return (not text or text.rstrip("?").lower() == question.rstrip("?").lower()
            or finish_reason == "length")


def _ask_all(chat_format: str, questions: tuple[tuple[str, str, str], ...]) -> dict[str, Any]:
    """A fresh serve with ``model.chat_format`` = ``chat_format``; every question once."""
    import httpx
    import openai

    env = {"MILTON_MODEL__CHAT_FORMAT": chat_format, "MILTON_SERVE__N_CTX": "2048"}
    with temp_home("milton-bench-chat-") as (home, _settings), live_server(home, env, 180) as srv:
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0,
                               timeout=300)
        deadline = time.monotonic() + 300
        while True:  # /healthz answers before the model is loaded; chat says 503 until then
            try:
                model = client.models.list().data[0].id
                client.chat.completions.create(model=model, max_tokens=1, messages=[
                    {"role": "user", "content": "Hi"}], extra_headers={"X-Milton-Memory": "off"})
                break
            except (openai.InternalServerError, IndexError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serve never loaded the model: {srv.log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        served = httpx.get(f"{srv.base}/ml/telemetry", timeout=30).json()
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for question, kind, expected in questions:
            reply = client.chat.completions.create(
                model=model, temperature=0, max_tokens=MAX_TOKENS, seed=0,
                messages=[{"role": "user", "content": question}],
                extra_headers={"X-Milton-Memory": "off"})
            choice = reply.choices[0]
            answer = choice.message.content or ""
            rows.append({"question": question, "expected": expected, "answer": answer,
                         "finish_reason": choice.finish_reason,
                         "completion_tokens": reply.usage.completion_tokens if reply.usage else None,
                         "correct": is_correct(kind, expected, answer)})
        seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": round(seconds, 2), "telemetry_chat_format": _served_format(served)}


def _served_format(telemetry: dict[str, Any]) -> Any:
    """The prompt format serve reports (engine info's ``chat_format``), for the record."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "chat_format" in node:
                found.append(node["chat_format"])
            for value in node.values():
                walk(value)
    walk(telemetry)
    return found[0] if found else None


def run(quick: bool = False) -> dict[str, Any]:
    questions = QUESTIONS[::3] if quick else QUESTIONS
    figures: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for fmt in FORMATS:
        result = _ask_all(fmt, questions)
        rows = result["rows"]
        key = fmt.replace("-", "_")
        figures[f"{key}_correct_share"] = round(sum(r["correct"] for r in rows) / len(rows), 3)
        figures[f"{key}_correct"] = sum(r["correct"] for r in rows)
        figures[f"{key}_degenerate"] = sum(
            is_degenerate(r["question"], r["answer"], r["finish_reason"]) for r in rows)
        figures[f"{key}_seconds"] = result["seconds"]
        runs[fmt] = result
    figures["questions"] = len(questions)
    figures["few_shot_minus_plain"] = round(figures["few_shot_correct_share"]
                                            - figures["plain_correct_share"], 3)
    figures["answers"] = runs
    return {
        "params": {"questions": len(questions), "formats": list(FORMATS), "max_tokens": MAX_TOKENS,
                   "temperature": 0, "memory": "off", "model": "packaged Gemma 3 270M Q4_K_M",
                   "client": "openai, one request at a time, a fresh serve per format"},
        "figures": figures,
        "targets": [target("few_shot_minus_plain", figures["few_shot_minus_plain"], ">=", 0.1)],
        "report_only": ["plain_correct_share", "few_shot_correct_share", "plain_degenerate",
                        "few_shot_degenerate", "plain_seconds", "few_shot_seconds"],
        "notes": ["correct = the expected word in the answer's first line, or the expected "
                  "number as its last number (see bench_chat.py)"],
    }
