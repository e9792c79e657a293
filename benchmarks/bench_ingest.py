"""Ingest throughput: the validating dict path and the typed-tuple path vs raw executemany.

Every run writes the same rows into a fresh store made by ``open_store`` (same schema, indexes,
WAL and pragmas); the baseline is ``conn.executemany(INSERT_SQL, rows)`` in one transaction.
Runs are interleaved (order rotated each repeat) and ratios are taken per repeat, then the
median reported, so machine noise hits both sides alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import DAY, T_END, as_records, median, snapshots, target, timed
from milton.core.store import open_store
from milton.ingest import processes
from milton.ingest.processes import INSERT_SQL, ingest_records, ingest_snapshot

TARGET_RATIO = 0.7


def _make_rows(n: int) -> list[list[tuple]]:
    out, total = [], 0
    for snap in snapshots(1, T_END - 400 * DAY, T_END, 600.0, seed=11):
        out.append(snap)
        total += len(snap)
        if total >= n:
            break
    return out


def _fresh(directory: Path, name: str):
    return open_store(directory / f"{name}.db")


def _raw(db, rows, _records, _snaps) -> None:
    with db.atomic():
        db.conn.executemany(INSERT_SQL, rows)


def _records(db, _rows, records, _snaps) -> None:
    ingest_records(db, records, source="bench")


def _snapshot(db, _rows, _records, snaps) -> None:
    for snap in snaps:
        ingest_snapshot(db, snap, source="bench")


METHODS = {"raw_executemany": _raw, "ingest_records": _records, "ingest_snapshot": _snapshot}


def run(quick: bool = False) -> dict[str, Any]:
    n = 20_000 if quick else 200_000
    repeats = 3
    snaps = _make_rows(n)
    rows = [r for s in snaps for r in s]
    records = as_records(rows)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    names = list(METHODS)
    with tempfile.TemporaryDirectory(prefix="milton-bench-ingest-") as tmp:
        for rep in range(repeats):
            order = names[rep % 3:] + names[:rep % 3]
            for method in order:
                db = _fresh(Path(tmp), f"{method}-{rep}")
                try:
                    processes._ts_cache.clear()  # no warm cache carried between runs
                    seconds, _ = timed(lambda: METHODS[method](db, rows, records, snaps))
                    count = db.conn.execute("select count(*) from processes").fetchone()[0]
                    if count != len(rows):
                        raise RuntimeError(f"{method}: wrote {count} rows, expected {len(rows)}")
                finally:
                    db.close()
                times[method].append(seconds)
    rate = {m: len(rows) / median(ts) for m, ts in times.items()}
    ratio = {m: median([len(rows) / t / (len(rows) / b)
                        for t, b in zip(times[m], times["raw_executemany"])])
             for m in ("ingest_records", "ingest_snapshot")}
    figures = {
        "rows": len(rows),
        "snapshots": len(snaps),
        "raw_executemany_rows_per_s": round(rate["raw_executemany"]),
        "ingest_records_rows_per_s": round(rate["ingest_records"]),
        "ingest_snapshot_rows_per_s": round(rate["ingest_snapshot"]),
        "ingest_records_vs_raw": round(ratio["ingest_records"], 3),
        "ingest_snapshot_vs_raw": round(ratio["ingest_snapshot"], 3),
        "seconds": {m: [round(t, 4) for t in ts] for m, ts in times.items()},
    }
    return {
        "params": {"rows": len(rows), "repeats": repeats, "hosts": 1, "interval_s": 600,
                   "ingest_records_call": "one call with all records (one transaction)",
                   "ingest_snapshot_call": "one call per snapshot (one transaction each)"},
        "figures": figures,
        "targets": [
            target("ingest_records_vs_raw", figures["ingest_records_vs_raw"], ">=", TARGET_RATIO,
                   "x"),
        ],
        "report_only": ["ingest_snapshot_vs_raw", "ingest_records_rows_per_s",
                        "ingest_snapshot_rows_per_s", "raw_executemany_rows_per_s"],
        "notes": ["ratios are per-repeat rate ratios against raw executemany in the same run "
                  "(median over repeats)"],
    }
