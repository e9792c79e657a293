"""Anomaly scoring in serve: the hot-reloaded model, ``POST /anomaly/score`` and live snapshots.

The model is ``checkpoints/anomaly/current``, followed by a :class:`~milton.serve.watch.HotModel`
(a request finishes on the model it started with). :class:`SnapshotLoop` snapshots this host
every ``serve.snapshot_interval_s``, scores it and stores alerts for flagged processes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from milton.anomaly.detect import score_rows
from milton.anomaly.model import AnomalyModel, load_verified
from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings
from milton.core.log import get_logger, log_event
from milton.core.store import open_store
from milton.core.timeutil import iso, utcnow
from milton.ingest.processes import RowError, normalize_record, take_snapshot
from milton.models.layout import ANOMALY_KIND, artifact_store
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
        alerts = [{"ts": r["ts"], "host": r["host"], "snapshot_id": rows[0][0], "pid": r["pid"],
                   "name": r["name"], "username": r["username"], "exe": r["exe"],
                   "score": r["score"], "model_version": loaded.version,
                   "reasons": json.dumps(r["reasons"])} for r in scored if r["flagged"]]
        if alerts:
            db = open_store(self.settings.db_path, self.settings.store.busy_timeout_ms)
            try:
                with db.atomic():
                    db["alerts"].insert_all(alerts)
            finally:
                db.close()
        self.runs += 1
        self.last_run = iso(now)
        self.last_flagged = len(alerts)
        self.metrics.snapshots.inc()
        self.metrics.alerts.inc(len(alerts))
        return len(alerts)

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


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": status}}, status_code=status)


def mount_scoring(app: FastAPI, settings: Settings, hot: HotModel[AnomalyModel],
                  metrics: Metrics) -> None:
    """``POST /anomaly/score``: process rows in, scores and reasons out, on the current model."""

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


def anomaly_telemetry(hot: HotModel[AnomalyModel]) -> dict[str, Any]:
    """The ``anomaly`` section of /ml/telemetry."""
    loaded = hot.get()
    return {
        "current_version": loaded.version if loaded else None,
        "loaded_at": loaded.loaded_at if loaded else None,
        "reloads": hot.reloads, "last_reload": hot.last_reload,
        "reload_failures": hot.failures, "fallbacks": hot.fallbacks,
        "last_error": hot.last_error, "last_load_s": hot.last_load_s,
        "last_swap_s": hot.last_swap_s,
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
