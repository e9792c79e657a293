"""What an evolve run did, stage by stage: a table (quality, size, speed) and a PNG plot.

Quality is the serving model's perplexity over the stage's (1.0 = as good as what serve runs
now), on the held-out set, all measured in llama.cpp on the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.config import Settings
from milton.core.errors import InputError
from milton.evolve.runs import REPORT_JSON, STAGES, read_stage, run_dir

_FIGURES = ("eval_ppl", "regression_ppl", "size_mb", "tokens_per_s")


def _row(stage: str, fmt: str, figures: dict[str, Any], serving: dict[str, Any] | None,
         **extra: Any) -> dict[str, Any]:
    from milton.evolve.gate import quality

    row = {"stage": stage, "format": fmt, **{k: figures.get(k) for k in _FIGURES}, **extra}
    if serving is not None:
        row["quality"] = quality(serving.get("eval_ppl"), figures.get("eval_ppl"))
        row["regression_quality"] = quality(serving.get("regression_ppl"), figures.get("regression_ppl"))
        base_speed = serving.get("tokens_per_s")
        row["speedup"] = (figures["tokens_per_s"] / base_speed
                          if base_speed and figures.get("tokens_per_s") else None)
    return row


def stage_rows(stages: dict[str, dict[str, Any]], serving: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows = []
    if serving is not None:
        rows.append(_row("serving", serving.get("name", "current"), serving, serving))
    for name in ("merge", "distil", "prune"):
        info = stages.get(name)
        if info:
            extra = {"layers": info.get("layers")}
            if name == "distil":
                extra.update(kl_before=info.get("kl_before"), kl_after=info.get("kl_after"))
            if name == "prune":
                extra.update(sparsity=info.get("sparsity"), stopped=info.get("stopped"))
            rows.append(_row(name, info.get("format", "f16"), info, serving, **extra))
    export = stages.get("export") or {}
    for kind, figures in (export.get("types") or {}).items():
        if kind != "f16":
            rows.append(_row("quantize", kind, figures, serving))
    return rows


def build_report(run_id: int, stages: dict[str, dict[str, Any]], serving: dict[str, Any],
                 decision: Any, *, promote_type: str) -> dict[str, Any]:
    return {"run": run_id, "promote_type": promote_type, "promoted": decision.promote,
            "reason": decision.reason, "checks": decision.checks,
            "rows": stage_rows(stages, serving)}


def load_report(settings: Settings, db: sqlite_utils.Database, run: int | None) -> dict[str, Any]:
    """The report of evolve run ``run`` (default: the newest), partial for an unfinished run."""
    where, params = ("id = ?", [run]) if run is not None else ("1", [])
    row = db.execute(f"select id, status, stage, reason, started, finished from evolve_runs "
                     f"where {where} order by id desc limit 1", params).fetchone()
    if row is None:
        raise InputError(f"evolve run {run} not found" if run is not None
                         else "no evolve run yet (`milton evolve` starts one)")
    work = run_dir(settings, row[0])
    try:
        report = json.loads((work / REPORT_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        stages = {name: info for name in STAGES if (info := read_stage(work, name))}
        report = {"run": row[0], "promoted": False, "reason": row[3], "rows": stage_rows(stages, None)}
    report.update(status=row[1], stage=row[2], started=row[4], finished=row[5], dir=str(work))
    return report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"evolve run {report['run']}: {report.get('status', '')}")
    for name in ("stage", "model", "layers", "sparsity", "size MB", "tok/s", "speedup",
                 "eval ppl", "regr. ppl", "quality"):
        table.add_column(name, justify="left" if name in ("stage", "model") else "right")
    for row in report["rows"]:
        table.add_row(row["stage"], str(row["format"]), _fmt(row.get("layers"), "d"),
                      _fmt(row.get("sparsity"), ".0%"), _fmt(row.get("size_mb"), ".1f"),
                      _fmt(row.get("tokens_per_s"), ".1f"), _fmt(row.get("speedup"), ".2f"),
                      _fmt(row.get("eval_ppl"), ".3g"), _fmt(row.get("regression_ppl"), ".3g"),
                      _fmt(row.get("quality"), ".0%"))
    return table


def write_plot(report: dict[str, Any], path: Path) -> Path | None:
    """Quality against size on disk, one point per stage, the threshold dashed; None if no
    stage has both figures yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in report["rows"] if r.get("size_mb") and r.get("quality") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        for row in points:
            serving = row["stage"] == "serving"
            ax.scatter(row["size_mb"], row["quality"], s=60, marker="s" if serving else "o",
                       color="tab:gray" if serving else "tab:blue", zorder=3)
            label = "serving" if serving else f"{row['stage']} ({row['format']})"
            ax.annotate(label, (row["size_mb"], row["quality"]), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
        threshold = (report.get("checks") or {}).get("threshold")
        if threshold:
            ax.axhline(threshold, linestyle="--", color="tab:red", linewidth=1,
                       label=f"threshold {threshold:.0%}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("quality (serving ppl / ppl, held-out)")
        verdict = "promoted" if report.get("promoted") else "not promoted"
        ax.set_title(f"evolve run {report['run']}: {verdict}", fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path
