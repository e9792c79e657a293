"""Recall probes: does a model *know* the facts it was taught, asked in words it never saw?

For each fact, :func:`milton.train.facts.probe_questions` gives ``train.recall_probes`` held-out
wordings (never among its training items); the model answers each greedily, formatted exactly
as serve asks it, and a probe counts when the answer contains the fact's value. This is the
gate's measure of learning: perplexity also falls when only the answer *style* was learned.
"""

from __future__ import annotations

from typing import Any

from milton.train.evaluate import generate
from milton.train.facts import Fact, probe_questions, recalled

MAX_NEW_TOKENS = 24  # "Your dentist is named Dr. Varga." and a little slack


def recall(model: Any, tokenizer: Any, facts: list[Fact], *, probes: int = 2, seed: int = 0,
           chat_format: str = "auto", max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
    """{"recall": share of probes answered with the value (None without facts), "probes": n,
    "facts": n, "misses": [{"question", "answer", "expected"}] (the first few)}."""
    hits, total, misses = 0, 0, []
    for fact in facts:
        for question in probe_questions(fact, probes, seed):
            answer = generate(model, tokenizer, {"kind": "pair", "prompt": question, "response": ""},
                              max_new_tokens, chat_format=chat_format, as_served=True)
            total += 1
            if recalled(answer, fact):
                hits += 1
            elif len(misses) < 5:
                misses.append({"question": question, "answer": answer[:200], "expected": fact.value})
    return {"recall": hits / total if total else None, "probes": total, "facts": len(facts),
            "misses": misses}
