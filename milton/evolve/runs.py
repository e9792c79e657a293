"""An evolve run's place on disk and in the store: ``data/evolve/run-<id>/`` and its stages.

Every stage writes its output into a temporary directory renamed into ``<stage>/`` with a
``stage.json`` (its metrics) once complete (:func:`run_stage`), so a killed run keeps its
finished stages; the report (``report.json``, ``report.png``) is written beside them. The
``evolve_runs`` row is closed by :func:`finish`. Shared by the job (:mod:`milton.evolve.jobs`)
and the report (:mod:`milton.evolve.report`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings
from milton.core.fsio import atomic_write_json
from milton.core.jobs import finish_run, work_dir
from milton.models.layout import BASE_KIND, artifact_store

STAGES = ("merge", "trim", "distil", "prune")
STAGE_FILE = "stage.json"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


def base_store(settings: Settings) -> ArtifactStore:
    return artifact_store(settings, BASE_KIND)


def run_dir(settings: Settings, run_id: int) -> Path:
    return work_dir(settings, "evolve", run_id)


def finish(db: sqlite_utils.Database, run_id: int, status: str, *, reason: str,
            metrics: dict[str, Any] | None = None, version: str | None = None) -> None:
    finish_run(db, "evolve_runs", run_id, status, reason=reason,
               metrics=json.dumps(metrics or {}, default=str), candidate_version=version)


# -- stages -------------------------------------------------------------------------------------
def read_stage(work: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((work / name / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_stage(work: Path, name: str, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``build(tmp)`` once: its directory and metrics appear as ``work/name`` only when done."""
    done = read_stage(work, name)
    if done is not None:
        return {**done, "resumed": True}
    tmp = work / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work / name, ignore_errors=True)  # a dir without stage.json is unfinished
    tmp.mkdir(parents=True)
    info = build(tmp)
    atomic_write_json(tmp / STAGE_FILE, info)
    os.rename(tmp, work / name)
    return info


def list_evolve_runs(conn: Any, limit: int = 20) -> list[dict[str, Any]]:
    """evolve attempts, newest first."""
    cols = ("id", "started", "finished", "status", "stage", "source", "adapter_version",
            "candidate_version", "reason")
    return [dict(zip(cols, r)) for r in conn.execute(
        f"select {', '.join(cols)} from evolve_runs order by id desc limit ?", [max(0, limit)])]
