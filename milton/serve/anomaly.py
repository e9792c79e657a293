"""Anomaly scoring in serve: the hot-reloaded model, ``POST /anomaly/score``, live snapshots,
``GET /anomaly/alerts`` and the fleet agents' ``POST /ingest/processes``.

The model is ``checkpoints/anomaly/current``, followed by a :class:`~milton.serve.watch.HotModel`
(a request finishes on the model it started with). :class:`SnapshotLoop` snapshots this host
every ``serve.snapshot_interval_s``, scores it and stores alerts for flagged processes
(deduplicated and notified by :mod:`milton.anomaly.alerts`). With a bad ``current`` at start-up
the newest version that verifies serves, and health says degraded (``HotModel.degraded``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from milton.anomaly.alerts import alert_on_rows, list_alerts, open_summary, record_and_notify
from milton.anomaly.detect import score_rows
from milton.anomaly.model import AnomalyModel, load_verified
from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings
from milton.core.errors import InputError
from milton.core.log import get_logger, log_event
from milton.core.store import open_store
from milton.core.timeutil import iso, utcnow
from milton.ingest.hub import TooLarge, parse_body, store_push
from milton.ingest.processes import RowError, normalize_record, take_snapshot
from milton.models.layout import ANOMALY_KIND, artifact_store
from milton.serve.api.errors import ApiError
from milton.serve.api.schema import SURROGATE, has_surrogate, json_body, parse_json
from milton.serve.metrics import Metrics
from milton.serve.watch import HotModel

logger = get_logger("serve")


def _load_anomaly(store: ArtifactStore, name: str) -> AnomalyModel:
    return load_verified(store, name)


def anomaly_model(settings: Settings) -> HotModel[AnomalyModel]:
    """``checkpoints/anomaly/current``, reloaded within ``serve.reload_poll_s`` of a change."""
    return HotModel(artifact_store(settings, ANOMALY_KIND), _load_anomaly,
                    settings.serve.reload_poll_s, logger)


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


_ROW = {"type": "object", "required": ["host", "pid", "name", "ts"], "properties": {
    "host": {"type": "string"}, "pid": {"type": "integer"}, "ppid": {"type": "integer"},
    "name": {"type": "string"}, "exe": {"type": "string"}, "username": {"type": "string"},
    "ts": {"type": "number"}, "cpu": {"type": "number"}, "rss": {"type": "integer"},
    "create_time": {"type": "number"}, "snapshot_id": {"type": "string"}}}
#: Process rows as /anomaly/score and /ingest/processes take them (for the OpenAPI schema).
ROWS_SCHEMA = {"anyOf": [{"type": "object", "required": ["rows"],
                          "properties": {"rows": {"type": "array", "items": _ROW}}},
                         {"type": "array", "items": _ROW}]}


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": status}}, status_code=status)


def mount_scoring(app: FastAPI, settings: Settings, hot: HotModel[AnomalyModel],
                  metrics: Metrics) -> None:
    """``POST /anomaly/score``: process rows in, scores and reasons out, on the current model."""

    @app.post("/anomaly/score", openapi_extra=json_body(ROWS_SCHEMA))
    async def score(request: Request) -> Any:
        t0 = time.perf_counter()
        try:
            body = parse_json(await request.body())
        except ApiError as exc:
            metrics.requests.labels("bad_request").inc()
            return _error(400, exc.message, "invalid_request_error")
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


def mount_push(app: FastAPI, settings: Settings, hot: HotModel[AnomalyModel]) -> None:
    """``POST /ingest/processes``: a fleet agent's snapshots (see :mod:`milton.ingest.agent`),
    stored idempotently by :mod:`milton.ingest.hub`, then scored into per-host alerts."""

    @app.post("/ingest/processes", openapi_extra=json_body(ROWS_SCHEMA))
    async def ingest_push(request: Request) -> Any:
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
            try:
                rows = parse_body(b"".join(chunks), settings.serve.max_push_rows)
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") the parser tried to hash
                raise InputError(f"body: {SURROGATE} (nothing ingested)") from None
            for index, row in enumerate(rows):
                if any(isinstance(value, str) and has_surrogate(value) for value in row):
                    raise InputError(f"rows[{index}]: {SURROGATE} (nothing ingested)")
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


def mount_alerts(app: FastAPI, settings: Settings) -> None:
    """``GET /anomaly/alerts``: the open-alert summary and the alerts themselves."""

    @app.get("/anomaly/alerts")
    def anomaly_alerts(since: float | None = None, host: str | None = None,
                       all: bool = False, limit: int = 500) -> dict[str, Any]:
        db = open_store(settings.db_path, settings.store.busy_timeout_ms)
        try:
            return {**open_summary(db.conn),
                    "alerts": list_alerts(db.conn, since=since, host=host, include_acked=all,
                                          limit=max(0, min(limit, 5000)))}
        finally:
            db.close()


def anomaly_telemetry(hot: HotModel[AnomalyModel]) -> dict[str, Any]:
    """The ``anomaly`` section of /ml/telemetry."""
    loaded = hot.get()
    return {
        "current_version": loaded.version if loaded else None,
        "loaded_at": loaded.loaded_at if loaded else None,
        "reloads": hot.reloads, "last_reload": hot.last_reload,
        "reload_failures": hot.failures, "fallbacks": hot.fallbacks,
        "last_error": hot.last_error, "last_load_s": hot.last_load_s,
        "last_swap_s": hot.last_swap_s, "degraded": hot.degraded,
    }


def export_anomaly_metrics(hot: HotModel[AnomalyModel], metrics: Metrics) -> None:
    """The anomaly model's reload series, for /metrics."""
    metrics.reloads.labels(ANOMALY_KIND).set(hot.reloads)
    metrics.failures.labels(ANOMALY_KIND).set(hot.failures)
    metrics.fallbacks.labels(ANOMALY_KIND).set(hot.fallbacks)
    if hot.last_swap_s is not None:
        metrics.swap.labels(ANOMALY_KIND).set(hot.last_swap_s)
    if hot.last_load_s is not None:
        metrics.load.labels(ANOMALY_KIND).set(hot.last_load_s)
