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

_FIGURES = ("eval_ppl", "regression_ppl", "recall", "size_mb", "tokens_per_s")


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


def stage_rows(stages: dict[str, dict[str, Any]], serving: dict[str, Any] | None,
               verdicts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row for what serve runs, then one per stage and GGUF type (a skipped or excluded
    stage: one row saying why), each with the gate's verdict when there is one."""
    from milton.evolve.gate import label

    why = {v["candidate"]: v for v in verdicts or []}
    rows = []
    if serving is not None:
        rows.append(_row("serving", serving.get("name", "current"), serving, serving))
    for name in STAGES:
        info = stages.get(name)
        if not info:
            continue
        extra: dict[str, Any] = {"layers": info.get("layers")}
        if name == "distil":
            extra.update(kl_before=info.get("kl_before"), kl_after=info.get("kl_after"))
        if name == "prune":
            extra.update(sparsity=info.get("sparsity"), stopped=info.get("stopped"))
        if info.get("skipped"):
            rows.append({"stage": name, "format": "-", "verdict": f"skipped: {info['skipped']}"})
            continue
        types = info.get("types") or {info.get("format", "-"): info}
        for kind, figures in types.items():
            row = _row(name, kind, figures, serving, **extra)
            verdict = why.get(label(row))
            if info.get("excluded"):
                row["verdict"] = f"excluded: {info['excluded']}"
            elif kind in (info.get("not_offered") or {}):
                row["verdict"] = f"not offered: {info['not_offered'][kind]}"
            elif verdict is not None:
                row.update(won=verdict["won"], verdict=verdict["why"])
            rows.append(row)
    return rows


def prune_curve(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Sparsity against perplexity (HF, held-out) of every pruning iteration, the start at 0."""
    info = stages.get("prune") or {}
    if not info.get("iterations"):
        return []
    start = [{"sparsity": 0.0, "ppl": info.get("start_ppl"), "accepted": True}]
    return start + [{k: it.get(k) for k in ("sparsity", "ppl", "quality", "accepted")}
                    for it in info["iterations"]]


def build_report(run_id: int, stages: dict[str, dict[str, Any]], serving: dict[str, Any],
                 decision: Any, *, verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    from milton.evolve.gate import RULE

    return {"run": run_id, "promoted": decision.promote, "reason": decision.reason,
            "winner": decision.checks.get("winner"), "rule": RULE, "checks": decision.checks,
            "rows": stage_rows(stages, serving, verdicts), "prune_curve": prune_curve(stages)}


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
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"evolve run {report['run']}: {report.get('status', '')}")
    for name in ("stage", "model", "layers", "sparsity", "size MB", "tok/s", "speedup",
                 "eval ppl", "regr. ppl", "quality", "recall", "verdict"):
        table.add_column(name, justify="left" if name in ("stage", "model", "verdict") else "right")
    for row in report["rows"]:
        table.add_row(("* " if row.get("won") else "") + row["stage"], escape(str(row["format"])),
                      _fmt(row.get("layers"), "d"),
                      _fmt(row.get("sparsity"), ".0%"), _fmt(row.get("size_mb"), ".1f"),
                      _fmt(row.get("tokens_per_s"), ".1f"), _fmt(row.get("speedup"), ".2f"),
                      _fmt(row.get("eval_ppl"), ".3g"), _fmt(row.get("regression_ppl"), ".3g"),
                      _fmt(row.get("quality"), ".0%"), _fmt(row.get("recall"), ".0%"),
                      escape(str(row.get("verdict") or "")))
    return table


def write_plot(report: dict[str, Any], path: Path) -> Path | None:
    """Quality against size on disk, one point per stage and type (the winner starred), the
    threshold dashed, and pruning's sparsity-perplexity curve beside it; None if no stage has
    both figures yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in report["rows"] if r.get("size_mb") and r.get("quality") is not None]
    if not points:
        return None
    curve = [c for c in report.get("prune_curve") or [] if c.get("ppl") is not None]
    if curve:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
        ax2.plot([c["sparsity"] for c in curve], [c["ppl"] for c in curve], marker="o")
        for c in curve:
            if not c.get("accepted"):
                ax2.scatter(c["sparsity"], c["ppl"], color="tab:red", zorder=3)
        ax2.set_xlabel("sparsity (share of decoder weights zeroed)")
        ax2.set_ylabel("held-out perplexity (HF, after recovery)")
        ax2.set_title("pruning: sparsity vs perplexity (red: undone)", fontsize=10)
        ax2.grid(True, alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        for row in points:
            serving = row["stage"] == "serving"
            ax.scatter(row["size_mb"], row["quality"], s=60, marker="s" if serving else "o",
                       color="tab:gray" if serving else "tab:blue", zorder=3)
            label = "serving" if serving else f"{row['stage']} ({row['format']})" + (" *" if row.get("won") else "")
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
