"""Hot reload under load: a live `milton serve` (reload poll 0.1 s, live snapshots off) scored by
4 client threads while train-anomaly publishes new models. Measures publish -> /healthz latency,
the swap itself (/ml/telemetry anomaly.last_swap_s) and failed requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from benchmarks._common import (
    T_END,
    as_records,
    fill_and_train,
    live_server,
    median,
    target,
    temp_home,
    utc,
)
from milton.anomaly.simulate import Workstation
from milton.anomaly.train import train_anomaly
from milton.core.jobs import run_job

TARGET_LATENCY_S = 2.0
TARGET_SWAP_S = 0.1
CLIENTS = 4


def _wait_for(client: httpx.Client, base: str, version: str, t_published: float,
              timeout: float = 30.0) -> tuple[float | None, int]:
    errors = 0
    while time.monotonic() - t_published < timeout:
        try:
            if client.get(f"{base}/healthz", timeout=5).json()["anomaly_model"] == version:
                return time.monotonic() - t_published, errors
        except httpx.HTTPError:
            errors += 1
        time.sleep(0.01)
    return None, errors


def run(quick: bool = False) -> dict[str, Any]:
    publishes = 3 if quick else 10
    history_days, interval = (3, 1800.0) if quick else (30, 600.0)
    with temp_home("milton-bench-reload-") as (home, settings):
        rows = fill_and_train(settings, history_days, interval, seed=61)
        batch = as_records(Workstation(host="ws1", seed=99).snapshot(T_END + 600) * 4)
        env = {"MILTON_SERVE__RELOAD_POLL_S": "0.1", "MILTON_SERVE__SNAPSHOT_ENABLED": "false"}
        stop = threading.Event()
        lock = threading.Lock()
        load: dict[str, Any] = {"ok": 0, "failed": [], "versions": set(), "latencies": []}

        with live_server(home, env) as server:
            base = server.base

            def client() -> None:
                with httpx.Client(timeout=30) as http:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        try:
                            r = http.post(f"{base}/anomaly/score", json={"rows": batch})
                            ok = r.status_code == 200 and len(r.json()["results"]) == len(batch)
                            info = r.json()["model_version"] if ok else f"HTTP {r.status_code}"
                        except (httpx.HTTPError, ValueError) as exc:
                            ok, info = False, repr(exc)
                        dt = time.perf_counter() - t0
                        with lock:
                            if ok:
                                load["ok"] += 1
                                load["versions"].add(info)
                                load["latencies"].append(dt)
                            else:
                                load["failed"].append(info)

            threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # load running before the first publish
            reload_s: list[float | None] = []
            swap_s, load_s, train_s = [], [], []
            poll_errors = 0
            t_start = time.monotonic()
            try:
                with httpx.Client() as poll:
                    for i in range(publishes):
                        t0 = time.monotonic()
                        job = run_job("train-anomaly", train_anomaly, settings,
                                      now=utc(T_END + (i + 1) * 60))
                        published = time.monotonic()  # publish is the job's last step
                        train_s.append(published - t0)
                        version = job.metrics["version"]
                        latency, errs = _wait_for(poll, base, version, published)
                        poll_errors += errs
                        reload_s.append(latency)
                        tel = poll.get(f"{base}/ml/telemetry", timeout=10).json()["anomaly"]
                        if tel["current_version"] == version:
                            swap_s.append(tel["last_swap_s"])
                            load_s.append(tel["last_load_s"])
                        time.sleep(0.2)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=60)
            load_window = time.monotonic() - t_start
            telemetry = httpx.get(f"{base}/ml/telemetry", timeout=10).json()["anomaly"]

    ok_latencies = [x for x in reload_s if x is not None]
    missed = len(reload_s) - len(ok_latencies)
    failed = len(load["failed"]) + poll_errors
    figures = {
        "publishes": publishes,
        "reload_latency_max_s": round(max(ok_latencies), 4) if not missed else None,
        "reload_latency_median_s": round(median(ok_latencies), 4) if ok_latencies else None,
        "reload_latency_all_s": [None if x is None else round(x, 4) for x in reload_s],
        "reloads_never_seen": missed,
        "swap_max_s": round(max(swap_s), 6) if swap_s else None,
        "swap_median_s": round(median(swap_s), 6) if swap_s else None,
        "load_median_s": round(median(load_s), 4) if load_s else None,
        "load_max_s": round(max(load_s), 4) if load_s else None,
        "train_job_median_s": round(median(train_s), 4),
        "failed_requests": failed,
        "failed_examples": load["failed"][:5],
        "ok_requests": load["ok"],
        "client_rows_per_s": round(load["ok"] * len(batch) / load_window),
        "client_request_median_s": round(median(load["latencies"]), 4) if load["latencies"] else None,
        "versions_served": len(load["versions"]),
        "server_reloads": telemetry["reloads"],
        "server_reload_failures": telemetry["reload_failures"],
    }
    return {
        "params": {"publishes": publishes, "clients": CLIENTS, "batch_rows": len(batch),
                   "history_days": history_days, "history_rows": rows, "interval_s": interval,
                   "reload_poll_s": 0.1, "snapshot_enabled": False,
                   "latency": "from train-anomaly job return (model published, current "
                              "switched) until GET /healthz reports the new version, polled "
                              "every 10 ms"},
        "figures": figures,
        "targets": [
            target("reload_latency_max_s", figures["reload_latency_max_s"], "<=",
                   TARGET_LATENCY_S, "s"),
            target("swap_max_s", figures["swap_max_s"], "<=", TARGET_SWAP_S, "s"),
            target("failed_requests", failed, "<=", 0, "requests"),
        ],
        "report_only": ["reload_latency_median_s", "load_median_s", "client_rows_per_s"],
        "notes": ["swap is the reference swap after verify+load (load_*_s is the verify+load)"],
    }
