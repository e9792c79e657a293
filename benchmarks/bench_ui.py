"""The dashboard on a big store: p95 latency of the Overview and Anomalies pages (GET /ui/ and
/ui/anomalies over HTTP from a real `milton serve`) on a store with 1M process rows, 100k
memories and a year of job runs (plus a year of alerts, sessions and model versions). The other
pages and /healthz (the server's floor, same run) are reported. Pages must cost the same on a
year-old store: every query is bounded by an index and a window or a limit."""

from __future__ import annotations

import json
import random
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import DAY, T_END, live_server, target, temp_home, utc
from milton.core.store import open_store
from milton.core.timeutil import iso

TARGET_P95_S = 0.300
NAMES = ["systemd", "bash", "sshd", "python3", "nginx", "postgres", "chrome", "code", "cron",
         "dockerd", "containerd", "kworker/0:1", "rsyslogd", "node", "java", "redis-server"]
#: (job, runs per day) of the default schedule, roughly
JOBS = [("ingest", 288), ("train-anomaly", 24), ("agent", 0), ("ingest-documents", 4),
        ("briefing", 2), ("check", 1), ("train-lora", 1), ("backup", 1 / 7),
        ("compress-memory", 1 / 7), ("evolve", 1 / 30)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def build_store(settings: Any, *, process_rows: int, memories: int, days: int, seed: int = 7) -> dict[str, int]:
    """Write the big store with plain executemany (the layout the real writers produce)."""
    rng = random.Random(seed)
    db = open_store(settings.db_path)
    conn = db.conn
    counts: dict[str, int] = {}
    try:
        # processes: 4 hosts, 30 processes a snapshot, every 10 minutes, ending at T_END
        hosts, per_snap = 4, 30
        snaps = process_rows // (hosts * per_snap)
        with db.atomic():
            for k in range(snaps):
                ts = T_END - (snaps - k) * 600.0
                for h in range(hosts):
                    sid = f"ws{h}-{k}"
                    conn.execute("insert into snapshots values (?, ?, ?, 'bench', ?)", (sid, f"ws{h}", ts, per_snap))
                    conn.executemany(
                        "insert into processes values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(sid, f"ws{h}", ts, 100 + p, 1, NAMES[p % len(NAMES)],
                          f"/usr/bin/{NAMES[p % len(NAMES)]}", "root" if p % 3 else "ann",
                          rng.random() * 10, rng.randrange(1, 500) * 1048576, ts - 3600)
                         for p in range(per_snap)])
        counts["process_rows"] = snaps * hosts * per_snap
        # alerts: a year, ~20 a day; the last 40 still open
        alerts = []
        for d in range(days):
            for i in range(20):
                ts = T_END - (days - d) * DAY + i * 3600
                host, name = f"ws{i % 4}", f"odd-{rng.randrange(1000)}"
                alerts.append((ts, host, name, "eve", "/tmp/x", 0.9, "v000001",
                               json.dumps([f"rare process {name}"]),
                               f"{host}\0{name}\0eve\0/tmp/x\0{d}.{i}", utc(ts).date().isoformat(),
                               ts, ts, 1, ts + 60))
        for i in range(len(alerts) - 40, len(alerts)):
            alerts[i] = (*alerts[i][:-1], None)
        with db.atomic():
            conn.executemany(
                "insert into alerts (ts, host, name, username, exe, score, model_version, reasons, ident, day, "
                "first_ts, last_ts, count, acked_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", alerts)
        counts["alerts"] = len(alerts)
        # memories: 100k in three tiers, plus sessions with messages
        with db.atomic():
            for s in range(1000):
                conn.execute("insert into sessions (id, user, source, started, last_activity, status) "
                             "values (?, 'ann', 'bench', ?, ?, 'processed')", (f"s{s}", T_END - s * 600, T_END - s * 600))
                conn.executemany("insert into messages (session_id, seq, role, content, ts) values (?, ?, ?, ?, ?)",
                                 [(f"s{s}", q, "user" if q % 2 == 0 else "assistant", f"message {q} of {s}",
                                   T_END - s * 600 + q) for q in range(10)])
            tiers = ["short", "long", "long", "working"]
            conn.executemany(
                "insert into memories (tier, category, content, importance, tags, created, last_accessed, "
                "content_hash) values (?, 'note', ?, 0.5, '[]', ?, ?, ?)",
                [(tiers[i % 4], f"memory {i} about topic {i % 97} and thing {i % 13}", T_END - i * 300,
                  T_END - i * 300, f"h{i}") for i in range(memories)])
        counts["memories"] = memories
        # a year of job runs on the default schedule
        runs = []
        for job, per_day in JOBS:
            n = int(days * per_day)
            for k in range(n):
                started = utc(T_END - days * DAY + k * DAY / max(per_day, 1e-9))
                status = "failed" if rng.random() < 0.01 else ("skipped" if rng.random() < 0.05 else "ok")
                took = rng.random() * 5
                runs.append((job, iso(started), iso(started + timedelta(seconds=took)), status,
                             json.dumps({"duration_s": took, "rows": 30}), "boom" if status == "failed" else None))
        runs.sort(key=lambda r: r[1])
        with db.atomic():
            conn.executemany("insert into job_runs (job, started, finished, status, metrics, error, host, pid) "
                             "values (?, ?, ?, ?, ?, ?, 'ws0', 1)", runs)
        counts["job_runs"] = len(runs)
    finally:
        db.close()
    # model versions: an anomaly model and ten adapters
    from milton.models.layout import ADAPTER_KIND, ANOMALY_KIND, artifact_store

    def build(tmp: Path) -> None:
        (tmp / "model.bin").write_bytes(b"x" * 1024)
    artifact_store(settings, ANOMALY_KIND).publish(build, metrics={"contamination": 0.01},
                                                   data_window={"days": 30})
    for i in range(10):
        artifact_store(settings, ADAPTER_KIND).publish(
            build, metrics={"eval_ppl": 30 - i, "decision": "promoted"}, created=utc(T_END - (10 - i) * DAY))
    return counts


