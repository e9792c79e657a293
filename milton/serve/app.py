"""`milton serve`: the long-running process, wired together here.

The OpenAI-compatible assistant (/v1, with memory and session logging, adapter hot swap:
:mod:`milton.serve.api`, its engine opened by :mod:`milton.serve.lifecycle`), anomaly scoring
with live snapshots and alerts, the alert list and the fleet agents' push endpoint
(:mod:`milton.serve.anomaly`), telemetry, Prometheus metrics,
``data/serve.json`` for ``milton status``, and hot reload of every model kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from milton import __version__
from milton.core.config import Settings
from milton.core.log import get_logger, log_event
from milton.core.serve_state import write_serve_state
from milton.core.store import open_store
from milton.core.timeutil import iso, utcnow
from milton.serve.anomaly import (
    SnapshotLoop,
    anomaly_model,
    anomaly_telemetry,
    export_anomaly_metrics,
    mount_alerts,
    mount_push,
    mount_scoring,
)
from milton.serve.api.errors import error_body
from milton.serve.api.openai import mount_openai
from milton.serve.guard import BodyLimitMiddleware, uvicorn_config
from milton.serve.lifecycle import EngineLifecycle
from milton.serve.metrics import Metrics

logger = get_logger("serve")


@dataclass(frozen=True)
class Extension:
    """Routes that a layer above serve composes into it (``milton serve`` adds the dashboard
    from :mod:`milton.web`; serve itself never imports that layer)."""

    prefix: str  #: the paths it serves; it authenticates them itself (bearer auth skips them)
    attach: Callable[[FastAPI, Settings], None]


def create_app(settings: Settings, *, background: bool = True, engine: Any = None,
               extensions: Sequence[Extension] = ()) -> FastAPI:
    """Build the app. ``background=False`` (tests) skips the watcher and snapshot threads.
    ``engine``: a :class:`milton.serve.engines.base.ChatEngine` for /v1 (or set it later through
    ``app.state.openai.set_engine``); without one, chat requests get 503. ``extensions``: more
    routes on the same port (see :class:`Extension`)."""
    metrics = Metrics()
    hot = anomaly_model(settings)
    snapshots = SnapshotLoop(settings, hot, metrics)
    started = iso(utcnow())

    llm = EngineLifecycle(settings, enabled=engine is None and background and settings.serve.chat_enabled)

    def health() -> dict[str, Any]:
        """ok, or degraded with the reasons: a part that should serve and does not."""
        reasons = []
        if llm.status == "degraded":
            reasons.append(llm.error)
        if hot.degraded:
            reasons.append(f"anomaly model: {hot.degraded}")
        return {"status": "degraded" if reasons else "ok", "reasons": reasons}

    published: dict[str, Any] = {}

    def current_state(status: str) -> dict[str, Any]:
        state = health()
        return {"status": status, "health": state["status"], "reasons": state["reasons"],
                "chat": llm.status, "chat_error": llm.error}

    def publish_state(status: str) -> None:
        """data/serve.json for `milton status` / `milton doctor` (never fails serve)."""
        state = current_state(status)
        try:
            write_serve_state(settings.paths.data_dir, {
                **state, "started": started, "version": __version__, "updated": iso(utcnow())})
            published["state"] = state
        except OSError as exc:
            log_event(logger, "cannot write serve state", level=logging.WARNING, error=str(exc))

    async def keep_state_current() -> None:
        """Health changes after start-up too (a fallback healed by a new anomaly model, a
        reason added): rewrite serve.json whenever what it says is no longer true."""
        while True:
            await asyncio.sleep(max(0.5, settings.serve.reload_poll_s))
            if current_state("running") != published.get("state"):
                await asyncio.to_thread(publish_state, "running")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        open_store(settings.db_path, settings.store.busy_timeout_ms).close()  # migrate up front
        if background:
            hot.start()
            if settings.serve.snapshot_enabled:
                snapshots.start()
        else:
            hot.check()
        publish_state("running")

        def open_llm() -> None:
            llm.open(app.state.openai)
            publish_state("running")

        # The language model loads off the event loop; scoring works meanwhile, /v1 says 503.
        loading = asyncio.create_task(asyncio.to_thread(open_llm))
        watching = asyncio.create_task(keep_state_current())
        log_event(logger, "serve started", version=__version__,
                  model=(hot.get().version if hot.get() else None))
        yield
        watching.cancel()
        await loading
        llm.close(app.state.openai)
        snapshots.stop()
        hot.stop()
        publish_state("stopped")
        log_event(logger, "serve stopped")

    app = FastAPI(title="Milton", version=__version__, lifespan=lifespan)
    app.state.hot = hot
    app.state.snapshots = snapshots
    app.state.metrics = metrics
    app.state.llm = llm

    # -- the OpenAI-compatible API (/v1): router with its own lifespan, bearer auth ---------
    mount_openai(app, settings, engine, registry=metrics.registry, background=background,
                 own_auth=tuple(e.prefix for e in extensions))
    for extension in extensions:
        extension.attach(app, settings)
    # Outermost: every body is bounded while it streams in, before auth or any route reads it.
    app.add_middleware(BodyLimitMiddleware, serve=settings.serve)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug anywhere: JSON in the API's error shape rather than a plain-text 500 (the
        traceback is still logged)."""
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    app.add_exception_handler(Exception, internal_error)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        loaded = hot.get()
        return {**health(), "version": __version__,
                "anomaly_model": loaded.version if loaded else None, "chat": llm.status}

    mount_scoring(app, settings, hot, metrics)
    mount_push(app, settings, hot)
    mount_alerts(app, settings)

    @app.get("/ml/telemetry")
    def telemetry() -> dict[str, Any]:
        anomaly = anomaly_telemetry(hot)
        db = open_store(settings.db_path, settings.store.busy_timeout_ms)
        try:
            runs = [dict(zip(("id", "started", "finished", "status", "metrics", "error"), row))
                    for row in db.conn.execute(
                        "select id, started, finished, status, metrics, error from job_runs "
                        "where job = 'train-anomaly' order by id desc limit 10")]
            counts = dict(db.conn.execute(
                "select status, count(*) from job_runs where job = 'train-anomaly' group by status"
            ).fetchall())
            alerts = db.conn.execute("select count(*) from alerts").fetchone()[0]
        finally:
            db.close()
        for run in runs:
            run["metrics"] = json.loads(run["metrics"]) if run["metrics"] else None
        return {
            "started": started,
            **health(),
            "anomaly": anomaly,
            "training_runs": {"counts": counts, "recent": runs},
            "live_snapshots": {"enabled": settings.serve.snapshot_enabled, "runs": snapshots.runs,
                               "last_run": snapshots.last_run, "last_flagged": snapshots.last_flagged,
                               "last_error": snapshots.last_error},
            "alerts_stored": alerts,
            "language_model": {**llm.telemetry(), **app.state.openai.telemetry()},
        }

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        export_anomaly_metrics(hot, metrics)
        llm.export_metrics(metrics)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(settings: Settings, *, host: str | None = None, port: int | None = None,
               extensions: Sequence[Extension] = ()) -> None:
    from milton.core.jobs import SERVE_LOCK, STORE_LOCK, job_lock
    from milton.serve.api.auth import check_bind
    from milton.serve.api.openai import GracefulServer

    check_bind(host or settings.serve.host, settings.serve.api_key.get_secret_value())
    # Held while serving, so restore (and anything needing the store alone) can tell.
    with job_lock(settings.locks_dir, STORE_LOCK, shared=True), \
            job_lock(settings.locks_dir, SERVE_LOCK):
        app = create_app(settings, extensions=extensions)
        GracefulServer(uvicorn_config(app, settings, host=host, port=port), app.state.openai).run()
