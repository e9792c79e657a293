"""What each dashboard page shows, gathered through the same functions the CLI calls
(:func:`milton.ops.status.gather_status`, :mod:`milton.anomaly.alerts`,
:func:`milton.memory.search.search`, the artifact stores, the run tables). Every query is
bounded by an index and a window or a limit, so a page costs the same on a year-old store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from milton.core.config import Settings
from milton.core.timeutil import iso, parse_timestamp

ALERT_WINDOW_DAYS = 30  #: the alert timeline's window
OPEN_ALERTS_SHOWN = 200
PROCESSES_SHOWN = 200
RUNS_SHOWN = 500  #: job runs in the history table and chart (newest)
HISTORY_SHOWN = 30  #: model history events


def _ts(value: str | None) -> float | None:
    return parse_timestamp(value).timestamp() if value else None


def when(ts: float | str | None) -> str:
    """A timestamp (epoch or ISO) as 'YYYY-MM-DD HH:MM' UTC, '-' for none."""
    if ts is None or ts == "":
        return "-"
    if isinstance(ts, str):
        ts = parse_timestamp(ts).timestamp()
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


# -- Overview ---------------------------------------------------------------------------------
def overview(settings: Settings, now: datetime) -> dict[str, Any]:
    from milton.ops.status import age, gather_status

    report = gather_status(settings, now=now)
    return {"report": report, "age": lambda value: age(value, now)}


# -- Anomalies --------------------------------------------------------------------------------
def anomalies(settings: Settings, conn: Any, now: datetime, *, query: str | None,
              serving: dict[str, Any] | None) -> dict[str, Any]:
    """``serving``: serve's own view of its anomaly model (loaded version, reloads, errors)."""
    from milton.anomaly.alerts import alerts_per_day, list_alerts, list_mutes
    from milton.anomaly.detect import latest_rows
    from milton.models.layout import ANOMALY_KIND, artifact_store
    from milton.web.charts import xy_chart

    since = (now - timedelta(days=ALERT_WINDOW_DAYS)).timestamp()
    per_day = alerts_per_day(conn, since)
    series = {host: [(parse_timestamp(day).timestamp(), n, f"{host} {day}: {n} alert(s)")
                     for day, n in days] for host, days in per_day.items()}
    processes = []
    if query:
        cols = ("snapshot_id", "host", "ts", "pid", "ppid", "name", "exe", "username", "cpu",
                "rss", "create_time")
        processes = [dict(zip(cols, r)) for r in
                     latest_rows(conn, now.timestamp(), contains=query, limit=PROCESSES_SHOWN)]
    store = artifact_store(settings, ANOMALY_KIND)
    current = store.current()
    model = None
    if current is not None:
        model = {"version": current.name, "created": current.created,
                 "contamination": current.metrics.get("contamination"),
                 "window": current.manifest.get("data_window") or {},
                 "metrics": current.metrics}
    return {
        "timeline": xy_chart(series, zero=True, days=True),
        "window_days": ALERT_WINDOW_DAYS,
        "alerts": list_alerts(conn, limit=OPEN_ALERTS_SHOWN),
        "mutes": list_mutes(conn),
        "query": query or "",
        "processes": processes,
        "model": model,
        "serving": serving,
        "history": store.history()[-HISTORY_SHOWN:][::-1],
    }


# -- Learning ---------------------------------------------------------------------------------
PPL_SETS = ("eval_ppl", "regression_ppl", "retention_ppl")
#: What the gate decides on: recall of this run's facts and of earlier runs' (train.recall)
RECALL_SETS = ("recall_new", "recall_retention")


def _versions(settings: Settings, kind: str) -> dict[str, Any]:
    from milton.models.layout import artifact_store

    store = artifact_store(settings, kind)
    current, pins = store.current_name(), store.pins()
    versions = [{"name": v.name, "created": v.created, "current": v.name == current,
                 "pinned": v.name in pins, "metrics": v.metrics,
                 "reason": (v.manifest.get("gate") or {}).get("reason")} for v in store.versions()]
    return {"kind": kind, "current": current, "versions": versions,
            "history": store.history()[-HISTORY_SHOWN:][::-1]}


def _figure_rows(metrics: dict[str, Any], names: tuple[str, ...],
                 affix: str) -> list[dict[str, Any]]:
    """One row per measured figure: base / serving / candidate (None where not measured)."""
    rows = []
    for name in names:
        row: dict[str, Any] = {"set": name.removesuffix(affix).removeprefix(affix)}
        for who in ("base", "serving", "candidate"):
            value = (metrics.get(who) or {}).get(name)
            row[who] = value if isinstance(value, (int, float)) else None
        if any(row[w] is not None for w in ("base", "serving", "candidate")):
            rows.append(row)
    return rows


