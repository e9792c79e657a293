"""The default assistant on a base model: the few-shot frame, the stop at the next turn, the
loop guard (an untrained tiny model, which loops), and the packaged Gemma 3 270M answering
simple questions correctly through a real ``milton serve`` and the ``openai`` client, with
memory injection still putting what the user taught into the answer."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import openai
import pytest
from live_server import wait_until
from tiny_lm import build_tiny_gguf

from milton.models.prompt import PLAIN_STOP, few_shot_prompt, loop_start
from milton.serve.engines.base import GenerationParams
from milton.serve.engines.llama import LlamaEngine
from milton.serve.process import live_server

ASK = [{"role": "user", "content": "What do bees make?"}]


@pytest.fixture(scope="module")
def untrained_gguf(tmp_path_factory) -> Path:
    """A tiny Llama without a chat template and without pre-training: greedy, it loops."""
    _, gguf = build_tiny_gguf(tmp_path_factory.mktemp("untrained"), [], name="untrained",
                              hidden_size=32, heads=2, intermediate_size=64, pretrain_steps=0,
                              chat_template=False, seed=1)
    return gguf


def _answer(engine: LlamaEngine, params: GenerationParams) -> tuple[str, str | None, int]:
    chunks = list(engine.chat(ASK, params))
    last = chunks[-1]
    return "".join(c.text for c in chunks), last.finish_reason, last.usage.completion_tokens


def test_a_model_without_a_template_gets_the_few_shot_prompt_and_its_answers_are_cut(untrained_gguf):
    # auto -> few-shot for a model without tokenizer.chat_template; the loop guard ends the
    # looping answer of the untrained model, which plain (no guard) lets run to the limit.
    # (The guard's cut itself is tested on exact text in test_prompt_format.py.)
    budget = GenerationParams(max_tokens=120, temperature=0.0)
    runs = {}
    for fmt in ("auto", "plain"):
        engine = LlamaEngine(untrained_gguf, n_ctx=512, n_threads=1, chat_format=fmt)
        try:
            ids, mode = engine.render_prompt(ASK)
            runs[fmt] = (mode, ids, engine.info().extra["chat_format"], *_answer(engine, budget))
            if fmt == "auto":
                llm = engine._base.llm
                assert ids == llm.tokenize(few_shot_prompt(ASK).encode(), add_bos=True, special=False)
        finally:
            engine.close()
    mode, _, reported, text, finish, tokens = runs["auto"]
    assert mode == reported == "few-shot"
    assert finish == "stop" and tokens < budget.max_tokens, text
    assert loop_start(text) is None and PLAIN_STOP not in text
    mode, _, _, plain_text, plain_finish, _ = runs["plain"]
    assert mode == "plain"
    assert plain_finish == "length", plain_text  # no guard: it runs to the limit


# -- the packaged Gemma through serve ----------------------------------------------------------
QUESTIONS = [("What is the capital of France?", "Paris"),
             ("What do bees make?", "honey"),       # plain prompt: the question repeated
             ("What color is the sky on a clear day?", "blue")]  # plain: "I'm not sure."


def _ready(client: openai.OpenAI) -> str:
    """The served model id, once chat answers (it says 503 while the model loads)."""
    def answers() -> str | None:
        try:
            model = client.models.list().data[0].id
            client.chat.completions.create(model=model, max_tokens=1,
                                           messages=[{"role": "user", "content": "Hi"}])
            return model
        except openai.InternalServerError:
            return None
    return wait_until(answers, timeout=240, step=0.3)


def test_packaged_gemma_answers_simple_questions_through_serve(milton_home, embedder):
    from milton.core.store import open_store
    from milton.memory.memories import NewMemory, add_memory

    db = open_store(milton_home / "data" / "milton.db")
    try:
        add_memory(db, embedder, NewMemory("The user's cat is named Quillon.", category="fact",
                                           importance=0.9), datetime.now(timezone.utc))
    finally:
        db.close()
    with live_server(milton_home, {"MILTON_SERVE__SNAPSHOT_ENABLED": "false",
                                   "MILTON_SERVE__N_CTX": "1024"}, timeout=120) as srv:
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0,
                               timeout=120)
        model = _ready(client)
        for question, expected in QUESTIONS:
            reply = client.chat.completions.create(
                model=model, temperature=0, max_tokens=32,
                messages=[{"role": "user", "content": question}],
                extra_headers={"X-Milton-Memory": "off"})
            text = reply.choices[0].message.content or ""
            assert expected.lower() in text.lower(), (question, text)
            assert reply.choices[0].finish_reason == "stop" and "User:" not in text
        # Memory injection still reaches the model inside the few-shot frame.
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=32,
            messages=[{"role": "user", "content": "What is my cat's name?"}])
        assert "Quillon" in (reply.choices[0].message.content or ""), reply.choices[0].message.content
