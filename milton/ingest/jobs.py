"""The ingest job: a live snapshot or a file, then retention, under the job runner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from milton.core.housekeeping import prune_history
from milton.core.jobs import JobContext
from milton.ingest.processes import (
    apply_retention,
    ingest_file,
    ingest_snapshot,
    take_snapshot,
)


def retention_days(ctx: JobContext) -> float:
    return ctx.settings.anomaly.window_days + ctx.settings.ingest.retention_margin_days


def ingest_processes_job(from_file: str | None = None, *, strict: bool = False,
                         fmt: str | None = None) -> Callable[[JobContext], dict[str, Any]]:
    def job(ctx: JobContext) -> dict[str, Any]:
        if from_file is None:
            rows = take_snapshot(ctx.now)
            written = ingest_snapshot(ctx.db, rows)
            metrics: dict[str, Any] = {"source": "psutil", "rows": written, "snapshots": 1}
        else:
            report = ingest_file(ctx.db, from_file, strict=strict, fmt=fmt,
                                 max_line_bytes=ctx.settings.ingest.max_line_bytes)
            metrics = {"source": report.source, **report.as_metrics(),
                       "rejected_rows": report.rejected[:50]}  # the count is in "rejected"
        metrics["retention_deleted"] = apply_retention(ctx.db, ctx.now, retention_days(ctx))
        history = prune_history(ctx.settings, ctx.db)  # once a day: no extra timer
        if history is not None:
            metrics["history"] = history
        ctx.log("ingested", **{k: v for k, v in metrics.items() if k != "rejected_rows"})
        return metrics

    return job
