"""train-anomaly: fit a fresh detector on the sliding window and publish it as ``current``.

Aggregation is done in SQL (one pass per count table over the indexed window), and only a
capped, time-stratified sample of rows per (host, process) is pulled into Python, so training
time stays flat however much history the store holds and however busy a process is.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import sqlite_utils
from sklearn.ensemble import IsolationForest

from milton.anomaly.model import (
    FEATURES,
    MIN_PARENT_SIGHTINGS,
    AnomalyModel,
    Profile,
    build_features,
)
from milton.core.config import AnomalyConfig, Settings
from milton.core.jobs import JobContext, Skip
from milton.core.timeutil import iso
from milton.models.layout import ANOMALY_KIND, artifact_store


def contamination_for(hours: float, cfg: AnomalyConfig) -> float:
    """Young histories are noisier, so more of them is allowed to look odd."""
    if hours <= cfg.short_hours:
        return cfg.contamination_short
    if hours <= cfg.medium_hours:
        return cfg.contamination_medium
    return cfg.contamination_long


def load_profile(db: sqlite_utils.Database, start: float, end: float) -> Profile:
    q = db.conn.execute
    where = "where ts >= ? and ts <= ?"
    args = (start, end)
    host_snapshots = {h: n for h, n in q(
        f"select host, count(*) from snapshots {where} group by host", args)}
    procs = {(h, n, u, e): (a, b, c, d) for h, n, u, e, a, b, c, d in q(
        "select host, name, coalesce(username, ''), coalesce(exe, ''), count(distinct snapshot_id),"
        " count(distinct cast(ts / 3600 as integer)), min(ts), max(ts)"
        f" from processes {where} group by 1, 2, 3, 4", args)}
    hours = {(h, n, hr): c for h, n, hr, c in q(
        "select host, name, cast((ts % 86400) / 3600 as integer), count(distinct snapshot_id) "
        f"from processes {where} group by 1, 2, 3", args)}
    # Parent-child edges: the parent is the process whose pid is this row's ppid in the same
    # snapshot (index processes_snapshot_pid makes that one lookup per row).
    edges = {(h, p, c): n for h, p, c, n in q(
        "select p.host, q.name, p.name, count(distinct p.snapshot_id) from processes p "
        "join processes q on q.snapshot_id = p.snapshot_id and q.pid = p.ppid "
        "where p.ts >= ? and p.ts <= ? and p.ppid != p.pid group by 1, 2, 3", args)}
    return Profile(start, end, host_snapshots, procs, hours, edges)


def sample_rows(db: sqlite_utils.Database, start: float, end: float,
                per_process: int) -> tuple[list[tuple], list[float | None]]:
    """About ``per_process`` rows per process identity, evenly spread over its sightings,
    each with its parent's name (``ROW_FIELDS`` order) and the hours since that identity's
    previous sighting (None for the first)."""
    cursor = db.conn.execute(
        """
        with w as (
            select snapshot_id, host, name, username, exe, ts, cpu, rss, pid, ppid,
                   (ts - lag(ts) over p) / 3600.0 as gap,
                   row_number() over p as rn,
                   count(*) over (partition by host, name, coalesce(username, ''),
                                  coalesce(exe, '')) as cnt
            from processes where ts >= ? and ts <= ?
            window p as (partition by host, name, coalesce(username, ''), coalesce(exe, '')
                         order by ts)
        )
        select w.host, w.name, w.username, w.exe, w.ts, w.cpu, w.rss,
               (select q.name from processes q where q.snapshot_id = w.snapshot_id
                and q.pid = w.ppid and w.ppid != w.pid limit 1), w.gap
        from w where (rn - 1) % max(1, cnt / ?) = 0
        """,
        (start, end, per_process),
    )
    rows, gaps = [], []
    for *row, gap in cursor:
        rows.append(tuple(row))
        gaps.append(gap)
    return rows, gaps


def fit_model(db: sqlite_utils.Database, now: datetime, cfg: AnomalyConfig) -> tuple[AnomalyModel, dict[str, Any]]:
    """Fit on the window ending at ``now``; raise :class:`Skip` when there is too little data."""
    end = now.timestamp()
    start = (now - timedelta(days=cfg.window_days)).timestamp()
    records, distinct, first_ts = db.conn.execute(
        "select count(*), count(distinct host || char(0) || name), min(ts) "
        "from processes where ts >= ? and ts <= ?", (start, end)).fetchone()
    if records < cfg.min_records:
        raise Skip(f"only {records} records in the window (need {cfg.min_records})",
                   records=records, processes=distinct)
    if distinct < cfg.min_processes:
        raise Skip(f"only {distinct} distinct processes in the window (need {cfg.min_processes})",
                   records=records, processes=distinct)
    t0 = time.perf_counter()
    profile = load_profile(db, start, end)
    rows, gaps = sample_rows(db, start, end, cfg.rows_per_process)
    X = build_features(profile, rows, gaps)  # noqa: N806 - the feature matrix, as scikit-learn names it
    hours = (end - first_ts) / 3600.0
    contamination = contamination_for(hours, cfg)
    forest = IsolationForest(
        n_estimators=cfg.n_estimators,
        max_samples=min(cfg.max_samples, len(X)),
        contamination=contamination,
        random_state=cfg.random_state,
        n_jobs=1,
    ).fit(X)
    train_scores = -forest.score_samples(X)
    threshold = float(-forest.offset_)
    meta = {
        "features": list(FEATURES),
        "threshold": threshold,
        "contamination": contamination,
        "flag_unseen": True,
        "flag_unseen_edge": True,
        "lineage_min_parent": MIN_PARENT_SIGHTINGS,
        "window_days": cfg.window_days,
    }
    metrics = {
        "records": records,
        "processes": distinct,
        "hosts": len(profile.host_snapshots),
        "edges": len(profile.edges),
        "train_rows": len(X),
        "history_hours": round(hours, 2),
        "contamination": contamination,
        "threshold": round(threshold, 6),
        "train_flagged_fraction": round(float(np.mean(train_scores > threshold)), 5),
        "fit_seconds": round(time.perf_counter() - t0, 4),
    }
    return AnomalyModel(forest, profile, meta), metrics


def train_anomaly(ctx: JobContext) -> dict[str, Any]:
    """The hourly job: fit, publish atomically, switch ``current``, prune old versions."""
    settings: Settings = ctx.settings
    cfg = settings.anomaly
    model, metrics = fit_model(ctx.db, ctx.now, cfg)
    store = artifact_store(settings, ANOMALY_KIND)
    window = {"start": iso(model.profile.window_start), "end": iso(model.profile.window_end)}
    version = store.publish(model.write, metrics=metrics, data_window=window,
                            extra={"trained_at_now": iso(ctx.now)}, created=None)
    ctx.log(f"published {ANOMALY_KIND}/{version.name}", version=version.name,
            train_rows=metrics["train_rows"], contamination=metrics["contamination"])
    return {**metrics, "version": version.name}
