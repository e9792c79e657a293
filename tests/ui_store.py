"""A small store with something on every dashboard page, written through the real functions
where they exist (alerts, memories, artifacts) and plain SQL for run history. Returns what the
pages must show, so the browser tests compare charts and tables with the store."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

XSS = "<script>alert(1)</script>"


def seed(settings: Any, embedder: Any, now: Any) -> dict[str, Any]:
    from milton.anomaly.alerts import record
    from milton.core.store import open_store
    from milton.core.timeutil import iso
    from milton.evolve.runs import REPORT_JSON, run_dir
    from milton.memory.memories import NewMemory, add_memories, add_task
    from milton.models.layout import ADAPTER_KIND, ANOMALY_KIND, artifact_store

    db = open_store(settings.db_path)
    t = now.timestamp()
    try:
        # -- processes: the latest snapshot of two hosts, one process named like markup
        for host, names in (("alpha", ["bash", "sshd", XSS]), ("beta", ["nginx", "postgres"])):
            sid = f"{host}-1"
            db.conn.execute("insert into snapshots (id, host, ts, source, rows) values (?, ?, ?, 'test', ?)",
                            (sid, host, t - 600, len(names)))
            for pid, name in enumerate(names, start=100):
                db.conn.execute(
                    "insert into processes (snapshot_id, host, ts, pid, ppid, name, exe, username, cpu, rss, "
                    "create_time) values (?, ?, ?, ?, 1, ?, ?, 'root', 0.5, 1048576, ?)",
                    (sid, host, t - 600, pid, name, f"/usr/bin/{name}", t - 9000))
        db.conn.commit()
        # -- alerts on three days (alpha: 3 days, beta: 1 day) = 4 chart points
        alerts_by_day = [("alpha", 2, "cryptominer"), ("alpha", 1, XSS), ("alpha", 0, "nc"),
                         ("beta", 1, "weird")]
        for host, days_ago, name in alerts_by_day:
            ts = t - days_ago * 86400 - 60
            record(db, [{"flagged": True, "host": host, "name": name, "username": "eve", "exe": f"/tmp/{name}",
                         "pid": 4242, "ts": ts, "score": 0.9, "parent": "bash",
                         "reasons": [f"unusual {name} <b>bold</b>"]}],
                   snapshot_id=None, model_version="v000001")
        # -- job runs: 6 runs of two jobs over 3 days, one failed
        runs = [("ingest", 3, "ok", 1.5, None), ("ingest", 2, "ok", 2.5, None),
                ("ingest", 1, "failed", 0.5, "disk <full>"), ("backup", 2, "ok", 12.0, None),
                ("backup", 1, "ok", 10.0, None), ("ingest", 0, "skipped", 0.1, None)]
        for job, days_ago, status, took, error in runs:
            started = now - timedelta(days=days_ago, minutes=5)
            db.conn.execute(
                "insert into job_runs (job, started, finished, status, metrics, error, host, pid) "
                "values (?, ?, ?, ?, ?, ?, 'alpha', 1)",
                (job, iso(started), iso(started + timedelta(seconds=took)), status,
                 json.dumps({"duration_s": took, "rows": 10}), error))
        # -- a train-lora run with a 12-step loss curve, and its evaluation
        metrics = {name: {"eval_ppl": ppl, "regression_ppl": ppl + 1, "retention_ppl": ppl + 2,
                          "recall_new": recall, "recall_retention": recall / 2}
                   for name, ppl, recall in (("base", 30.0, 0.0), ("serving", 25.0, 0.25),
                                             ("candidate", 20.0, 0.875))}
        db.conn.execute(
            "insert into training_runs (id, started, finished, status, base_model, candidate_version, metrics, "
            "reason) values (1, ?, ?, 'promoted', 'gemma', 'v000002', ?, 'held-out perplexity 25 -> 20')",
            (iso(now - timedelta(hours=5)), iso(now - timedelta(hours=4)), json.dumps(metrics)))
        for step in range(1, 13):
            db.conn.execute("insert into training_history (run_id, step, loss, lr, tokens, elapsed_s) "
                            "values (1, ?, ?, 0.0001, 100, ?)", (step, 3.0 / step, step * 1.5))
        # -- an evolve run with its report (3 stages with size and quality)
        db.conn.execute("insert into evolve_runs (id, started, finished, status, stage, reason) "
                        "values (1, ?, ?, 'rejected', 'export', 'quality below threshold')",
                        (iso(now - timedelta(hours=3)), iso(now - timedelta(hours=2))))
        db.conn.commit()
        report = {"run": 1, "promote_type": "q4_k_m", "promoted": False, "reason": "quality below threshold",
                  "checks": {"threshold": 0.95},
                  "rows": [{"stage": "serving", "format": "q4_k_m", "size_mb": 250.0, "eval_ppl": 20.0,
                            "quality": 1.0},
                           {"stage": "merge", "format": "f16", "size_mb": 540.0, "eval_ppl": 20.1, "quality": 0.99},
                           {"stage": "quantize", "format": "q4_k_m", "size_mb": 240.0, "eval_ppl": 23.0,
                            "quality": 0.87}]}
        work = run_dir(settings, 1)
        work.mkdir(parents=True, exist_ok=True)
        (work / REPORT_JSON).write_text(json.dumps(report))
        # -- memories (one with markup), a task, a session with chat text carrying markup
        db.conn.execute("insert into sessions (id, user, source, started, last_activity, status, topics) "
                        "values ('s-1', 'ann', 'test', ?, ?, 'processed', '[\"cooking\"]')", (t - 7200, t - 7000))
        for seq, (role, text) in enumerate([("user", f"how do I bake bread? {XSS}"),
                                            ("assistant", "Knead <i>well</i> and wait.")]):
            db.conn.execute("insert into messages (session_id, seq, role, content, ts) values ('s-1', ?, ?, ?, ?)",
                            (seq, role, text, t - 7200 + seq))
        db.conn.commit()
        ids = add_memories(db, embedder, [
            NewMemory("The user bakes sourdough bread every Sunday.", tags=["cooking"]),
            NewMemory(f"A note with markup {XSS}", tier="long"),
            NewMemory("user: how do I bake bread? assistant: knead well", tier="short", session_id="s-1"),
        ], now)
        add_task(db, embedder, "Buy rye flour", now)
    finally:
        db.close()
    # -- artifacts: three adapter versions (v2 current), one anomaly model
    adapters = artifact_store(settings, ADAPTER_KIND)

    def build(text: str):
        return lambda tmp: Path(tmp, "adapter.gguf").write_text(text)
    for i, (ppl, decision) in enumerate(((28.0, "promoted"), (22.0, "promoted"), (24.0, "rejected")), start=1):
        adapters.publish(build(f"adapter {i}"), metrics={"eval_ppl": ppl, "regression_ppl": ppl + 1,
                                                         "decision": decision},
                         extra={"gate": {"reason": f"gate says {decision}"}},
                         make_current=decision == "promoted", created=now - timedelta(days=3 - i))
    anomaly = artifact_store(settings, ANOMALY_KIND)
    anomaly.publish(build("model"), metrics={"contamination": 0.0123, "train_rows": 500},
                    data_window={"start": iso(now - timedelta(days=7)), "end": iso(now)})
    return {"alert_points": 4, "open_alerts": 4, "loss_points": 12, "adapter_points": 3,
            "quality_points": 3, "job_runs": len(runs), "memories": ids}
