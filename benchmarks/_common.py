"""Shared helpers: simulated data, temp stores, timing, a live `milton serve` subprocess."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from milton.anomaly.simulate import Workstation
from milton.core.config import Settings, load_settings
from milton.core.store import open_store
from milton.ingest.processes import COLUMNS, ingest_snapshot

DAY = 86400.0
# A Monday, 00:00 UTC: the end of every simulated history ("now" for training).
T_END = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def temp_home(prefix: str = "milton-bench-") -> Iterator[tuple[Path, Settings]]:
    """A throwaway MILTON_HOME (store, checkpoints, logs) with default settings."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        home = Path(tmp)
        yield home, load_settings(environ={"MILTON_HOME": str(home)}).settings


def snapshots(hosts: int, start: float, end: float, interval_s: float,
              seed: int = 0) -> Iterator[list[tuple]]:
    """Snapshots (lists of COLUMNS-order tuples) of ``hosts`` workstations, oldest first."""
    stations = [Workstation(host=f"ws{i + 1}", seed=seed + i) for i in range(hosts)]
    ts = start
    while ts < end:
        for ws in stations:
            yield ws.snapshot(ts)
        ts += interval_s


def fill_store(path: Path, snaps: Iterator[list[tuple]] | list[list[tuple]]) -> int:
    """Write snapshots with ingest_snapshot (one outer transaction); return rows written."""
    db = open_store(path)
    rows = 0
    try:
        with db.atomic():
            for snap in snaps:
                rows += ingest_snapshot(db, snap)
    finally:
        db.close()
    return rows


def fill_and_train(settings: Settings, days: float, interval_s: float, seed: int) -> int:
    """One workstation's ``days`` of history ending at T_END, then train-anomaly at T_END."""
    from milton.anomaly.train import train_anomaly
    from milton.core.jobs import run_job

    rows = fill_store(settings.db_path, snapshots(1, T_END - days * DAY, T_END, interval_s, seed=seed))
    job = run_job("train-anomaly", train_anomaly, settings, now=utc(T_END))
    if job.status != "ok":
        raise RuntimeError(f"initial training: {job.status} {job.metrics} {job.error}")
    return rows


def as_records(rows: list[tuple]) -> list[dict[str, Any]]:
    """Rows as the JSON objects an agent sends (COLUMNS as keys)."""
    return [dict(zip(COLUMNS, r)) for r in rows]


# -- a live server -----------------------------------------------------------------------
def live_server(home: Path, env_extra: dict[str, str] | None = None, timeout: float = 60.0):
    """A real `milton serve` on loopback, live snapshots off so only the benchmark loads it."""
    from milton.serve.process import live_server as spawn

    return spawn(home, {"MILTON_SERVE__SNAPSHOT_ENABLED": "false", **(env_extra or {})}, timeout)


# -- result shape --------------------------------------------------------------------------
def target(figure: str, value: float | None, op: str, bound: float, unit: str = "") -> dict:
    """One checked figure: ``value op bound`` (op is '>=' or '<=')."""
    if value is None:
        ok = False
    elif op == ">=":
        ok = value >= bound
    elif op == "<=":
        ok = value <= bound
    else:
        raise ValueError(op)
    return {"figure": figure, "value": value, "op": op, "target": bound, "unit": unit,
            "pass": bool(ok)}
