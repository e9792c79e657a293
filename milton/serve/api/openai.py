"""The OpenAI-compatible API: ``POST /v1/chat/completions`` (streaming too), ``GET /v1/models``,
``POST /v1/embeddings``, and Milton's ``POST /v1/feedback`` (rate an answer by its id).

A chat request is validated and size-limited (400/413), checked against the served model (404),
admitted to the bounded queue in front of the one model context (429 when full, 503 while no
model is loaded), given the relevant memories in its system prompt (opt out with the header
``X-Milton-Memory: off`` or ``{"milton": {"memory": false}}``), generated on a worker thread
that a client disconnect, the request timeout or shutdown cancels, and logged to its session
(keyed by ``X-Milton-Session``, ``milton.session`` or the ``user`` field). Sessions idle past
``memory.session_idle_minutes`` are ended and processed into short-term memory by a timer thread,
so every conversation becomes memory and training data.

:class:`OpenAIService` is the HTTP side: routes, the queue (:mod:`milton.serve.api.queue`), the
generation thread and streaming, cancellation, metrics and shutdown. What a chat adds beyond
generating (memories in, the session log out, idle sessions ended) is
:class:`~milton.serve.api.context.ChatMemory`; embeddings are
:class:`~milton.serve.api.embeddings.Embeddings`. The app mounts it with :func:`mount_openai`;
it only talks to a :class:`~milton.serve.engines.base.ChatEngine`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from milton.core.config import Settings
from milton.core.log import get_logger, log_event
from milton.memory.context import estimate_tokens
from milton.models.refs import default_model_id
from milton.serve.api.auth import ApiKeyMiddleware
from milton.serve.api.context import ChatMemory
from milton.serve.api.embeddings import Embeddings
from milton.serve.api.errors import ApiError, v1_http_errors
from milton.serve.api.feedback import Feedback
from milton.serve.api.job import ChatJob
from milton.serve.api.metrics import ApiMetrics
from milton.serve.api.queue import QueueFull, RequestQueue
from milton.serve.api.schema import (
    CHAT_SCHEMA,
    EMBEDDINGS_SCHEMA,
    FEEDBACK_SCHEMA,
    chunk_body,
    completion_body,
    json_body,
    parse_chat,
    read_json,
    sse,
    usage_chunk,
)
from milton.serve.api.worker import GenerationThread
from milton.serve.engines.base import ChatEngine, Chunk, Usage

logger = get_logger("serve.api")

MEMORY_OFF = frozenset({"off", "0", "false", "no"})
POLL_S = 0.2  # how often a waiting request checks whether its client is still there
_END = object()


@dataclass
class _Failure:
    exc: BaseException


class _Disconnected(Exception):
    pass


class _TimedOut(Exception):
    pass


def _ms(at: float | None, since: float) -> float | None:
    return round((at - since) * 1e3, 3) if at is not None else None


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
        self.gate = RequestQueue(self.serve.max_queue)  # named gate: tests and telemetry read it
        self.memory = ChatMemory(settings, self.metrics, background=background)
        self.embeddings = Embeddings(settings, self.memory, self.metrics)
        self.feedback = Feedback(settings, self.metrics)
        self.started = int(time.time())
        self.closing = False
        self._inflight: dict[str, threading.Event] = {}
        self._generator = GenerationThread()
        self._workers: set[str] = set()  # ids of the requests whose generation has not ended
        self._avg_gen_s = 5.0
        self.metrics.bind(lambda: self.gate.waiting, lambda: self.gate.active,
                          self.memory.active_sessions)
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

    # -- generation -------------------------------------------------------------------------
    def _start(self, engine: ChatEngine, messages: list[dict[str, str]], job: ChatJob,
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

    def _record_generation(self, job: ChatJob, usage: Usage | None) -> None:
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
        except Exception as exc:  # a bug: answer in the API's shape, keep the trace (logged)
            logger.exception("chat request failed")
            self.metrics.request("chat", 500, time.perf_counter() - t0)
            return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    async def _chat(self, request: Request, t0: float) -> Response:
        serve = self.serve
        req = parse_chat(await read_json(request), serve)
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
        job = ChatJob(rid=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_id(),
                   req=req, key=key[:200] if key else None, memory=memory, t0=t0,
                   deadline=time.monotonic() + serve.request_timeout_s)
        self._inflight[job.rid] = job.cancel
        started = False
        try:
            if self.memory.injects(job):
                messages = await self._race(asyncio.to_thread(self.memory.prepare, job, engine), request,
                                            job.deadline)
            else:  # the prompt needs nothing from the store: find the session while it is read
                job.lookup = asyncio.ensure_future(asyncio.to_thread(self.memory.lookup_session, job))
                messages = self.memory.messages(job, engine)
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

    async def _stream_response(self, job: ChatJob, queue: asyncio.Queue, request: Request) -> Response:
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
        await self.memory.session_ready(job)
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

    def _stop_job(self, job: ChatJob, reason: str, text: str, usage: Usage | None) -> None:
        """A generation ended before its answer was complete: stop it, count it, and log what
        was said (flagged incomplete)."""
        job.cancel.set()
        self._inflight.pop(job.rid, None)
        self.metrics.cancel(reason)
        self.memory.submit_log(job, text, "cancelled", usage, reason)

    def _cut_short(self, job: ChatJob, reason: str, text: str, usage: Usage | None) -> Response:
        """:meth:`_stop_job`, then 499 for a client that left; raises the error for the others."""
        self._stop_job(job, reason, text, usage)
        if reason == "client_disconnected":
            self.metrics.request("chat", 499, time.perf_counter() - job.t0)
            return Response(status_code=499)
        if reason == "timeout":
            raise self._timeout_error()
        raise self._cancelled_error()

    def _shut_out(self, job: ChatJob, text: str) -> None:
        """uvicorn cancelled the request handler (shutdown, or the client left): stop and count."""
        self._stop_job(job, "shutdown" if self.closing else "client_disconnected", text, None)
        self.metrics.request("chat", 499, time.perf_counter() - job.t0)

    async def _complete(self, job: ChatJob, queue: asyncio.Queue, request: Request) -> Response:
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
            await self.memory.session_ready(job)
            self._record_generation(job, usage)
            self.memory.submit_log(job, text, finish, usage)
            body = completion_body(job.rid, job.created, job.model, text, finish, usage,
                                   self._extension(job, final))
            self.metrics.request("chat", 200, time.perf_counter() - job.t0)
            headers = {"X-Milton-Session-Id": job.session_id} if job.session_id else None
            return JSONResponse(body, headers=headers)
        finally:
            self._inflight.pop(job.rid, None)

    async def _stream(self, job: ChatJob, queue: asyncio.Queue, first: Any) -> AsyncIterator[bytes]:
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
                self.memory.submit_log(job, text, final.finish_reason if final else "stop", usage)
            else:
                job.cancel.set()
                if reason is not None:
                    self.metrics.cancel(reason)
                    self.memory.submit_log(job, text, "cancelled", usage, reason)
            self.metrics.request("chat", status, time.perf_counter() - job.t0)

    @staticmethod
    def _extension(job: ChatJob, final: Chunk | None) -> dict[str, Any]:
        """The response's ``milton`` object (the last chunk's, when streaming): which session
        it was logged to, how many memories went in and how long finding them took, and which
        adapter answered (None = the bare base), so a client can tell exactly what served it
        across hot swaps and where its latency went."""
        return {"session_id": job.session_id, "memory_items": job.memory_items,
                "memory_ms": round(job.memory_s * 1e3, 3) if job.memory_s is not None else None,
                "adapter": getattr(final, "adapter_version", None),
                "queue_ms": _ms(job.gen_start, job.t0), "first_token_ms": _ms(job.first_token, job.t0)}

    def _abandon(self, job: ChatJob) -> None:
        """The response ended before its stream started (the client left at once): stop the
        generation that was started for it."""
        if not job.streaming and job.rid in self._inflight:
            job.cancel.set()
            self._inflight.pop(job.rid, None)
            self.metrics.cancel("client_disconnected")
            self.metrics.request("chat", 499, time.perf_counter() - job.t0)

    def models(self) -> list[dict[str, Any]]:
        ids = [self.model_id()]
        try:
            ids.append(self.embeddings.model_id())
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
            except Exception as exc:  # noqa: BLE001 - telemetry reports an engine in trouble
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
        self.memory.start()

    async def stop(self, wait_s: float = 10.0) -> None:
        """Cancel what still runs (uvicorn has already let in-flight requests finish for
        serve.shutdown_grace_s), let handlers log what was generated, flush the session log."""
        self.closing = True
        for cancel in list(self._inflight.values()):
            cancel.set()
        deadline = time.monotonic() + wait_s
        while (self._inflight or self._workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.memory.stop(wait_s)
        self._generator.close(timeout=0 if self._workers else wait_s)
        self.memory.close()
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
        router.add_api_route("/chat/completions", self.chat, methods=["POST"],
                             openapi_extra=json_body(CHAT_SCHEMA))
        router.add_api_route("/embeddings", self.embeddings.create, methods=["POST"],
                             openapi_extra=json_body(EMBEDDINGS_SCHEMA))
        router.add_api_route("/feedback", self.feedback.create, methods=["POST"],
                             openapi_extra=json_body(FEEDBACK_SCHEMA))

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
                 registry: CollectorRegistry | None = None, background: bool = True,
                 own_auth: tuple[str, ...] = ()) -> OpenAIService:
    """Add the /v1 API to ``app``: its router (with its own lifespan: the session-expiry timer,
    and on shutdown cancel + flush), bearer auth on every route but /healthz when
    ``serve.api_key`` is set, and OpenAI-shaped 404/405s under /v1. ``registry``: the app's
    Prometheus registry (so /metrics shows the API's series). ``engine`` may come later through
    :meth:`OpenAIService.set_engine`. ``background=False`` skips the expiry timer (tests).
    ``own_auth``: path prefixes that authenticate themselves (bearer auth leaves them alone)."""
    service = OpenAIService(settings, engine, registry=registry, background=background)
    app.include_router(service.router)
    key = settings.serve.api_key.get_secret_value()
    if key:
        app.add_middleware(ApiKeyMiddleware, key=key, own_auth=own_auth)
    app.add_exception_handler(StarletteHTTPException, v1_http_errors)
    app.state.openai = service
    return service
