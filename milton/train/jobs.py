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
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
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
from milton.train.facts import Fact


def adapter_store(settings: Settings) -> ArtifactStore:
    return artifact_store(settings, ADAPTER_KIND)


def run_dir(settings: Settings, run_id: int) -> Path:
    return work_dir(settings, "train", run_id)


def list_training_runs(conn: Any, limit: int = 20) -> list[dict[str, Any]]:
    """train-lora attempts, newest first, metrics (base / serving / candidate) decoded."""
    cols = ("id", "job_run_id", "started", "finished", "status", "base_model", "candidate_version",
            "metrics", "reason")
    rows = []
    for values in conn.execute(f"select {', '.join(cols)} from training_runs order by id desc "
                               "limit ?", [max(0, limit)]):
        row = dict(zip(cols, values))
        try:
            row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
        except json.JSONDecodeError:
            row["metrics"] = {}
        rows.append(row)
    return rows


def training_history(conn: Any, run_id: int, max_points: int = 500) -> list[dict[str, Any]]:
    """A run's loss curve (step, loss, lr, tokens, elapsed_s), thinned evenly to at most
    ``max_points`` steps (the last step always kept)."""
    total = conn.execute("select count(*) from training_history where run_id = ?", [run_id]).fetchone()[0]
    stride = max(1, -(-total // max_points))
    cols = ("step", "loss", "lr", "tokens", "elapsed_s")
    rows = conn.execute(
        f"select {', '.join(cols)} from (select *, row_number() over (order by step) - 1 as n, "
        "count(*) over () as total from training_history where run_id = ?) "
        "where n % ? = 0 or n = total - 1 order by step", [run_id, stride]).fetchall()
    return [dict(zip(cols, r)) for r in rows]


def _finish_run(db: sqlite_utils.Database, run_id: int, status: str, *, reason: str,
                metrics: dict[str, Any], version: str | None) -> None:
    from milton.memory.memories import bump

    recall = {f"{prefix}{key}": metrics.get(who, {}).get(key)
              for who, prefix in (("candidate", ""), ("serving", "serving_"))
              for key in ("recall_new", "recall_retention")}
    with db.atomic():
        finish_run(db, "training_runs", run_id, status, reason=reason,
                   metrics=json.dumps(metrics, default=str), candidate_version=version, **recall)
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
        watermarks,
        write_dataset_files,
    )
    from milton.train.safety import load_probes
    from milton.train.taught import export_facts

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
        export, new_facts = None, 0
        if resumed is None:
            since_id = watermarks(db)[0]
            export = export_new_items(db, settings, run_id, ctx.now)
            new_facts = export_facts(db, settings, run_id, since_id,
                                     export.watermark_message_id, ctx.now)
            if not new_facts:  # a night that taught facts is worth a run on its own
                require_enough(export, settings)
    dataset = build_dataset(db, settings, run_id)
    taught = add_fact_items(db, settings, dataset, run_id)
    work = run_dir(settings, run_id)
    write_dataset_files(dataset, work / DATASET_DIR)
    ctx.log("training data", training_run=run_id, resumed=resumed is not None, **dataset.counts(),
            **taught.counts())

    metrics, decision, serving_name = _train_and_evaluate(ctx, ref, dataset, taught, run_id, work,
                                                          max_steps)
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
        **{f"candidate_{k}": v for k, v in metrics["candidate"].items() if not k.endswith("_detail")},
        **{f"serving_{k}": v for k, v in metrics["serving"].items() if not k.endswith("_detail")},
        **(export.as_metrics() if export else {}), **result.metrics(), **taught.counts(),
        "new_facts_stored": new_facts,
    }


@dataclass
class Taught:
    """The facts a run trains on and probes: this run's (new-item recall) and earlier promoted
    runs' (retention recall)."""

    trained: list[Fact]
    new: list[Fact]
    retention: list[Fact]
    items: int

    def counts(self) -> dict[str, int]:
        return {"facts_trained": len(self.trained), "facts_new": len(self.new),
                "facts_retention": len(self.retention), "fact_items": self.items}


