"""The OpenAI-compatible API on a real uvicorn server on 127.0.0.1, driven by the official
``openai`` client (and httpx where raw status codes, headers or the SSE bytes matter).

The engine here is ``EchoEngine``, a scripted :class:`ChatEngine` double: these tests are about
the API layer (wire format, errors, limits, queue, cancellation, memory injection, session
logging); the end-to-end tests run the same API on the real llama.cpp engine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import numpy as np
import openai
import pytest
from helpers import assert_clean_error
from live_server import MODEL, EchoEngine, Live, live, wait_until

from milton.core.store import open_store
from milton.memory.memories import NewMemory, add_memory
from milton.serve.api.auth import check_bind, is_loopback
from milton.serve.engines.base import GenerationParams

EMBED = "all-MiniLM-L6-v2"


def messages_of(db, user: str) -> list[tuple[str, str, dict | None]]:
    return [(r[0], r[1], json.loads(r[2]) if r[2] else None) for r in db.execute(
        "select m.role, m.content, m.metadata from messages m join sessions s on s.id = m.session_id "
        "where s.user = ? order by m.id", [user])]


def sse_events(lines: Iterator[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


@pytest.fixture
def echo() -> EchoEngine:
    return EchoEngine()


# -- chat, streaming, models, telemetry -----------------------------------------------------
def test_chat_stream_models_and_sessions(milton_home, echo, embedder):
    with live(milton_home, echo, serve__memory_budget_tokens="0") as srv:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [MODEL, EMBED]
        assert client.models.retrieve(MODEL).owned_by == "milton"

        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
        reply = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0.2, top_p=0.5,
                                               max_tokens=50, seed=7, stop=["\n\n"], user="alice")
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == "echo: hello there"
        assert choice.finish_reason == "stop" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (4, 3, 7)
        sent, params = echo.calls[-1]
        assert sent == msgs  # memory off (budget 0): the engine got exactly what the client sent
        assert params == GenerationParams(max_tokens=50, temperature=0.2, top_p=0.5, stop=("\n\n",), seed=7)
        # max_tokens is honoured (finish_reason length); the default applies when none is given
        short = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count 9"}],
                                               max_tokens=3, user="bob")
        assert short.choices[0].message.content == "0 1 2 " and short.choices[0].finish_reason == "length"
        assert echo.calls[-1][1].max_tokens == 3

        # Streaming: role first, content deltas, finish_reason, usage, then [DONE].
        history = [*msgs, {"role": "assistant", "content": choice.message.content},
                   {"role": "user", "content": "and what about streams"}]
        stream = client.chat.completions.create(model=MODEL, messages=history, stream=True, user="alice",
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: and what about streams"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        # The same, raw: every event is `data: {...}` and the stream ends with `data: [DONE]`.
        with httpx.stream("POST", f"{srv.base}/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "messages": msgs, "stream": True, "user": "carol"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        deltas = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
        assert "".join(deltas) == reply.choices[0].message.content
        # Every generation ran on the one long-lived generation thread (llama.cpp's OpenMP
        # team is per calling thread: a thread per request paid for a new team each time).
        assert len(echo.threads) == 4 and set(echo.threads) == {echo.threads[0]}
        assert echo.threads[0] != threading.get_native_id()

        # Each exchange is logged to the user's session: only the new turn, never twice.
        db = srv.db()
        try:
            rows = wait_until(lambda: len(messages_of(db, "alice")) == 4 and messages_of(db, "alice"))
            assert [(r[0], r[1]) for r in rows] == [
                ("user", "hello there"), ("assistant", "echo: hello there"),
                ("user", "and what about streams"), ("assistant", "echo: and what about streams")]
            meta = rows[1][2]
            assert meta["model"] == MODEL and meta["finish_reason"] == "stop" and "incomplete" not in meta
            assert meta["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}
            sessions = db.execute("select user, source, status from sessions order by user").fetchall()
            assert sessions == [("alice", "serve", "open"), ("bob", "serve", "open"), ("carol", "serve", "open")]
        finally:
            db.close()
        # The session header wins over the user field.
        r = httpx.post(f"{srv.base}/v1/chat/completions", headers={"X-Milton-Session": "dave"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "user": "x"})
        assert r.status_code == 200 and r.headers["x-milton-session-id"] == r.json()["milton"]["session_id"]

        wait_until(lambda: srv.api.telemetry()["requests"]["chat"].get("200") == 5)  # streams: at their end
        tel = srv.api.telemetry()
        assert tel["tokens"]["completion"] > 0
        assert tel["engine_loaded"] and tel["latency"]["chat"]["p95_s"] is not None
        wait_until(lambda: srv.api.telemetry()["sessions"]["active"] == 4)
        metrics = httpx.get(f"{srv.base}/metrics").text
        assert 'milton_api_requests_total{endpoint="chat",status="200"} 5.0' in metrics
        assert "milton_chat_queue_depth 0.0" in metrics and "milton_chat_active_sessions 4.0" in metrics


def test_embeddings(milton_home, embedder):
    with live(milton_home, None) as srv:
        client = srv.client()
        texts = ["the cat sat on the mat", "quarterly revenue grew by ten percent"]
        result = client.embeddings.create(model=EMBED, input=texts)  # the client asks for base64
        got = np.array([d.embedding for d in result.data], dtype=np.float32)
        assert got.shape == (2, 384)
        assert np.allclose(got, embedder.encode(texts), atol=1e-5)
        assert result.usage.prompt_tokens > 0 and result.model == EMBED
        one = httpx.post(f"{srv.base}/v1/embeddings", json={"model": EMBED, "input": "hello",
                                                             "encoding_format": "float"}).json()
        assert len(one["data"][0]["embedding"]) == 384
        assert np.isclose(np.linalg.norm(one["data"][0]["embedding"]), 1.0, atol=1e-4)
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="x")
        for body in ({"model": EMBED}, {"model": EMBED, "input": []}, {"model": EMBED, "input": [[1, 2]]},
                     {"model": EMBED, "input": "x", "dimensions": 12}):
            r = httpx.post(f"{srv.base}/v1/embeddings", json=body)
            assert r.status_code == 400, (body, r.text)
        assert httpx.post(f"{srv.base}/v1/embeddings",
                          json={"model": EMBED, "input": ["x"] * 1000}).status_code == 413
        # no engine: embeddings work, chat says 503 with Retry-After
        r = httpx.post(f"{srv.base}/v1/chat/completions",
                       json={"model": srv.api.model_id(), "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "model_not_loaded"
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=srv.api.model_id(), messages=[{"role": "user", "content": "hi"}])


# -- errors, limits, auth ---------------------------------------------------------------------
def test_errors_have_openai_shape_and_status(milton_home, echo):
    env = {"serve__max_messages": "5", "serve__max_request_chars": "2000", "serve__max_body_bytes": "8192",
           "serve__max_tokens_limit": "100", "serve__memory_budget_tokens": "0"}
    with live(milton_home, echo, **env) as srv:
        url = f"{srv.base}/v1/chat/completions"
        ok_msgs = [{"role": "user", "content": "hi"}]

        def err(r: httpx.Response, status: int, param: str | None = None) -> dict:
            assert r.status_code == status, r.text
            body = r.json()
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
            if param is not None:
                assert body["error"]["param"] == param, body
            return body["error"]

        assert "JSON" in err(httpx.post(url, content=b'{"model": "echo-test", "messages": [', ), 400)["message"]
        err(httpx.post(url, content=b""), 400)
        err(httpx.post(url, json=[1, 2]), 400)
        err(httpx.post(url, json={"messages": ok_msgs}), 400, "model")
        err(httpx.post(url, json={"model": MODEL}), 400, "messages")
        err(httpx.post(url, json={"model": MODEL, "messages": "hi"}), 400, "messages")
        err(httpx.post(url, json={"model": MODEL, "messages": []}), 400, "messages")
        err(httpx.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400,
            "messages[0].role")
        err(httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": 5}]}), 400,
            "messages[0].content")
        for field, value in (("temperature", "hot"), ("temperature", 3), ("top_p", -1), ("max_tokens", 1.5),
                             ("max_tokens", 0), ("max_tokens", 101), ("stop", 7), ("seed", "x"),
                             ("stream", "yes"), ("n", 2), ("user", 5), ("milton", {"memory": "no"})):
            e = err(httpx.post(url, json={"model": MODEL, "messages": ok_msgs, field: value}), 400)
            assert e["param"].startswith(field), (field, e)
        e = err(httpx.post(url, json={"model": "gpt-4o", "messages": ok_msgs}), 404, "model")
        assert e["code"] == "model_not_found" and MODEL in e["message"]
        e = err(httpx.post(url, json={"model": MODEL, "messages": ok_msgs * 6}), 413, "messages")
        assert "serve.max_messages" in e["message"]
        e = err(httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 2500}]}),
                413)
        assert "serve.max_request_chars" in e["message"]
        e = err(httpx.post(url, json={"model": MODEL, "messages": ok_msgs, "pad": "x" * 20_000}), 413)
        assert "serve.max_body_bytes" in e["message"]
        err(httpx.get(f"{srv.base}/v1/nope"), 404)
        err(httpx.get(url), 405)

        client = srv.client()
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=ok_msgs)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=ok_msgs, temperature=9)
        assert "temperature" in str(bad.value)
        with pytest.raises(openai.APIStatusError) as big:
            client.chat.completions.create(model=MODEL, messages=ok_msgs * 6)
        assert big.value.status_code == 413
        # None of these reached the engine or the session log.
        assert echo.calls == []
        reply = client.chat.completions.create(model=MODEL, messages=ok_msgs)
        assert reply.choices[0].message.content == "echo: hi"
        assert srv.api.telemetry()["requests"]["chat"]["400"] >= 20


def test_api_key_required_when_set(milton_home, echo):
    with live(milton_home, echo, serve__api_key="s3cret-key", serve__memory_budget_tokens="0") as srv:
        msgs = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong-key").chat.completions.create(model=MODEL, messages=msgs)
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong-key").models.list()
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic s3cret-key"}):
            r = httpx.get(f"{srv.base}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{srv.base}/metrics").status_code == 401
        assert httpx.get(f"{srv.base}/ml/telemetry").status_code == 401
        assert httpx.get(f"{srv.base}/healthz").status_code == 200
        good = srv.client("s3cret-key")
        assert good.chat.completions.create(model=MODEL, messages=msgs).choices[0].message.content == "echo: hi"
        assert httpx.get(f"{srv.base}/metrics", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert len(echo.calls) == 1


def test_non_loopback_bind_needs_a_key(cli):
    code, _out, err = cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert code == 2
    assert_clean_error(err, "serve.host", "0.0.0.0", "serve.api_key")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and check_bind(host, "") is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert not is_loopback(host)
        check_bind(host, "a-key")  # with a key: allowed


# -- queue, timeouts, cancellation, shutdown -----------------------------------------------
def _stream_in_thread(base: str, body: dict, out: dict, key: str) -> threading.Thread:
    def run() -> None:
        status, events = None, []
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                              timeout=60) as r:
                status = r.status_code
                for line in r.iter_lines():
                    events += sse_events([line])
        except httpx.TransportError as exc:  # the server cut the stream (shutdown)
            events.append(f"<{type(exc).__name__}>")
        out[key] = (status, events)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_stream_interval_sends_tokens_together_but_the_first_at_once(milton_home, embedder):
    def contents(srv: Live, engine: EchoEngine, n: int) -> tuple[list[str], bool]:
        """The content of each stream event, and whether the first arrived while the engine
        was still generating."""
        got: list[str] = []
        early = None
        with httpx.stream("POST", f"{srv.base}/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "stream": True,
                                "messages": [{"role": "user", "content": f"count {n}"}]}) as r:
            for line in r.iter_lines():  # line by line: when each event arrives matters here
                event = line[len("data: "):] if line.startswith("data: ") else "[DONE]"
                if event != "[DONE]" and (text := json.loads(event)["choices"][0]["delta"].get("content")):
                    if early is None:
                        early = not engine.finished
                    got.append(text)
        return got, bool(early)

    expected = [f"{i} " for i in range(30)]
    engine = EchoEngine(delay=0.01)  # 30 tokens in ~0.3 s
    with live(milton_home, engine, serve__memory_budget_tokens="0", serve__stream_interval_ms="120") as srv:
        got, early = contents(srv, engine, 30)
    assert "".join(got) == "".join(expected)
    assert got[0] == "0 " and early  # the first token alone, before the rest was generated
    assert 2 <= len(got) <= 6  # then batches of ~120 ms, not 30 events
    engine = EchoEngine(delay=0.01)
    with live(milton_home, engine, serve__memory_budget_tokens="0", serve__stream_interval_ms="0") as srv:
        got, early = contents(srv, engine, 30)
    assert got == expected and early  # 0: an event per token


def test_queue_full_429_and_timeout_504(milton_home):
    engine = EchoEngine(delay=0.05)
    with live(milton_home, engine, serve__max_queue="1", serve__memory_budget_tokens="0") as srv:
        out: dict = {}
        def ask(text: str) -> dict:
            return {"model": MODEL, "messages": [{"role": "user", "content": text}]}

        first = _stream_in_thread(srv.base, ask("count 60"), out, "first")
        wait_until(engine.started.is_set)
        second = _stream_in_thread(srv.base, ask("count 3"), out, "second")
        wait_until(lambda: srv.api.gate.waiting == 1)
        r = httpx.post(f"{srv.base}/v1/chat/completions",
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert r.json()["error"]["code"] == "queue_full" and "serve.max_queue" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            srv.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        first.join(30)
        second.join(30)
        for key, n in (("first", 60), ("second", 3)):  # the queued ones were served in turn
            status, events = out[key]
            assert status == 200 and events[-1] == "[DONE]"
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
            assert text == "".join(f"{i} " for i in range(n))
        assert srv.api.telemetry()["rejected_queue_full"] == 2
    engine = EchoEngine(delay=0.05)
    with live(milton_home, engine, serve__request_timeout_s="0.5", serve__memory_budget_tokens="0") as srv:
        r = httpx.post(f"{srv.base}/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "count 200"}]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        wait_until(lambda: engine.cancelled == [0])  # the generation was stopped, not left running
        assert srv.api.telemetry()["cancelled"] == {"timeout": 1}


def test_client_disconnect_cancels_generation(milton_home, embedder):
    engine = EchoEngine(delay=0.02)
    with live(milton_home, engine, serve__memory_budget_tokens="0") as srv:
        client = srv.client()
        stream = client.chat.completions.create(model=MODEL, user="erin", stream=True,
                                                messages=[{"role": "user", "content": "count 5000"}])
        got = []
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
            if len(got) >= 10:
                break
        stream.close()  # the client goes away mid-stream
        wait_until(lambda: engine.cancelled == [0])
        assert engine.finished == []
        # What was generated is still logged, flagged as incomplete.
        db = srv.db()
        try:
            rows = wait_until(lambda: len(messages_of(db, "erin")) == 2 and messages_of(db, "erin"))
        finally:
            db.close()
        assert rows[0][:2] == ("user", "count 5000")
        role, content, meta = rows[1]
        assert role == "assistant" and content.startswith("".join(got)) and len(content) < 5 * 5000
        assert meta["incomplete"] is True and meta["cancel_reason"] == "client_disconnected"
        assert srv.api.telemetry()["cancelled"] == {"client_disconnected": 1}
        # The model slot was handed back: the next request is served.
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}])
        assert reply.choices[0].message.content == "echo: again"
        # A non-streaming client that gives up is noticed too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.base}/v1/chat/completions", timeout=0.5,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "count 5000"}]})
        wait_until(lambda: engine.cancelled == [0, 2])
        assert srv.api.telemetry()["cancelled"] == {"client_disconnected": 2}


def test_shutdown_finishes_or_cancels_in_flight(milton_home, embedder):
    # A generation that fits in the grace period completes; the exchange is logged.
    engine = EchoEngine(delay=0.03)
    body = {"model": MODEL, "user": "fay", "messages": [{"role": "user", "content": "count 40"}]}
    out: dict = {}
    with live(milton_home, engine, serve__shutdown_grace_s="20", serve__memory_budget_tokens="0") as srv:
        thread = _stream_in_thread(srv.base, body, out, "done")
        wait_until(engine.started.is_set)
        srv.server.should_exit = True  # what SIGTERM does
    thread.join(30)
    status, events = out["done"]
    assert status == 200 and events[-1] == "[DONE]" and engine.finished == [0]
    db = open_store(srv.settings.db_path)
    try:
        assert [r[0] for r in messages_of(db, "fay")] == ["user", "assistant"]
        assert messages_of(db, "fay")[1][1] == "".join(f"{i} " for i in range(40))
    finally:
        db.close()
    # One that does not is cancelled at the end of the grace period; what it said is logged.
    engine = EchoEngine(delay=0.03)
    body = {"model": MODEL, "user": "gus", "messages": [{"role": "user", "content": "count 5000"}]}
    with live(milton_home, engine, serve__shutdown_grace_s="0.5", serve__memory_budget_tokens="0") as srv:
        thread = _stream_in_thread(srv.base, body, out, "cut")
        wait_until(engine.started.is_set)
        srv.server.should_exit = True
    thread.join(30)
    assert engine.cancelled == [0] and engine.finished == []
    assert out["cut"][1][-1] == "<RemoteProtocolError>" and len(out["cut"][1]) > 2
    db = open_store(srv.settings.db_path)
    try:
        rows = messages_of(db, "gus")  # flushed before the server stopped: no waiting needed
        assert [r[0] for r in rows] == ["user", "assistant"]
        assert rows[1][2]["cancel_reason"] == "shutdown" and rows[1][2]["incomplete"] is True
    finally:
        db.close()


# -- memory in the loop -------------------------------------------------------------------------
def test_memory_injected_unless_opted_out(milton_home, echo, embedder):
    with live(milton_home, echo, serve__memory_budget_tokens="300") as srv:
        db = srv.db()
        try:
            now = datetime.now(timezone.utc)
            add_memory(db, embedder, NewMemory("The user's cat is called Biscuit and is ginger.",
                                               category="fact", importance=0.9), now)
            add_memory(db, embedder, NewMemory("Quarterly tax filings are due on the 15th.",
                                               category="fact"), now)
        finally:
            db.close()
        client = srv.client()
        ask = [{"role": "user", "content": "What is my cat called?"}]
        client.chat.completions.create(model=MODEL, messages=ask)
        system = echo.calls[-1][0][0]
        assert system["role"] == "system" and "Relevant memories" in system["content"]
        assert "Biscuit" in system["content"]
        assert echo.calls[-1][0][1:] == ask
        # A client system prompt is kept, memories appended to it.
        client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be terse."}, *ask])
        sent = echo.calls[-1][0]
        assert len(sent) == 2 and sent[0]["content"].startswith("Be terse.\n\n")
        assert "Biscuit" in sent[0]["content"]
        # Opting out: the header, or the body's milton extension.
        client.chat.completions.create(model=MODEL, messages=ask, extra_headers={"X-Milton-Memory": "off"})
        assert echo.calls[-1][0] == ask
        client.chat.completions.create(model=MODEL, messages=ask, extra_body={"milton": {"memory": False}})
        assert echo.calls[-1][0] == ask
        tel = srv.api.telemetry()["memory_injection"]
        assert tel["count"] == 2 and tel["skipped"] == 2 and tel["items"] >= 2
        assert tel["p50_ms"] is not None and tel["p95_ms"] >= tel["p50_ms"]
        assert "milton_memory_injection_seconds_count 2.0" in httpx.get(f"{srv.base}/metrics").text


def test_idle_session_is_processed_into_memory(milton_home, echo, embedder):
    # 0.05 minutes = 3 s idle; the expiry timer ticks every 0.75 s.
    with live(milton_home, echo, memory__session_idle_minutes="0.05", serve__memory_budget_tokens="0") as srv:
        client = srv.client()
        first = [{"role": "user", "content": "How do I undo the last git commit?"}]
        a = client.chat.completions.create(model=MODEL, messages=first, user="hal")
        second = [*first, {"role": "assistant", "content": a.choices[0].message.content},
                  {"role": "user", "content": "And keep the changes staged?"}]
        client.chat.completions.create(model=MODEL, messages=second, user="hal")
        db = srv.db()
        try:
            row = wait_until(lambda: db.execute("select id, status from sessions where user = 'hal' and "
                                                "status = 'processed'").fetchone(), timeout=20)
            assert len(messages_of(db, "hal")) == 4
            memories = db.execute("select tier, category, content from memories where session_id = ? "
                                  "order by id", [row[0]]).fetchall()
        finally:
            db.close()
        assert [(m[0], m[1]) for m in memories] == [("short", "exchange")] * 2
        assert memories[0][2].startswith("User: How do I undo the last git commit?")
        # The timer counts the session once processing has returned, just after the commit seen above.
        wait_until(lambda: srv.api.telemetry()["sessions"]["ended_on_idle"] >= 1, timeout=5)
        assert srv.api.telemetry()["sessions"]["ended_on_idle"] == 1
        # The next message from the same user starts a new session.
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], user="hal")
        db = srv.db()
        try:
            wait_until(lambda: db.execute("select count(*) from sessions where user = 'hal'").fetchone()[0] == 2)
        finally:
            db.close()


# -- the same API on the real llama.cpp engine (a tiny GGUF built here) -------------------------
def test_real_llama_engine_through_the_openai_client(milton_home, tiny_gguf, embedder):
    from milton.serve.engines.llama import LlamaEngine

    engine = LlamaEngine(tiny_gguf, n_ctx=512, n_threads=1)
    try:
        with live(milton_home, engine, serve__memory_budget_tokens="200") as srv:
            db = srv.db()
            try:
                add_memory(db, embedder, NewMemory("The build server is called zephyr-07.", category="fact"),
                           datetime.now(timezone.utc))
            finally:
                db.close()
            client = srv.client()
            model = client.models.list().data[0].id
            assert model == "tiny"  # from the file name
            ask = [{"role": "user", "content": "What is the build server called?"}]
            opts = {"model": model, "messages": ask, "temperature": 0.0, "max_tokens": 12, "user": "ivy"}
            plain = client.chat.completions.create(**opts, extra_headers={"X-Milton-Memory": "off"})
            full = client.chat.completions.create(**opts)
            assert full.usage.prompt_tokens > plain.usage.prompt_tokens + 5  # the memory block went in
            assert full.choices[0].finish_reason in ("stop", "length")
            assert full.usage.completion_tokens <= 12
            chunks = list(client.chat.completions.create(**opts, stream=True,
                                                         stream_options={"include_usage": True}))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == full.choices[0].message.content  # greedy: the same answer, streamed
            assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
            # A prompt longer than the context: a 400, not a crash.
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 900}])
            assert err.value.body["code"] == "context_length_exceeded" and "serve.n_ctx" in err.value.message
            # Streaming too: the stream starts with the first token, so the error has its status.
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model=model, stream=True,
                                               messages=[{"role": "user", "content": "word " * 900}])
            assert err.value.body["code"] == "context_length_exceeded"
            db = srv.db()
            try:
                rows = wait_until(lambda: len(messages_of(db, "ivy")) == 6 and messages_of(db, "ivy"))
            finally:
                db.close()
            assert [r[0] for r in rows] == ["user", "assistant"] * 3
            assert rows[3][2]["memory_items"] >= 1 and rows[1][2]["memory"] is False
    finally:
        engine.close()