def _time(client: httpx.Client, path: str, repeats: int) -> list[float]:
    client.get(path).raise_for_status()  # warm: imports, caches
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        response = client.get(path)
        out.append(time.perf_counter() - t0)
        response.raise_for_status()
    return out


def run(quick: bool = False) -> dict[str, Any]:
    process_rows, memories, days, repeats = ((100_000, 10_000, 30, 10) if quick else
                                             (1_000_000, 100_000, 365, 40))
    with temp_home("milton-bench-ui-") as (home, settings):
        t0 = time.perf_counter()
        counts = build_store(settings, process_rows=process_rows, memories=memories, days=days)
        build_s = time.perf_counter() - t0
        env = {"MILTON_SERVE__CHAT_ENABLED": "false"}
        timings: dict[str, list[float]] = {}
        with live_server(home, env, timeout=180) as server, \
                httpx.Client(base_url=server.base, timeout=60) as client:
            pages = {"healthz": "/healthz", "overview": "/ui/", "anomalies": "/ui/anomalies",
                     "anomalies_search": "/ui/anomalies?q=ssh", "learning": "/ui/learning",
                     "jobs": "/ui/jobs", "memory_list": "/ui/memory"}
            for name, path in pages.items():
                timings[name] = _time(client, path, repeats if name in ("overview", "anomalies") else repeats // 4)
    figures: dict[str, Any] = {"store_build_s": round(build_s, 1), **counts}
    for name, values in timings.items():
        figures[f"{name}_p95_ms"] = round(_percentile(values, 0.95) * 1000, 1)
        figures[f"{name}_median_ms"] = round(statistics.median(values) * 1000, 1)
    return {
        "params": {"process_rows": process_rows, "memories": memories, "days_of_job_runs": days,
                   "repeats": repeats},
        "figures": figures,
        "timings_s": timings,
        "targets": [
            target("overview p95", figures["overview_p95_ms"], "<=", TARGET_P95_S * 1000, "ms"),
            target("anomalies p95", figures["anomalies_p95_ms"], "<=", TARGET_P95_S * 1000, "ms"),
        ],
        "notes": ["HTTP GET from a client on the same machine to a real `milton serve` (chat off); "
                  "the other pages and /healthz are reported only"],
    }