class EarlyStop:
    """Early stopping on recall probes, guarded by regression: at the end of every epoch from
    half of ``train.epochs`` on (recall stays at zero for the first epochs while the loss
    falls), probe the facts being trained (this run's first, then older ones; one held-out
    wording per fact, up to 32 facts: a fresh adapter must relearn the old ones too) and
    measure the regression set; stop once all are recalled or ``train.early_stop_patience``
    probes in a row did not beat the best so far, but not while regression perplexity is
    above the gate's bound and still falling. Why the guard: with the anchor term,
    general-text perplexity is still high mid-schedule and falls back as the learning rate
    decays (embedded Gemma: all 16 facts recalled at epoch 2 with regression +24%); stopping
    there hands the gate a model it must reject. When it is not falling, more epochs only
    overfit."""

    def __init__(self, cfg: Any, n_items: int, facts: list[Fact],
                 probe: Callable[[Any, list[Fact]], float | None],
                 regression: Callable[[Any], float | None] | None = None,
                 regression_bound: float | None = None) -> None:
        self.per_epoch = max(1, math.ceil(math.ceil(n_items / cfg.batch_size) / cfg.grad_accum))
        self.patience = cfg.early_stop_patience
        self.first = max(2, math.ceil(cfg.epochs / 2)) * self.per_epoch
        self.facts, self.probe = facts[:32], probe
        self.regression, self.bound = regression, regression_bound
        self.history: list[tuple[int, float, float | None]] = []
        self.stopped_at: int | None = None

    def __call__(self, step: int, model: Any) -> bool:
        if self.patience <= 0 or step % self.per_epoch or step < self.first:
            return False
        value = self.probe(model, self.facts) or 0.0
        ppl = self.regression(model) if self.regression is not None else None
        self.history.append((step // self.per_epoch, value, ppl))
        values = [v for _, v, _ in self.history]
        stale = len(values) - 1 - values.index(max(values))  # probes since the first best
        before = self.history[-2][2] if len(self.history) > 1 else None
        held = (ppl is None or self.bound is None or ppl <= self.bound
                or (before is not None and ppl >= before))  # not recovering: stop anyway
        if held and (value >= 1.0 or stale >= self.patience):
            self.stopped_at = step
            return True
        return False

    def as_dict(self) -> dict[str, Any]:
        return {"recall_by_epoch": [[e, round(v, 3)] for e, v, _ in self.history],
                "regression_by_epoch": [[e, round(p, 3)] for e, _, p in self.history
                                        if p is not None],
                "stopped_at_step": self.stopped_at}


def add_fact_items(db: sqlite_utils.Database, settings: Settings, dataset: Any,
                   run_id: int) -> Taught:
    """Add the facts the user taught to ``dataset.train`` in many phrasings (items from the
    user's words only) and pick the probe sets.

    ``train.accumulate`` retrain: every fact in force (newest statement per fact), since the
    adapter starts fresh each night; continue: this run's facts plus a replay sample of the
    older ones (``train.replay_fraction`` of the new facts' count, at least one), since the
    current adapter already holds the rest.
    """
    from milton.train.dataset import TrainingItem
    from milton.train.taught import fact_items, facts_in_force, new_facts, retention_facts

    cfg = settings.train
    in_force = [fact for fact, _ in facts_in_force(db)]
    new = new_facts(db, run_id)
    retention = retention_facts(db, run_id, cfg.retention_items)
    if cfg.accumulate == "continue":
        new_keys = {f.key for f in new}
        older = [f for f in in_force if f.key not in new_keys]
        random.Random(f"{cfg.seed}:{run_id}:facts").shuffle(older)
        trained = new + older[:math.ceil(cfg.replay_fraction * max(len(new), 1))]
    else:
        trained = in_force
    items = [TrainingItem(id=None, kind=str(it["kind"]), prompt=it["prompt"],
                          response=str(it["response"]), source=f"fact:{it['source']}")
             for it in fact_items(trained, settings)]
    dataset.train.extend(items)
    return Taught(trained, new, retention, len(items))


def _train_and_evaluate(ctx: JobContext, ref: Any, dataset: Any, taught: Taught, run_id: int,
                        work: Path, max_steps: int | None) -> tuple[dict[str, Any], Any, str]:
    """Measure base, current and candidate on the same data in the same process."""
    from milton.models.hf import load_base
    from milton.train.dataset import anchor_items
    from milton.train.evaluate import evaluate, perplexity
    from milton.train.gate import decide, regression_reference
    from milton.train.lora import load_adapter, train_lora
    from milton.train.recall import recall
    from milton.train.safety import SafetyGate

    settings, cfg = ctx.settings, ctx.settings.train
    fmt = settings.model.chat_format
    model, tokenizer = load_base(ref, settings.model.device, settings.model.threads)

    def measure(m: Any, probe: bool = True) -> dict[str, Any]:
        out = evaluate(m, tokenizer, dataset.eval, dataset.regression, cfg, chat_format=fmt)
        for name, facts in (("new", taught.new), ("retention", taught.retention)):
            if probe and facts:
                probed = recall(m, tokenizer, facts, probes=cfg.recall_probes, seed=cfg.seed,
                                chat_format=fmt)
                out[f"recall_{name}"] = probed["recall"]
                out[f"recall_{name}_detail"] = probed
        return out

    safety = SafetyGate(settings, tokenizer)
    current = adapter_store(settings).current()
    base = measure(model, probe=current is None)  # base recall only matters when it serves
    serving, serving_name = base, "base"
    if current is not None:
        continuing = cfg.accumulate == "continue"
        peft = load_adapter(model, current.path / ADAPTER_DIR, trainable=continuing)
        serving, serving_name = measure(peft), f"current {current.name}"
        # continue: train the promoted adapter further; retrain: the bare base again, fresh
        safety.baseline(peft)
        model = peft if continuing else peft.unload()
    else:
        safety.baseline(model)
    new_keys = {f.key for f in taught.new}
    watched = taught.new + [f for f in taught.trained if f.key not in new_keys]
    bound, _ = regression_reference(serving, base)  # what the gate will hold it against
    early = EarlyStop(cfg, len(dataset.train), watched,
                      lambda m, facts: recall(m, tokenizer, facts, probes=1, seed=cfg.seed,
                                              chat_format=fmt)["recall"],
                      regression=lambda m: perplexity(m, tokenizer, dataset.regression, cfg,
                                                      chat_format=fmt),
                      regression_bound=(bound * (1 + cfg.regression_margin)
                                        if isinstance(bound, (int, float)) and math.isfinite(bound)
                                        else None))
    result = train_lora(model, tokenizer, dataset.train, cfg, checkpoint_dir=work / "checkpoints",
                        on_step=_history_hook(ctx.db, run_id), max_steps_override=max_steps,
                        chat_format=fmt, stop=early if taught.new else None,
                        anchors=anchor_items())
    candidate = measure(result.model)
    candidate["early_stop"] = early.as_dict()
    decision = decide(candidate, serving, cfg, serving_name=serving_name, base=base)
    decision = safety.apply(decision, result.model)  # secrets, degeneration, train.safety_probes
    metrics = {"base": base, "serving": serving, "candidate": candidate, "_result": result}
    return metrics, decision, serving_name
