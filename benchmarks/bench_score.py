"""Scoring throughput: AnomalyModel.score (the target), score_rows with reasons, and HTTP
POST /anomaly/score through a live `milton serve` (report only)."""

from __future__ import annotations

import statistics
from typing import Any

import httpx

from benchmarks._common import (
    DAY,
    T_END,
    as_records,
    fill_and_train,
    live_server,
    median,
    snapshots,
    target,
    temp_home,
    timed,
)
from milton.anomaly.detect import current_model, score_rows
from milton.anomaly.model import scoring_rows

TARGET_ROWS_PER_S = 100_000


def _rows_after(n: int, seed: int, interval: float) -> list[tuple]:
    """``n`` rows from the days right after the training window, same workstation."""
    out: list[tuple] = []
    for snap in snapshots(1, T_END, T_END + 365 * DAY, interval, seed=seed):
        out.extend(snap)
        if len(out) >= n:
            return out[:n]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    n = 20_000 if quick else 100_000
    http_rows = 2_000 if quick else 5_000
    train_days = 7 if quick else 30
    interval = 600.0
    repeats = 3 if quick else 5
    with temp_home("milton-bench-score-") as (home, settings):
        history = fill_and_train(settings, train_days, interval, seed=51)
        model = current_model(settings)
        # Fresh rows from the following days (the same seed continues the same workstation's
        # habits; the simulator's RNG differs, so some rows are unfamiliar and get flagged).
        full = _rows_after(n, seed=51, interval=interval)
        srows = scoring_rows(full)

        model.score(srows[:1000])  # warm-up (imports, caches)
        score_t = [timed(lambda: model.score(srows))[0] for _ in range(repeats)]
        flagged = int(model.score(srows).flagged.sum())
        rows_t = [timed(lambda: score_rows(model, full))[0] for _ in range(repeats)]

        batch = as_records(full[:http_rows])
        http_t = []
        with live_server(home) as server, httpx.Client(timeout=60) as client:
            r = client.post(f"{server.base}/anomaly/score", json={"rows": batch[:100]})
            r.raise_for_status()  # warm-up
            for _ in range(repeats):
                seconds, r = timed(lambda: client.post(f"{server.base}/anomaly/score",
                                                       json={"rows": batch}))
                r.raise_for_status()
                if len(r.json()["results"]) != len(batch):
                    raise RuntimeError("HTTP scoring returned the wrong number of results")
                http_t.append(seconds)

    figures = {
        "rows": len(srows),
        "flagged": flagged,
        "model_score_rows_per_s": round(len(srows) / median(score_t)),
        "score_rows_rows_per_s": round(len(full) / median(rows_t)),
        "http_batch_rows": len(batch),
        "http_rows_per_s": round(len(batch) / median(http_t)),
        "http_batch_latency_s": round(median(http_t), 4),
        "seconds": {"model_score": [round(t, 4) for t in score_t],
                    "score_rows": [round(t, 4) for t in rows_t],
                    "http": [round(t, 4) for t in http_t]},
        "model_score_rows_per_s_stdev_pct": round(
            100 * statistics.pstdev(score_t) / statistics.mean(score_t), 1),
    }
    return {
        "params": {"score_rows": n, "repeats": repeats, "train_days": train_days,
                   "train_rows": history, "interval_s": interval, "http_batch_rows": http_rows,
                   "http": "client-side wall time of one POST (JSON encode, validation, "
                           "scoring with reasons, JSON response) on loopback"},
        "figures": figures,
        "targets": [target("model_score_rows_per_s", figures["model_score_rows_per_s"], ">=",
                           TARGET_ROWS_PER_S, "rows/s")],
        "report_only": ["score_rows_rows_per_s", "http_rows_per_s"],
        "notes": [],
    }
