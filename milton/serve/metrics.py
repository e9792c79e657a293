"""The serve process's Prometheus registry: anomaly scoring, live snapshots, model reloads.

The /v1 API adds its own series to the same registry (:mod:`milton.serve.api.metrics`), so
``GET /metrics`` shows everything.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
