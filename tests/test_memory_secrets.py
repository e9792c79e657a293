"""Issue 19: a memory that holds a secret is never injected verbatim into a prompt. Through real
serve (uvicorn on 127.0.0.1, the official openai client, the echo engine that records the
messages it was given), and through build_context with both `memory.secrets_in_context` modes."""

from __future__ import annotations

import random
import string
from datetime import datetime, timezone

import pytest
from live_server import MODEL, EchoEngine, live

from milton.core.config import MemoryConfig
from milton.core.secrets import SecretFilter
from milton.core.store import open_store
from milton.memory.context import build_context
from milton.memory.memories import NewMemory, add_memory

_rng = random.Random(19)
KEY = "sk-proj-" + "".join(_rng.choice(string.ascii_letters + string.digits) for _ in range(48)) + "7"
SECRET_MEMORY = f"The user pasted their OpenAI key {KEY} for the Paris billing script."
PLAIN_MEMORY = "The user lives in Paris and cycles to work."
QUESTION = "What's the weather in Paris tomorrow?"  # unrelated to the key


def _remember(db, embedder) -> None:
    now = datetime.now(timezone.utc)
    for text in (SECRET_MEMORY, PLAIN_MEMORY):
        add_memory(db, embedder, NewMemory(text, category="fact", importance=0.9), now)


@pytest.mark.parametrize("mode", ["redact", "omit"])
def test_serve_never_injects_a_pasted_key(milton_home, embedder, mode):
    echo = EchoEngine()
    with live(milton_home, echo, serve__memory_budget_tokens="400", memory__secrets_in_context=mode) as srv:
        db = srv.db()
        try:
            _remember(db, embedder)
        finally:
            db.close()
        srv.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
        sent = echo.calls[-1][0]
        prompt = "\n".join(m["content"] for m in sent)
        assert sent[0]["role"] == "system" and "lives in Paris" in sent[0]["content"]  # memory is on
        assert KEY not in prompt and KEY[:16] not in prompt and KEY[-16:] not in prompt
        if mode == "redact":  # the memory was chosen, and went in with the key replaced
            assert "[REDACTED:openai_key] for the Paris billing script" in sent[0]["content"]
        else:
            assert "billing script" not in prompt and "REDACTED" not in prompt


def test_build_context_redacts_or_omits_and_uses_the_configured_patterns(tmp_path, embedder):
    db = open_store(tmp_path / "m.db")
    try:
        now = datetime.now(timezone.utc)
        _remember(db, embedder)
        add_memory(db, embedder, NewMemory("Door code for the Paris office is ACME-482913.",
                                           category="fact", importance=0.9), now)
        filt = SecretFilter([r"ACME-\d{6}"])
        redacted = build_context(db, embedder, QUESTION, MemoryConfig(), now, mark_used=False, secrets=filt)
        assert KEY not in redacted and "ACME-482913" not in redacted
        assert "[REDACTED:openai_key]" in redacted and "[REDACTED:custom]" in redacted
        omitted = build_context(db, embedder, QUESTION, MemoryConfig(secrets_in_context="omit"), now,
                                mark_used=False, secrets=filt)
        assert "lives in Paris" in omitted and "REDACTED" not in omitted
        assert "billing" not in omitted and "Door code" not in omitted
        # no filter given: the built-in detectors still guard the block
        default = build_context(db, embedder, QUESTION, MemoryConfig(), now, mark_used=False)
        assert KEY not in default and "ACME-482913" in default
    finally:
        db.close()
