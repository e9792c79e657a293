"""`milton serve`: the long-running process. The OpenAI-compatible assistant (/v1, with
memory and session logging, adapter hot swap), anomaly scoring with live snapshots and alerts,
telemetry, Prometheus metrics, and hot reload of every model kind."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from milton import __version__
from milton.anomaly.alerts import record_and_notify
from milton.anomaly.detect import score_rows
from milton.anomaly.model import KIND, AnomalyModel, load_verified
from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings
from milton.core.errors import MiltonError
from milton.core.log import get_logger, log_event
from milton.core.serve_state import write_serve_state
from milton.core.store import open_store
from milton.core.timeutil import iso, utcnow
from milton.serve.hot import HotModel

logger = get_logger("serve")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("milton_score_requests_total", "Scoring requests", ["status"], registry=r)
        self.rows = Counter("milton_scored_rows_total", "Process rows scored", registry=r)
        self.flagged = Counter("milton_flagged_rows_total", "Process rows flagged", registry=r)
        self.latency = Histogram("milton_score_latency_seconds", "Scoring request latency",
                                 registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.reloads = Gauge("milton_model_reloads_total", "Models hot-reloaded", ["kind"], registry=r)
        self.failures = Gauge("milton_model_reload_failures_total", "Models rejected on reload", ["kind"], registry=r)
        self.fallbacks = Gauge("milton_model_fallbacks_total", "Times the last good model kept serving", ["kind"], registry=r)
        self.swap = Gauge("milton_model_last_swap_seconds", "Duration of the last model swap", ["kind"], registry=r)
        self.load = Gauge("milton_model_last_load_seconds", "Verify+load time of the last new model", ["kind"], registry=r)
        self.snapshots = Counter("milton_live_snapshots_total", "Live snapshots scored by serve", registry=r)
        self.alerts = Counter("milton_alerts_total", "Alerts stored", registry=r)


class SnapshotLoop:
    """Snapshots this host every N seconds, scores it, stores alerts for flagged processes."""

    def __init__(self, settings: Settings, hot: HotModel[AnomalyModel], metrics: Metrics) -> None:
        self.settings = settings
        self.hot = hot
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.last_run: str | None = None
        self.last_flagged = 0
        self.last_error: str | None = None

    def run_once(self) -> int:
        from milton.ingest.processes import take_snapshot

        loaded = self.hot.get()
        if loaded is None:
            return 0
        now = utcnow()
        rows = take_snapshot(now)
        scored = score_rows(loaded.model, rows)
        new = record_and_notify(self.settings, scored, rows[0][0] if rows else None, loaded.version)
        self.runs += 1
        self.last_run = iso(now)
        self.last_flagged = sum(r["flagged"] for r in scored)
        self.metrics.snapshots.inc()
        self.metrics.alerts.inc(len(new))
        return self.last_flagged

    def _run(self) -> None:
        while not self._stop.wait(self.settings.serve.snapshot_interval_s):
            try:
                self.run_once()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - keep serving; report in telemetry
                self.last_error = f"{type(exc).__name__}: {exc}"
                log_event(logger, "live snapshot failed", level=logging.ERROR, error=self.last_error)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="snapshots", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class LanguageModel:
    """The served LLM and its adapter watcher: opened in the background, closed on shutdown.

    A model that cannot load (no GGUF, bad file) is logged and reported in telemetry; serve
    keeps scoring processes and /v1 answers 503 with the reason.
    """

    def __init__(self, settings: Settings, *, enabled: bool) -> None:
        self.settings = settings
        self.enabled = enabled
        self.engine: Any = None
        self.watcher: Any = None
        self.base_watcher: Any = None  # evolved bases (checkpoints/base), llama.cpp engine only
        self.error: str | None = None
        self.smoke: dict[str, Any] | None = None  # the child-process generation check, if run
        self._closed = threading.Event()
        self.settled = threading.Event()  # loaded, failed, or not wanted

    def open(self, api: Any) -> None:
        try:
            self._open(api)
        finally:
            self.settled.set()

    @property
    def status(self) -> str:
        """off, loading, ok or degraded (wanted but not serving: :attr:`error` says why)."""
        if not self.enabled:
            return "off"
        if self.error:
            return "degraded"
        return "ok" if self.engine is not None else "loading"

    def _fail(self, api: Any, error: str) -> None:
        self.error = error
        api.set_unavailable(f"the language model is not available: {error}")
        log_event(logger, "language model not loaded", level=logging.ERROR, error=error)

    def _smoke_check(self) -> str | None:
        """Generate from the llama.cpp base in a child process first (serve.smoke_check): a
        build that crashes this CPU kills the child, not serve. The reason, or None if fine."""
        from milton.models.smoke import failure_line, run_smoke
        from milton.serve.llm import resolve_serve_base, serve_backend

        ref = resolve_serve_base(self.settings)
        if serve_backend(self.settings, ref) != "llama":
            return None
        gpu_layers = 0 if self.settings.model.device == "cpu" else -1
        result = run_smoke(ref.path, gpu_layers=gpu_layers, threads=self.settings.serve.n_threads)
        self.smoke = {"ok": result.ok, "signal": result.signal, "seconds": result.seconds,
                      "error": result.error}
        log_event(logger, "generation smoke test", model=str(ref.path), ok=result.ok,
                  seconds=result.seconds, signal=result.signal)
        return None if result.ok else failure_line(result)

    def _open(self, api: Any) -> None:
        if not self.enabled:
            return
        from milton.serve.llm import open_engine

        t0 = time.perf_counter()
        try:
            reason = self._smoke_check() if self.settings.serve.smoke_check else None
            if reason:
                self._fail(api, f"chat disabled: {reason}")
                return
            engine, watcher = open_engine(self.settings)
        except Exception as exc:  # noqa: BLE001 - serve the rest; say why in telemetry
            self._fail(api, str(exc) if isinstance(exc, MiltonError) else f"{type(exc).__name__}: {exc}")
            return
        if self._closed.is_set():  # shut down while loading
            engine.close()
            return
        self.engine, self.watcher = engine, watcher
        if watcher is not None:
            watcher.start()
        if hasattr(engine, "swap_base"):
            from milton.serve.base_watch import BaseWatcher

            self.base_watcher = BaseWatcher(engine, self.settings, adapters=watcher)
            self.base_watcher.start()
        api.set_engine(engine)
        log_event(logger, "language model loaded", model=engine.info().model_id,
                  adapter=engine.info().adapter_version, load_s=round(time.perf_counter() - t0, 2))

    def close(self, api: Any) -> None:
        self._closed.set()
        api.set_engine(None)
        for watcher in (self.base_watcher, self.watcher):
            if watcher is not None:
                watcher.stop()
        if self.engine is not None:
            self.engine.close()

    def telemetry(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "status": self.status, "load_error": self.error,
                "smoke_check": self.smoke,
                "adapter_watcher": None if self.watcher is None else {
                    "reloads": self.watcher.reloads, "failures": self.watcher.failures,
                    "fallbacks": self.watcher.fallbacks, "last_reload": self.watcher.last_reload,
                    "last_error": self.watcher.last_error},
                "base_watcher": None if self.base_watcher is None else {
                    "evolved_version": (self.base_watcher.get().version
                                        if self.base_watcher.get() else None),
                    "reloads": self.base_watcher.reloads, "failures": self.base_watcher.failures,
                    "last_reload": self.base_watcher.last_reload,
                    "last_error": self.base_watcher.last_error},
                "swap_latency_ms": self.swap_latency()}

    def swap_latency(self) -> dict[str, Any] | None:
        """p50/p95/max of the recent successful adapter swaps: ``locked`` (the context held:
        what requests feel) and ``total`` (load beside + switch + free), from the engine's swap
        history; the last swap alone hides a slow one among many."""
        from milton.serve.api_metrics import percentile

        records = [r for r in list(getattr(self.engine, "swap_history", ())) if r.ok and r.kind == "adapter"]
        if not records:
            return None
        out: dict[str, Any] = {"count": len(records)}
        for name in ("locked", "total"):
            values = [getattr(r, f"{name}_ms") for r in records]
            for label, q in (("p50", .5), ("p95", .95), ("max", 1.0)):
                out[f"{name}_{label}"] = round(percentile(values, q) or 0.0, 3)
        return out

    def export_metrics(self, metrics: Metrics) -> None:
        if self.watcher is not None:  # rejected adapters while another kept serving
            metrics.fallbacks.labels("adapter").set(self.watcher.fallbacks)
        if self.engine is None:
            return
        info = self.engine.info()
        metrics.reloads.labels("adapter").set(info.swaps)
        metrics.failures.labels("adapter").set(info.swap_failures)
        if info.last_swap_ms is not None:
            metrics.swap.labels("adapter").set(info.last_swap_ms / 1000)


def _load_anomaly(store: ArtifactStore, name: str) -> AnomalyModel:
    return load_verified(store, name)


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": status}}, status_code=status)


def create_app(settings: Settings, *, background: bool = True, engine: Any = None) -> FastAPI:
    """Build the app. ``background=False`` (tests) skips the watcher and snapshot threads.
    ``engine``: a :class:`milton.serve.engine.ChatEngine` for /v1 (or set it later through
    ``app.state.openai.set_engine``); without one, chat requests get 503."""
    metrics = Metrics()
    store = ArtifactStore(settings.paths.checkpoints_dir, KIND, keep=settings.anomaly.keep_versions)
    hot: HotModel[AnomalyModel] = HotModel(store, _load_anomaly, settings.serve.reload_poll_s, logger)
    snapshots = SnapshotLoop(settings, hot, metrics)
    started = iso(utcnow())

    llm = LanguageModel(settings, enabled=engine is None and background and settings.serve.chat_enabled)

    def health() -> dict[str, Any]:
        """ok, or degraded with the reasons: a part that should serve and does not."""
        reasons = []
        if llm.status == "degraded":
            reasons.append(llm.error)
        if hot.degraded:
            reasons.append(f"anomaly model: {hot.degraded}")
        return {"status": "degraded" if reasons else "ok", "reasons": reasons}

    def publish_state(status: str) -> None:
        """data/serve.json for `milton status` / `milton doctor` (never fails serve)."""
        state = health()
        try:
            write_serve_state(settings.paths.data_dir, {
                "status": status, "started": started, "version": __version__,
                "health": state["status"], "reasons": state["reasons"],
                "chat": llm.status, "chat_error": llm.error, "updated": iso(utcnow())})
        except OSError as exc:
            log_event(logger, "cannot write serve state", level=logging.WARNING, error=str(exc))

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
        log_event(logger, "serve started", version=__version__,
                  model=(hot.get().version if hot.get() else None))
        yield
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
    from milton.serve.openai_api import mount_openai

    mount_openai(app, settings, engine, registry=metrics.registry, background=background)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        loaded = hot.get()
        return {**health(), "version": __version__,
                "anomaly_model": loaded.version if loaded else None, "chat": llm.status}

    @app.post("/anomaly/score")
    async def score(request: Request) -> Any:
        t0 = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            metrics.requests.labels("bad_request").inc()
            return _error(400, f"body is not valid JSON: {exc}", "invalid_request_error")
        records = body.get("rows") if isinstance(body, dict) else body
        if not isinstance(records, list):
            metrics.requests.labels("bad_request").inc()
            return _error(400, "expected {\"rows\": [...]} or a JSON array of process rows",
                          "invalid_request_error")
        if len(records) > settings.serve.max_score_rows:
            metrics.requests.labels("too_large").inc()
            return _error(413, f"{len(records)} rows; at most {settings.serve.max_score_rows} per request",
                          "request_too_large")
        loaded = hot.get()  # this request finishes on this model, whatever reloads meanwhile
        if loaded is None:
            metrics.requests.labels("unavailable").inc()
            return JSONResponse({"error": {"message": "no anomaly model yet: run `milton train-anomaly`",
                                           "type": "unavailable", "code": 503}},
                                status_code=503, headers={"Retry-After": "60"})
        from milton.ingest.processes import RowError, normalize_record

        rows = []
        for index, record in enumerate(records):
            try:
                rows.append(normalize_record(record))
            except RowError as exc:
                metrics.requests.labels("bad_request").inc()
                return _error(400, f"rows[{index}]: {exc}", "invalid_request_error")
        scored = score_rows(loaded.model, rows) if rows else []
        metrics.requests.labels("ok").inc()
        metrics.rows.inc(len(scored))
        metrics.flagged.inc(sum(r["flagged"] for r in scored))
        metrics.latency.observe(time.perf_counter() - t0)
        return {"model_version": loaded.version, "threshold": loaded.model.threshold,
                "results": [{k: r[k] for k in ("host", "pid", "name", "score", "flagged", "reasons")}
                            for r in scored]}

    @app.post("/ingest/processes")
    async def ingest_push(request: Request) -> Any:
        """A fleet agent's snapshots (see milton.ingest.agent); scored for alerts once stored."""
        from milton.anomaly.alerts import alert_on_rows
        from milton.core.errors import InputError
        from milton.ingest.hub import TooLarge, parse_body, store_push

        limit = settings.serve.max_push_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            return _error(413, f"body larger than {limit} bytes (serve.max_push_bytes)", "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, f"body larger than {limit} bytes (serve.max_push_bytes)",
                              "request_too_large")
            chunks.append(chunk)

        def receive() -> Any:
            rows = parse_body(b"".join(chunks), settings.serve.max_push_rows)
            db = open_store(settings.db_path, settings.store.busy_timeout_ms)
            try:
                return store_push(db, rows)
            finally:
                db.close()

        try:
            report = await asyncio.to_thread(receive)
        except TooLarge as exc:
            return _error(413, str(exc), "request_too_large")
        except InputError as exc:
            return _error(400, str(exc), "invalid_request_error")
        loaded = hot.get()
        if loaded is not None and report.new_rows:
            try:  # stored already: a scoring problem must not make the agent resend
                await asyncio.to_thread(alert_on_rows, settings, loaded.model, loaded.version,
                                        report.new_rows)
            except Exception as exc:  # noqa: BLE001 - logged; the rows are safe
                log_event(logger, "scoring pushed snapshots failed", level=logging.ERROR,
                          error=f"{type(exc).__name__}: {exc}")
        return report.as_dict()

    @app.get("/anomaly/alerts")
    def anomaly_alerts(since: float | None = None, host: str | None = None,
                       all: bool = False, limit: int = 500) -> dict[str, Any]:  # noqa: A002
        from milton.anomaly.alerts import list_alerts, open_summary

        db = open_store(settings.db_path, settings.store.busy_timeout_ms)
        try:
            return {**open_summary(db.conn),
                    "alerts": list_alerts(db.conn, since=since, host=host, include_acked=all,
                                          limit=max(0, min(limit, 5000)))}
        finally:
            db.close()

    @app.get("/ml/telemetry")
    def telemetry() -> dict[str, Any]:
        loaded = hot.get()
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
            "anomaly": {
                "current_version": loaded.version if loaded else None,
                "loaded_at": loaded.loaded_at if loaded else None,
                "reloads": hot.reloads, "last_reload": hot.last_reload,
                "reload_failures": hot.failures, "fallbacks": hot.fallbacks,
                "last_error": hot.last_error, "last_load_s": hot.last_load_s,
                "last_swap_s": hot.last_swap_s, "degraded": hot.degraded,
            },
            "training_runs": {"counts": counts, "recent": runs},
            "live_snapshots": {"enabled": settings.serve.snapshot_enabled, "runs": snapshots.runs,
                               "last_run": snapshots.last_run, "last_flagged": snapshots.last_flagged,
                               "last_error": snapshots.last_error},
            "alerts_stored": alerts,
            "language_model": {**llm.telemetry(), **app.state.openai.telemetry()},
        }

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        metrics.reloads.labels(KIND).set(hot.reloads)
        metrics.failures.labels(KIND).set(hot.failures)
        metrics.fallbacks.labels(KIND).set(hot.fallbacks)
        if hot.last_swap_s is not None:
            metrics.swap.labels(KIND).set(hot.last_swap_s)
        if hot.last_load_s is not None:
            metrics.load.labels(KIND).set(hot.last_load_s)
        llm.export_metrics(metrics)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from milton.core.jobs import SERVE_LOCK, STORE_LOCK, job_lock
    from milton.serve.limits import check_bind

    check_bind(host or settings.serve.host, settings.serve.api_key.get_secret_value())
    # Held while serving, so restore (and anything needing the store alone) can tell.
    with job_lock(settings.locks_dir, STORE_LOCK, shared=True), \
            job_lock(settings.locks_dir, SERVE_LOCK):
        app = create_app(settings)
        config = uvicorn.Config(app, host=host or settings.serve.host,
                                port=settings.serve.port if port is None else port,
                                log_config=None, access_log=False,
                                timeout_graceful_shutdown=settings.serve.shutdown_grace_s)
        from milton.serve.openai_api import GracefulServer

        GracefulServer(config, app.state.openai).run()