def learning(settings: Settings, db: Any, *, run_id: int | None,
             evolve_id: int | None) -> dict[str, Any]:
    from milton.core.errors import InputError
    from milton.evolve.report import load_report
    from milton.evolve.runs import list_evolve_runs
    from milton.models.layout import ADAPTER_KIND, BASE_KIND
    from milton.train.jobs import list_training_runs, training_history
    from milton.web.charts import xy_chart

    runs = list_training_runs(db.conn)
    selected = next((r for r in runs if r["id"] == run_id), runs[0] if runs else None)
    if run_id is not None and (selected is None or selected["id"] != run_id):
        raise InputError(f"train-lora run {run_id}: no such run (the newest 20 are shown)")
    loss = None
    ppl_rows: list[dict[str, Any]] = []
    recall_rows: list[dict[str, Any]] = []
    if selected is not None:
        steps = training_history(db.conn, selected["id"])
        loss = xy_chart({"loss": [(s["step"], s["loss"], f"step {s['step']}: loss {s['loss']:.4f}")
                                  for s in steps]}, width=520, height=260)
        metrics = selected["metrics"]
        ppl_rows = _figure_rows(metrics, PPL_SETS, "_ppl")
        recall_rows = _figure_rows(metrics, RECALL_SETS, "recall_")

    adapters = _versions(settings, ADAPTER_KIND)
    points = [(_ts(v["created"]), v["metrics"]["eval_ppl"],
               f"{v['name']}: held-out ppl {v['metrics']['eval_ppl']:.3f}"
               + (" (current)" if v["current"] else ""))
              for v in adapters["versions"]
              if isinstance(v["metrics"].get("eval_ppl"), (int, float)) and v["created"]]
    adapter_chart = xy_chart({"held-out perplexity": points}, days=True)

    evolve_runs = list_evolve_runs(db.conn)
    report, quality = None, None
    if evolve_runs:
        try:
            report = load_report(settings, db, evolve_id if evolve_id is not None else evolve_runs[0]["id"])
        except InputError:
            if evolve_id is not None:
                raise
        if report is not None:
            pts = [(r["size_mb"], r["quality"], f"{r['stage']} {r['format']}: {r['size_mb']:.0f} MB, "
                    f"{r['quality']:.3f}")
                   for r in report["rows"] if r.get("size_mb") and r.get("quality") is not None]
            quality = xy_chart({"stages": pts}, connect=False,
                               hline=(report.get("checks") or {}).get("threshold"), labels=True)
    return {
        "runs": runs, "run": selected, "loss": loss, "ppl_rows": ppl_rows,
        "recall_rows": recall_rows,
        "adapters": adapters, "adapter_chart": adapter_chart, "bases": _versions(settings, BASE_KIND),
        "evolve_runs": evolve_runs, "report": report, "quality": quality,
    }


# -- Memory -----------------------------------------------------------------------------------
def memory(settings: Settings, db: Any, now: datetime, embedder: Callable[[], Any], *,
           query: str | None, k: int, tier: str | None, since: str | None, tag: str | None,
           mode: str) -> dict[str, Any]:
    from milton.core.errors import InputError
    from milton.memory.memories import list_memories, list_tasks, memory_stats
    from milton.memory.search import MODES, search
    from milton.memory.sessions import list_sessions

    if mode not in MODES:
        raise InputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if not 1 <= k <= 1000:
        raise InputError(f"k: expected 1..1000, got {k}")
    cutoff = parse_timestamp(since, field="since").timestamp() if since else None
    hits, recent = [], []
    if query:
        hits = search(db, None if mode == "keyword" else embedder(), query, settings.memory, now,
                      k=k, tier=tier, since=cutoff, tag=tag, mode=mode)
    else:
        recent = list_memories(db, tier=tier, since=cutoff, tag=tag, limit=50)
    return {
        "query": query or "", "k": k, "tier": tier or "", "since": since or "", "tag": tag or "",
        "mode": mode, "modes": MODES, "hits": hits, "recent": recent,
        "stats": memory_stats(db),
        "tasks": list_tasks(db, include_completed=True),
        "sessions": list_sessions(db, 20),
    }


def memory_detail(db: Any, memory_id: int) -> dict[str, Any]:
    from milton.memory.memories import get_memory

    return {"memory": get_memory(db, memory_id)}


def session_detail(db: Any, session_id: str) -> dict[str, Any]:
    from milton.core.errors import InputError
    from milton.memory.export import iter_export
    from milton.memory.memories import session_memories

    records = list(iter_export(db, session_ids=[session_id]))
    if not records:
        raise InputError(f"session {session_id}: no such session")
    return {"session": records[0], "memories": session_memories(db, session_id)}


# -- Jobs -------------------------------------------------------------------------------------
def jobs(conn: Any, now: datetime, *, job: str | None, days: float) -> dict[str, Any]:
    from milton.core.jobs import job_names, recent_runs
    from milton.web.charts import bar_chart

    since = iso(now - timedelta(days=days))
    runs = recent_runs(conn, job=job, since=since, limit=RUNS_SHOWN)
    bars = [(r["started"][5:16].replace("T", " "), r["duration_s"] or 0.0, r["status"],
             f"{r['job']} #{r['id']} {r['started']}: {r['status']}"
             + (f", {r['duration_s']:.1f}s" if r["duration_s"] is not None else ""))
            for r in sorted(runs, key=lambda r: (r["started"], r["id"]))]
    return {"runs": runs, "chart": bar_chart(bars), "job": job or "", "days": days,
            "names": job_names(conn), "limit": RUNS_SHOWN}


def job_detail(conn: Any, run_id: int) -> dict[str, Any]:
    from milton.core.errors import InputError
    from milton.core.jobs import get_run

    run = get_run(conn, run_id)
    if run is None:
        raise InputError(f"job run {run_id}: no such run")
    return {"run": run}
