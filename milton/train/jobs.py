"""The nightly train-lora job: export, train, evaluate, gate (quality, then safety:
:mod:`milton.train.safety`), publish, notify.

One ``training_runs`` row per attempt. It stays 'running' while the work goes on, with its
dataset and checkpoints under ``data/train/run-<id>/``; a run killed mid-training is picked
up by the next job run, which continues from the last checkpoint with the same data. The
adapter registry is the shared artifacts core (kind ``adapter``): every finished candidate is
published with its metrics, and only one that passes the gate becomes ``current``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings
from milton.core.fsio import atomic_write_json
from milton.core.jobs import JobContext, finish_run, unfinished_run, work_dir
from milton.core.timeutil import iso, utcnow
from milton.models.layout import (
    ADAPTER_BASE_CONFIG,
    ADAPTER_DIR,
    ADAPTER_GGUF,
    ADAPTER_KIND,
    DATASET_DIR,
    artifact_store,
)


def adapter_store(settings: Settings) -> ArtifactStore:
    return artifact_store(settings, ADAPTER_KIND)


def run_dir(settings: Settings, run_id: int) -> Path:
    return work_dir(settings, "train", run_id)


def _finish_run(db: sqlite_utils.Database, run_id: int, status: str, *, reason: str,
                metrics: dict[str, Any], version: str | None) -> None:
    from milton.memory.memories import bump

    with db.atomic():
        finish_run(db, "training_runs", run_id, status, reason=reason,
                   metrics=json.dumps(metrics, default=str), candidate_version=version)
        if status == "promoted":
            bump(db, "fine_tunes")


def _history_hook(db: sqlite_utils.Database, run_id: int) -> Callable[..., None]:
    def on_step(step: int, loss: float, lr: float, tokens: int, elapsed_s: float) -> None:
        # replace: steps after the last checkpoint of a killed run are done again.
        db["training_history"].insert({"run_id": run_id, "step": step, "loss": loss, "lr": lr,
                                       "tokens": tokens, "elapsed_s": round(elapsed_s, 3)},
                                      replace=True)
    return on_step


def train_lora_job(*, max_steps: int | None = None) -> Callable[[JobContext], dict[str, Any]]:
    def job(ctx: JobContext) -> dict[str, Any]:
        return train_lora_run(ctx, max_steps=max_steps)

    return job


def train_lora_run(ctx: JobContext, *, max_steps: int | None = None) -> dict[str, Any]:
    from milton.core.notify import notify
    from milton.models.convert import lora_to_gguf, tools_dir
    from milton.models.refs import resolve_base
    from milton.train.dataset import (
        build_dataset,
        export_new_items,
        require_enough,
        write_dataset_files,
    )
    from milton.train.safety import load_probes

    settings, db = ctx.settings, ctx.db
    load_probes(settings)  # a bad train.safety_probes file fails now,
    tools_dir(settings)  # and missing converters, not after an hour of training
    ref = resolve_base(settings)

    # An unfinished run resumes; one whose base model changed is given up.
    resumed = unfinished_run(db, "training_runs", {"base_sha256": ref.sha256},
                             reason="base model changed; not resumed")
    with db.atomic():  # a Skip rolls the new run row and its items back
        run_id = resumed or db["training_runs"].insert({
            "job_run_id": ctx.run_id, "started": iso(utcnow()), "status": "running",
            "base_model": str(ref.path), "base_sha256": ref.sha256,
        }).last_pk
        export = None
        if resumed is None:
            export = export_new_items(db, settings, run_id, ctx.now)
            require_enough(export, settings)
    dataset = build_dataset(db, settings, run_id)
    work = run_dir(settings, run_id)
    write_dataset_files(dataset, work / DATASET_DIR)
    ctx.log("training data", training_run=run_id, resumed=resumed is not None, **dataset.counts())

    metrics, decision, serving_name = _train_and_evaluate(ctx, ref, dataset, run_id, work, max_steps)
    store = adapter_store(settings)
    result = metrics.pop("_result")

    def build(tmp: Path) -> None:
        from milton.models.hf import save_base_config
        from milton.train.lora import save_adapter

        save_adapter(result.model, tmp / ADAPTER_DIR)
        save_base_config(ref, result.model, tmp / ADAPTER_BASE_CONFIG)
        lora_to_gguf(settings, tmp / ADAPTER_DIR, tmp / ADAPTER_BASE_CONFIG, tmp / ADAPTER_GGUF)
        write_dataset_files(dataset, tmp / DATASET_DIR)  # the audit trail: what it learned from
        atomic_write_json(tmp / "metrics.json", metrics)

    watermark = db.execute("select watermark_message_id, watermark_document_ts from training_runs "
                           "where id = ?", [run_id]).fetchone()
    version = store.publish(
        build, metrics={**metrics["candidate"], "decision": "promoted" if decision.promote else "rejected"},
        data_window={"watermark_message_id": watermark[0], "watermark_document_ts": watermark[1],
                     **dataset.counts()},
        extra={"base_model": ref.as_dict(), "training_run": run_id, "gate": {
            "promote": decision.promote, "reason": decision.reason, "against": serving_name,
            "checks": decision.checks}, "evaluation": metrics},
        make_current=decision.promote,
    )
    status = "promoted" if decision.promote else "rejected"
    _finish_run(db, run_id, status, reason=decision.reason, metrics=metrics, version=version.name)
    shutil.rmtree(work, ignore_errors=True)
    if decision.promote:
        notify(settings, "promotion", f"milton: adapter {version.name} promoted", decision.reason)
    else:
        notify(settings, "rejection", f"milton: adapter {version.name} rejected",
               f"{decision.reason}; {serving_name} keeps serving")
    ctx.log(f"adapter {version.name} {status}", reason=decision.reason)
    return {
        "status_detail": status, "version": version.name, "reason": decision.reason,
        "against": serving_name, "run_id": run_id, "resumed_from": result.resumed_from,
        **{f"candidate_{k}": v for k, v in metrics["candidate"].items()},
        **{f"serving_{k}": v for k, v in metrics["serving"].items()},
        **(export.as_metrics() if export else {}), **result.metrics(),
    }


def _train_and_evaluate(ctx: JobContext, ref: Any, dataset: Any, run_id: int, work: Path,
                        max_steps: int | None) -> tuple[dict[str, Any], Any, str]:
    """Measure base, current and candidate on the same data in the same process."""
    from milton.models.hf import load_base
    from milton.train.evaluate import evaluate
    from milton.train.gate import decide
    from milton.train.lora import load_adapter, train_lora
    from milton.train.safety import SafetyGate

    settings, cfg = ctx.settings, ctx.settings.train
    fmt = settings.model.chat_format
    model, tokenizer = load_base(ref, settings.model.device, settings.model.threads)

    def measure(m: Any) -> dict[str, Any]:
        return evaluate(m, tokenizer, dataset.eval, dataset.regression, cfg, chat_format=fmt)

    base = measure(model)
    safety = SafetyGate(settings, tokenizer)
    current = adapter_store(settings).current()
    serving, serving_name = base, "base"
    if current is not None:
        peft = load_adapter(model, current.path / ADAPTER_DIR)
        serving, serving_name = measure(peft), f"current {current.name}"
        safety.baseline(peft)
        model = peft.unload()  # the bare base again, for a fresh adapter
    else:
        safety.baseline(model)
    result = train_lora(model, tokenizer, dataset.train, cfg, checkpoint_dir=work / "checkpoints",
                        on_step=_history_hook(ctx.db, run_id), max_steps_override=max_steps,
                        chat_format=fmt)
    candidate = measure(result.model)
    decision = decide(candidate, serving, cfg, serving_name=serving_name)
    decision = safety.apply(decision, result.model)  # secrets, degeneration, train.safety_probes
    metrics = {"base": base, "serving": serving, "candidate": candidate, "_result": result}
    return metrics, decision, serving_name
