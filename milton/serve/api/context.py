"""What the /v1 API adds to a chat beyond generating it: memory in, the conversation out.

:class:`ChatMemory` finds the memories relevant to a request and puts them in its system prompt
(sized to what the context has left; opt out with ``X-Milton-Memory: off`` or
``{"milton": {"memory": false}}``), logs every exchange to its session (keyed by
``X-Milton-Session``, ``milton.session`` or the ``user`` field) on a thread of its own, and ends
sessions idle past ``memory.session_idle_minutes`` from a timer thread, processing them into
short-term memory, so every conversation becomes memory and training data. It also holds the
embedding model that ``/v1/embeddings`` answers with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlite_utils

from milton.core.config import Settings
from milton.core.log import get_logger, log_event
from milton.core.secrets import SecretFilter, secret_filter_for
from milton.core.store import connect
from milton.core.timeutil import utcnow
from milton.memory.context import build_context, estimate_tokens
from milton.memory.embed import Embedder, embedder_for
from milton.memory.sessions import SessionTracker
from milton.serve.api.job import ChatJob
from milton.serve.api.metrics import ApiMetrics
from milton.serve.engines.base import ChatEngine, GenerationParams, Usage

logger = get_logger("serve.api")

SESSION_SOURCE = "serve"
CTX_MARGIN = 32  # tokens kept free when the memory block is sized against the context


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


class ChatMemory:
    """Memory injection, session logging and idle-session expiry for the /v1 API; see the module
    docstring. Resources (the embedder, the store connections) are made on first use, on a
    worker thread."""

    def __init__(self, settings: Settings, metrics: ApiMetrics, *, background: bool = True) -> None:
        self.settings = settings
        self.metrics = metrics
        self.background = background
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self._tracker: SessionTracker | None = None
        self._tracker_lock = threading.Lock()
        self._reader: sqlite_utils.Database | None = None
        self._reader_lock = threading.Lock()
        self._log_pool = ThreadPoolExecutor(1, thread_name_prefix="session-log")
        self._seen: dict[str, float] = {}  # session id -> monotonic time of its last exchange
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._secrets: SecretFilter | None = None  # made with the embedder, on a worker thread

    # -- lazily created resources (worker threads) -------------------------------------------
    def embedder(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = embedder_for(self.settings.memory)
            return self._embedder

    def _tracker_get(self) -> SessionTracker:
        with self._tracker_lock:
            if self._tracker is None:
                embedder = self.embedder()
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

    def _log_exchange(self, job: ChatJob, reply: str, meta: dict[str, Any]) -> None:
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

    def submit_log(self, job: ChatJob, reply: str, finish_reason: str | None, usage: Usage | None,
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
    def lookup_session(self, job: ChatJob) -> None:
        """The session this request is logged to (worker thread)."""
        try:
            job.session_id = self._tracker_get().session_for_user(job.key)
        except Exception as exc:  # noqa: BLE001 - answer without a session rather than not at all
            self.metrics.fallback("session")
            log_event(logger, "session lookup failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")

    def prepare(self, job: ChatJob, engine: ChatEngine) -> list[dict[str, str]]:
        """Session lookup and memory injection (worker thread); the messages for the engine."""
        self.lookup_session(job)
        return self.messages(job, engine)

    def injects(self, job: ChatJob) -> bool:
        return job.memory and self.settings.serve.memory_budget_tokens > 0

    def messages(self, job: ChatJob, engine: ChatEngine) -> list[dict[str, str]]:
        messages = [dict(m) for m in job.req.messages]
        if not job.memory:
            self.metrics.memory_skipped()
        if not self.injects(job):
            return messages
        try:
            return self._inject(messages, engine, job)
        except Exception as exc:  # noqa: BLE001 - answer without memories rather than not at all
            self.metrics.fallback("memory")
            log_event(logger, "memory injection failed", level=logging.ERROR,
                      error=f"{type(exc).__name__}: {exc}")
            return messages

    async def session_ready(self, job: ChatJob) -> None:
        """Wait for a session lookup started beside the generation (it never raises)."""
        if job.lookup is not None:
            await job.lookup

    def _budget(self, messages: list[dict[str, str]], engine: ChatEngine, params: GenerationParams) -> int:
        budget = self.settings.serve.memory_budget_tokens
        n_ctx = engine.info().extra.get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            prompt = sum(engine.count_tokens(m["content"]) + 4 for m in messages)
            budget = min(budget, n_ctx - prompt - params.max_tokens - CTX_MARGIN)
        return budget

    def _inject(self, messages: list[dict[str, str]], engine: ChatEngine, job: ChatJob) -> list[dict[str, str]]:
        budget = self._budget(messages, engine, job.req.params)
        if budget <= estimate_tokens("x" * 80):
            return messages
        embedder = self.embedder()
        t0 = time.perf_counter()
        with self._reader_lock:
            if self._secrets is None:
                self._secrets = secret_filter_for(self.settings)
            block = build_context(self._reader_db(), embedder, _query(messages), self.settings.memory,
                                  utcnow(), budget_tokens=budget, secrets=self._secrets)
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

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """The session-expiry timer (unless ``background`` is off: tests)."""
        if self.background:
            self._timer = threading.Thread(target=self._expire_loop, name="session-expiry", daemon=True)
            self._timer.start()

    async def stop(self, wait_s: float) -> None:
        """Stop the timer and write out the exchanges still queued for the session log."""
        self._stop.set()
        if self._timer is not None:
            await asyncio.to_thread(self._timer.join, wait_s)
        await asyncio.to_thread(self._log_pool.shutdown, True)

    def close(self) -> None:
        """Close the store connections (after :meth:`stop`)."""
        for db in (self._tracker.db if self._tracker else None, self._reader):
            if db is not None:
                try:
                    db.close()
                except Exception:  # noqa: BLE001 - closing at shutdown: nothing left to do about it
                    pass
