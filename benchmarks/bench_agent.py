"""Fleet agent throughput: a spooled backlog of snapshots pushed to a live hub's
``POST /ingest/processes`` over loopback (validation, idempotent store, one keep-alive
connection), against the hub's own store path in-process (``store_push`` on the same rows) as
the baseline of the same run. Report only."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import DAY, T_END, live_server, median, temp_home, timed
from milton.anomaly.simulate import Workstation
from milton.core.store import open_store
from milton.ingest.agent import HubClient, Spool, flush
from milton.ingest.hub import store_push

ROWS_PER_SNAPSHOT = 300  # a busy workstation or server


def _snapshots(n: int) -> list[list[tuple]]:
    """``n`` snapshots of ROWS_PER_SNAPSHOT rows (simulator rows, pids made unique)."""
    ws = Workstation(host="bench1", seed=61)
    out = []
    ts = T_END - DAY
    for i in range(n):
        rows: list[tuple] = []
        k = 0
        while len(rows) < ROWS_PER_SNAPSHOT:
            for r in ws.snapshot(ts + k):
                if len(rows) < ROWS_PER_SNAPSHOT:
                    rows.append((f"bench-{i}", r[1], ts, 100 + len(rows), r[4], *r[5:]))
            k += 1
        out.append(rows)
        ts += 300.0
    return out


def run(quick: bool = False) -> dict[str, Any]:
    n = 200 if quick else 1000
    repeats = 3
    snaps = _snapshots(n)
    figures: dict[str, Any] = {}
    agent_t, direct_t = [], []
    with tempfile.TemporaryDirectory(prefix="milton-bench-agent-") as tmp:
        for rep in range(repeats):
            # baseline: the hub's store path alone, in-process, fresh store
            db = open_store(Path(tmp) / f"direct{rep}.db")
            flat = [r for s in snaps for r in s]
            seconds, _ = timed(lambda: store_push(db, flat))
            direct_t.append(seconds)
            db.close()
            # the agent: spool the backlog, then flush it to a live hub (fresh home each time)
            with temp_home("milton-bench-hub-") as (home, _settings):
                spool = Spool(Path(tmp) / f"spool{rep}")
                for s in snaps:
                    spool.append(s)
                with live_server(home, {"MILTON_SERVE__CHAT_ENABLED": "false"}) as server:
                    client = HubClient(server.base)
                    seconds, result = timed(lambda: flush(spool, client, batch_snapshots=20,
                                                          max_bytes=30 << 20))
                    client.close()
                if result.sent != n or spool.pending():
                    raise RuntimeError(f"agent sent {result.sent} of {n}")
                agent_t.append(seconds)
    figures["snapshots"] = n
    figures["rows_per_snapshot"] = ROWS_PER_SNAPSHOT
    figures["agent_snapshots_per_s"] = round(n / median(agent_t), 1)
    figures["agent_rows_per_s"] = round(n * ROWS_PER_SNAPSHOT / median(agent_t))
    figures["direct_snapshots_per_s"] = round(n / median(direct_t), 1)
    figures["agent_vs_direct"] = round(median(direct_t) / median(agent_t), 3)
    return {
        "params": {"snapshots": n, "rows_per_snapshot": ROWS_PER_SNAPSHOT, "batch_snapshots": 20,
                   "repeats": repeats, "timed": "flush(spool, hub) of the whole backlog over "
                   "loopback; baseline: store_push of the same rows in-process"},
        "figures": figures,
        "targets": [],
        "report_only": ["agent_snapshots_per_s", "agent_rows_per_s", "agent_vs_direct"],
        "notes": [],
    }
