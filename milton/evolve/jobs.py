"""The monthly evolve job: merge + quantize, trim, then distil, then prune; the gate picks the best.

One ``evolve_runs`` row per attempt; its work lives in ``data/evolve/run-<id>/``. Every model
stage (``merge``, ``distil``, ``prune``) writes a Hugging Face model directory and its GGUFs
(f16 and each of ``evolve.quantizations``), every one measured in llama.cpp, into a temporary
directory renamed into ``<stage>/`` with a ``stage.json`` once complete, so a run killed at any
moment is resumed by the next job run: finished stages are kept, distillation and pruning
continue from their last checkpoint. The quick wins come first (the merged model quantized,
then its vocabulary trimmed: minutes), the expensive stages after (with a CUDA device only, by
default), within ``evolve.max_minutes``; so a run cut short still has candidates. The gate (:func:`milton.evolve.gate.choose`) sees every stage in every type
and promotes the best one that keeps the quality and is smaller or faster than what serve runs
(base + adapter); it is published as an artifact of kind ``base`` and becomes serve's base
(and train-lora's) only then.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.config import Settings
from milton.core.fsio import atomic_write_bytes, atomic_write_json
from milton.core.jobs import JobContext, Skip, unfinished_run
from milton.core.timeutil import iso, utcnow
from milton.evolve.merge import Source
from milton.evolve.runs import (
    REPORT_JSON,
    REPORT_PNG,
    STAGE_FILE,
    base_store,
    finish,
    run_dir,
    run_stage,
)
from milton.models.layout import ADAPTER_GGUF, BASE_GGUF, BASE_HF, BASE_VOCAB
from milton.models.refs import BaseModelRef

TEACHER_FILE = "teacher.jsonl"
#: llama.cpp's perplexity of an exported f16 GGUF must be within this of the HF model's, or the
#: stage's GGUFs are not candidates (the file would not run the model that was measured).
EXPORT_TOLERANCE = 0.005
#: Shares of evolve.max_minutes after which distillation, then pruning, stop; the rest is for
#: measuring their GGUFs and the gate.
DISTIL_SHARE, PRUNE_SHARE = 0.5, 0.8
#: Newest memories and messages whose tokens a vocabulary trim keeps (bounds the time it takes).
USER_TEXT_ROWS = 20000


def _hf(path: Path, like: BaseModelRef | None = None) -> BaseModelRef:
    return BaseModelRef(path=path, kind="hf", sha256=like.sha256 if like else "", name=path.name)


class _Pipeline:
    """One evolve run's stages, sharing the settings, data and measuring of one process."""

    def __init__(self, ctx: JobContext, source: Source, run_id: int, work: Path,
                 max_steps: int | None, types: list[str]) -> None:
        from milton.train.dataset import full_dataset

        self.ctx, self.settings, self.cfg = ctx, ctx.settings, ctx.settings.evolve
        self.source, self.run_id, self.work, self.max_steps = source, run_id, work, max_steps
        self.types, self.started = types, time.monotonic()
        self.dataset = full_dataset(ctx.db, self.settings, max_eval=self.cfg.eval_items)
        self.threads = self.settings.serve.n_threads or _cpus()
        self._examples: tuple[list[Any], list[Any]] | None = None
        # A GGUF source keeps its exact tokenizer in every exported GGUF (see rewrite_gguf); a
        # base with a trimmed vocabulary has its full one beside it.
        self.vocab_from: Path | None = None
        if source.base.kind == "gguf":
            beside = source.base.path.parent / BASE_VOCAB
            self.vocab_from = beside if source.base.evolved and beside.is_file() else source.base.path
        self._full_vocab: Any = None
        self._probes: list[tuple[list[int], Any]] | None = None

    # -- shared --------------------------------------------------------------------------------
    def load(self, directory: Path) -> tuple[Any, Any]:
        import torch

        from milton.models.hf import load_base

        return load_base(_hf(directory), self.settings.model.device, self.settings.model.threads,
                         dtype=torch.float32)

    def examples(self, tokenizer: Any) -> tuple[list[Any], list[Any]]:
        """Eval and regression items as token ids, once (every stage shares the vocabulary)."""
        from milton.train.formatting import format_items

        if self._examples is None:
            fmt, max_len = self.settings.model.chat_format, self.settings.train.max_seq_len
            self._examples = (format_items(list(self.dataset.eval), tokenizer, fmt, max_len),
                              format_items(list(self.dataset.regression), tokenizer, fmt, max_len))
        return self._examples

    def measure(self, gguf: Path, tokenizer: Any, lora: Path | None = None) -> dict[str, Any]:
        from milton.evolve.measure import measure_gguf
        from milton.evolve.vocab import kept_ids

        eval_ex, reg_ex = self.examples(tokenizer)
        full = self.full_vocab() if kept_ids(gguf) is not None else None
        figures = measure_gguf(gguf, eval_ex, reg_ex, threads=self.threads,
                               bench_tokens=self.cfg.bench_tokens, lora=lora, full_vocab=full)
        return {**figures, **self.recall(gguf, tokenizer, lora, full)}

    def probes(self, tokenizer: Any) -> list[tuple[list[int], Any]]:
        """(prompt ids as serve frames it, fact) for held-out wordings of the facts the promoted
        adapters taught (train-lora's retention probes), built once."""
        from milton.train.evaluate import served_prompt_ids
        from milton.train.facts import probe_questions
        from milton.train.taught import retention_facts

        if self._probes is None:
            tcfg = self.settings.train
            facts = retention_facts(self.ctx.db, 0, tcfg.retention_items)
            self._probes = [
                (served_prompt_ids({"kind": "pair", "prompt": q, "response": ""}, tokenizer,
                                   self.settings.model.chat_format), fact)
                for fact in facts for q in probe_questions(fact, tcfg.recall_probes, tcfg.seed)]
        return self._probes

    def recall(self, gguf: Path, tokenizer: Any, lora: Path | None, full: Any) -> dict[str, Any]:
        """Share of :meth:`probes` ``gguf`` answers with the fact's value: what the user taught,
        which perplexity on general text does not see (none taught: no figure)."""
        from milton.evolve.measure import gguf_answers
        from milton.train.evaluate import PLAIN_STOPS
        from milton.train.facts import recalled
        from milton.train.recall import MAX_NEW_TOKENS

        probes = self.probes(tokenizer)
        if not probes:
            return {}
        answers = gguf_answers(gguf, [ids for ids, _ in probes], threads=self.threads, lora=lora,
                               full_vocab=full, max_new_tokens=MAX_NEW_TOKENS, stops=PLAIN_STOPS)
        hits = [recalled(answer, fact) for answer, (_, fact) in zip(answers, probes, strict=True)]
        misses = [{"answer": a[:120], "expected": f.value}
                  for a, (_, f), ok in zip(answers, probes, hits, strict=True) if not ok]
        return {"recall": sum(hits) / len(hits), "recall_probes": len(hits), "recall_misses": misses[:3]}

    def full_vocab(self) -> Any:
        """The untrimmed tokenizer table every stage's ids are in (read once)."""
        from milton.evolve.export import UNQUANTIZED, gguf_name
        from milton.evolve.vocab import read_vocab

        if self._full_vocab is None:
            self._full_vocab = read_vocab(self.vocab_from or self.work / "merge" / gguf_name(UNQUANTIZED))
        return self._full_vocab

    def candidates(self, directory: Path, tokenizer: Any, model: Any) -> dict[str, Any]:
        """The stage in ``directory`` exported (f16 and every quantization) and measured.

        Its f16 GGUF must tokenise like the serving base and give llama.cpp's perplexity within
        ``EXPORT_TOLERANCE`` of the HF model's on the held-out items; otherwise none of its
        GGUFs is a candidate (``excluded`` says why) and the run goes on with the others.
        """
        from milton.evolve.export import UNQUANTIZED, export_ggufs, gguf_name
        from milton.evolve.measure import same_tokenizer
        from milton.train.evaluate import perplexity

        files = export_ggufs(self.settings, directory, directory, self.types, threads=self.threads,
                             vocab_from=self.vocab_from)
        measured = {UNQUANTIZED: self.measure(files[UNQUANTIZED], tokenizer)}
        excluded = None
        texts = [str(getattr(i, "response", "")) for i in self.dataset.eval[:16]]
        if self.vocab_from is not None:
            differs = same_tokenizer(self.vocab_from, files[UNQUANTIZED], texts)
            if differs is not None:
                excluded = (f"the exported GGUF tokenises text differently from the base "
                            f"{self.source.base.name} (e.g. {differs[:40]!r})")
        hf_ppl = perplexity(model, tokenizer, list(self.dataset.eval), self.settings.train,
                            chat_format=self.settings.model.chat_format)
        gguf_ppl = measured[UNQUANTIZED]["eval_ppl"]
        drift = abs(gguf_ppl / hf_ppl - 1) if hf_ppl and gguf_ppl else None
        if excluded is None and (drift is None or drift > EXPORT_TOLERANCE):
            excluded = (f"llama.cpp's perplexity of the exported f16 ({gguf_ppl}) differs from the "
                        f"HF model's ({hf_ppl}) by more than {EXPORT_TOLERANCE:.1%}")
        same = None
        if directory.name.lstrip(".").startswith("merge") and self.source.adapter_dir is None \
                and self.source.base.kind == "gguf":
            from milton.evolve.export import file_type

            same = file_type(self.source.base.path)  # no adapter: this type is the served file
        if excluded is None:
            for kind in self.types:
                if kind == same:
                    continue
                self.ctx.log(f"measuring {kind}", evolve_run=self.run_id, model_dir=directory.name)
                measured[kind] = self.measure(files[kind], tokenizer)
        return {"format": UNQUANTIZED, **measured[UNQUANTIZED], "hf_eval_ppl": hf_ppl,
                "not_offered": ({same: "no adapter to merge: the serving model itself"}
                                if same in measured or same in self.types else {}),
                "export_drift": drift, "excluded": excluded, "types": measured,
                "files": {k: gguf_name(k) for k in measured}}

    def log(self, msg: str, **fields: Any) -> None:
        self.ctx.log(msg, evolve_run=self.run_id, **fields)
        with self.ctx.db.atomic():
            self.ctx.db["evolve_runs"].update(self.run_id, {"stage": fields.get("stage", msg)})

    def _hook(self, stage: str) -> Callable[..., None]:
        def on_step(step: int, loss: float, lr: float, tokens: int, elapsed_s: float) -> None:
            if step % 10 == 0:
                self.ctx.log(f"{stage} step", evolve_run=self.run_id, step=step,
                             loss=round(loss, 4), elapsed_s=round(elapsed_s, 1))
        return on_step

    # -- stages --------------------------------------------------------------------------------
    def merge(self, out: Path) -> dict[str, Any]:
        from milton.evolve.merge import load_merged, save_model

        model, tokenizer = load_merged(self.settings, self.source)
        like = self.source.load_from.path if self.source.load_from.kind == "hf" else None
        save_model(model, tokenizer, out, like=like)
        info = self.candidates(out, tokenizer, model)
        del model
        return {"stage": "merge", "model_dir": "merge", "adapter_version": self.source.adapter_version,
                "layers": _layers(out), **info}

    def trim(self, merged: Path, out: Path) -> dict[str, Any]:
        """The merged model's GGUFs with the vocabulary cut to what the user needs
        (:mod:`milton.evolve.vocab`), each measured; the HF directory is the merged one (the
        weights train-lora and next month's merge start from keep the full vocabulary)."""
        from milton.evolve.export import UNQUANTIZED, gguf_name
        from milton.evolve.measure import same_tokenizer
        from milton.evolve.vocab import keep_ids, trim_gguf, unsupported, write_vocab_only
        from milton.train.dataset import anchor_items
        from milton.train.formatting import format_items

        full = self.full_vocab()
        info: dict[str, Any] = {"stage": "trim", "model_dir": "trim", "trimmed_from": merged.name,
                                "layers": _layers(merged), "vocab": len(full.tokens)}
        why = unsupported(full)
        if why is not None:
            return {**info, "excluded": f"the vocabulary is not trimmed: {why}"}
        tokenizer = _tokenizer(merged)
        fmt, max_len = self.settings.model.chat_format, self.settings.train.max_seq_len
        framed = format_items([*self.dataset.train, *anchor_items()], tokenizer, fmt, max_len)
        user = self.user_texts()
        written = tokenizer(user, add_special_tokens=False)["input_ids"] if user else []
        kept = keep_ids(full, self.cfg.vocab_top, [*(ex.input_ids for ex in framed), *written])
        info.update(kept=len(kept), vocab_top=self.cfg.vocab_top)
        for entry in merged.iterdir():
            if entry.is_file() and entry.suffix != ".gguf" and entry.name != STAGE_FILE:
                _link_or_copy(entry, out / entry.name)
        write_vocab_only(merged / gguf_name(UNQUANTIZED), out / BASE_VOCAB)
        kinds = [k for k in self.types if (merged / gguf_name(k)).is_file()]
        for kind in kinds:
            self.ctx.log(f"trimming {kind}", evolve_run=self.run_id, kept=len(kept))
            trim_gguf(merged / gguf_name(kind), out / gguf_name(kind), kept)
        if not kinds:
            return {**info, "excluded": "the merge stage made no quantized GGUF to trim"}
        # Text made of kept tokens must be split exactly as the full vocabulary splits it.
        texts = user[:64] + [str(getattr(i, "response", "")) for i in self.dataset.train[:32]]
        differs = same_tokenizer(merged / gguf_name(kinds[0]), out / gguf_name(kinds[0]), texts, kept=kept)
        if differs is not None:
            return {**info, "excluded": f"the trimmed vocabulary splits text the user wrote differently "
                                        f"(e.g. {differs[:40]!r})"}
        measured = {}
        for kind in kinds:
            self.ctx.log(f"measuring trim {kind}", evolve_run=self.run_id)
            measured[kind] = self.measure(out / gguf_name(kind), tokenizer)
        return {**info, "format": kinds[0], **measured[kinds[0]], "types": measured,
                "files": {k: gguf_name(k) for k in measured}}

    def taught_items(self) -> list[dict[str, Any]]:
        """The facts in force in every trained phrasing (what train-lora's nights learn from):
        distillation and pruning's recovery train on them too, so a student keeps them."""
        from milton.train.taught import items_in_force

        return items_in_force(self.ctx.db, self.settings)

    def user_texts(self) -> list[str]:
        """What the user wrote and was told: the facts in force in every trained phrasing,
        memories and the newest messages (a trim keeps all their tokens)."""
        db, limit = self.ctx.db, USER_TEXT_ROWS
        texts = [str(part) for item in self.taught_items()
                 for part in (item.get("prompt"), item.get("response")) if part]
        for sql in ("select content from memories order by id desc limit ?",
                    "select content from messages order by id desc limit ?"):
            texts += [str(row[0]) for row in db.execute(sql, [limit]).fetchall() if row[0]]
        return texts

    def teacher_items(self, teacher: Any, tokenizer: Any) -> list[dict[str, Any]]:
        """Teacher answers to prompts drawn from memory topics, generated once per run."""
        from milton.evolve.distil import teacher_answers, topic_prompts

        path = self.work / TEACHER_FILE
        if path.is_file():
            return _read_jsonl(path)
        prompts = topic_prompts(self.ctx.db, self.cfg.teacher_prompts, seed=self.settings.train.seed)
        until = self.deadline(DISTIL_SHARE)  # a third of the time left for distillation, at most
        until = None if until is None else time.monotonic() + (until - time.monotonic()) / 3
        items = teacher_answers(teacher, tokenizer, prompts, max_new_tokens=self.cfg.teacher_max_new_tokens,
                                chat_format=self.settings.model.chat_format,
                                deadline=until) if prompts else []
        data = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items)
        atomic_write_bytes(path, data.encode("utf-8"))
        return items

    def distil(self, out: Path) -> dict[str, Any]:
        from milton.evolve.distil import distil, mean_kl
        from milton.evolve.merge import save_model
        from milton.evolve.student import load_student

        teacher_dir = Path(self.cfg.teacher).expanduser() if self.cfg.teacher else self.work / "merge"
        teacher, tokenizer = self.load(teacher_dir)
        teacher_items = self.teacher_items(teacher, tokenizer)
        items = [*self.dataset.train, *self.taught_items(), *teacher_items]
        student = load_student(self.cfg, teacher, home=self.settings.paths.home, tokenizer=tokenizer)
        fmt, tcfg = self.settings.model.chat_format, self.settings.train
        kl_before = mean_kl(teacher, student, tokenizer, list(self.dataset.eval), tcfg, chat_format=fmt)
        result = distil(teacher, student, tokenizer, items, self.cfg, tcfg,
                        checkpoint_dir=self.work / "distil-checkpoints", on_step=self._hook("distil"),
                        max_steps_override=self.max_steps, chat_format=fmt,
                        freeze_embeddings=not self.cfg.train_embeddings, deadline=self.deadline(DISTIL_SHARE))
        kl_after = mean_kl(teacher, result.model, tokenizer, list(self.dataset.eval), tcfg, chat_format=fmt)
        save_model(result.model, tokenizer, out, like=teacher_dir)
        del teacher, student
        return {"stage": "distil", "model_dir": "distil", "teacher": str(teacher_dir),
                "teacher_items": len(teacher_items), "train_items": len(items),
                "layers": _layers(out), "teacher_layers": _layers(teacher_dir),
                "kl_before": kl_before, "kl_after": kl_after,
                **result.metrics(),
                **self.candidates(out, tokenizer, result.model)}

    def prune(self, previous: Path, out: Path) -> dict[str, Any]:
        from milton.evolve.merge import save_model
        from milton.evolve.prune import iterative_prune

        model, tokenizer = self.load(previous)
        train = [*self.dataset.train, *self.taught_items()] or list(self.dataset.eval)
        teacher = self.work / TEACHER_FILE
        if teacher.is_file():
            train += _read_jsonl(teacher)
        result = iterative_prune(
            model, tokenizer, calib_items=train[:self.cfg.calibration_items], train_items=train,
            eval_items=list(self.dataset.eval), evolve_cfg=self.cfg, train_cfg=self.settings.train,
            checkpoint_dir=self.work / "prune-checkpoints", chat_format=self.settings.model.chat_format,
            freeze_embeddings=not self.cfg.train_embeddings, deadline=self.deadline(PRUNE_SHARE))
        info = {"stage": "prune", "model_dir": "prune", "method": self.cfg.prune_method,
                "pruned_from": previous.name, "recovery_lr": self.cfg.recovery_lr,
                "sparsity": result.sparsity, "stopped": result.stopped, "start_ppl": result.start_ppl,
                "iterations": result.iterations, "layers": _layers(previous)}
        if not result.sparsity:  # nothing kept: the same weights as `previous`, already measured
            why = ("evolve.max_minutes ran out before the first iteration" if result.stopped == "budget"
                   else f"no iteration kept quality_threshold ({result.stopped})")
            return {**info, "excluded": f"{why}: the same weights as {previous.name}"}
        save_model(result.model, tokenizer, out, like=previous)
        return {**info, **self.candidates(out, tokenizer, result.model)}

    def deadline(self, share: float) -> float | None:
        """time.monotonic() at which ``share`` of evolve.max_minutes is spent (None: no budget)."""
        return self.started + share * self.cfg.max_minutes * 60 if self.cfg.max_minutes else None

    def out_of_time(self, share: float) -> bool:
        deadline = self.deadline(share)
        return deadline is not None and time.monotonic() >= deadline


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of a GGUF on disk), or a copy when ``paths.checkpoints_dir``
    is on another filesystem than ``paths.data_dir``."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _layers(directory: Path) -> int | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, json.JSONDecodeError):
        return None


def _cpus() -> int:
    from milton.models.hf import usable_cpus

    return usable_cpus()


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


# -- the job ------------------------------------------------------------------------------------
def evolve_job(*, max_steps: int | None = None) -> Callable[[JobContext], dict[str, Any]]:
    def job(ctx: JobContext) -> dict[str, Any]:
        return evolve_run(ctx, max_steps=max_steps)

    return job


def evolve_run(ctx: JobContext, *, max_steps: int | None = None) -> dict[str, Any]:
    from milton.evolve.export import check_types
    from milton.evolve.merge import find_source
    from milton.models.convert import tools_dir

    settings, db, cfg = ctx.settings, ctx.db, ctx.settings.evolve
    tools_dir(settings)  # fail now, not after an hour of distillation
    types = check_types(settings)
    source = find_source(settings)

    # An unfinished run resumes; one started from another base or adapter is given up.
    resumed = unfinished_run(db, "evolve_runs", {"source_sha256": source.base.sha256,
                                                 "adapter_version": source.adapter_version},
                             reason="the serving model changed; not resumed",
                             metrics=json.dumps({}), candidate_version=None)
    if resumed is None:
        _require_data(db, settings)
    run_id = resumed or int(db["evolve_runs"].insert({
        "job_run_id": ctx.run_id, "started": iso(utcnow()), "status": "running", "stage": "merge",
        "source": str(source.base.path), "source_sha256": source.base.sha256,
        "adapter_version": source.adapter_version}).last_pk)
    work = run_dir(settings, run_id)
    work.mkdir(parents=True, exist_ok=True)
    pipe = _Pipeline(ctx, source, run_id, work, max_steps, types)
    ctx.log("evolve", evolve_run=run_id, resumed=resumed is not None, source=source.base.name,
            adapter=source.adapter_version, max_minutes=cfg.max_minutes, **pipe.dataset.counts())

    # The quick wins first: the merged model in every type (minutes), then what serve runs now.
    stages: dict[str, dict[str, Any]] = {}
    pipe.log("merging and quantizing", stage="merge")
    stages["merge"] = run_stage(work, "merge", pipe.merge)
    pipe.log("measuring the serving model", stage="serving")
    serving = _serving(pipe, _tokenizer(work / "merge"), stages["merge"])
    if cfg.vocab_top <= 0:
        stages["trim"] = {"stage": "trim", "skipped": "evolve.vocab_top is 0"}
    elif stages["merge"].get("excluded"):
        stages["trim"] = {"stage": "trim", "skipped": "the merge stage was excluded"}
    else:
        pipe.log("trimming the vocabulary", stage="trim")
        stages["trim"] = run_stage(work, "trim", lambda out: pipe.trim(work / "merge", out))
    model_dir = work / "merge"
    no_training = training_stages_skipped(settings)
    if no_training:
        for name in ("distil", "prune"):
            stages[name] = {"stage": name, "skipped": no_training}
        pipe.log("choosing", stage="gate")
        return _gate_and_publish(ctx, pipe, stages, serving)
    if cfg.distil_steps <= 0:
        stages["distil"] = {"stage": "distil", "skipped": "evolve.distil_steps is 0"}
    elif pipe.out_of_time(DISTIL_SHARE) and not (work / "distil" / STAGE_FILE).is_file():
        stages["distil"] = {"stage": "distil", "skipped": f"evolve.max_minutes: {DISTIL_SHARE:.0%} "
                            f"of {cfg.max_minutes:g} minutes spent before it could start"}
    else:
        pipe.log("distilling", stage="distil")
        stages["distil"] = run_stage(work, "distil", pipe.distil)
        model_dir = work / "distil"
    if cfg.prune_method == "none":
        stages["prune"] = {"stage": "prune", "skipped": "evolve.prune_method is none"}
    elif pipe.out_of_time(PRUNE_SHARE) and not (work / "prune" / STAGE_FILE).is_file():
        stages["prune"] = {"stage": "prune", "skipped": f"evolve.max_minutes: {PRUNE_SHARE:.0%} "
                           f"of {cfg.max_minutes:g} minutes spent before it could start"}
    else:
        pipe.log("pruning", stage="prune")
        previous = model_dir
        stages["prune"] = run_stage(work, "prune", lambda out: pipe.prune(previous, out))
    pipe.log("choosing", stage="gate")
    return _gate_and_publish(ctx, pipe, stages, serving)


def training_stages_skipped(settings: Settings) -> str | None:
    """Why distillation and pruning do not run this time (``evolve.train_stages``), or None."""
    mode = settings.evolve.train_stages
    if mode == "never":
        return "evolve.train_stages is never"
    if mode == "always":
        return None
    from milton.models.hf import select_device

    device, _ = select_device(settings.model.device, settings.model.threads)
    if device.type == "cuda":
        return None
    return ("evolve.train_stages is auto and there is no CUDA device: on a CPU they take hours "
            "and do not reach the quality threshold (see the setting)")


def _require_data(db: sqlite_utils.Database, settings: Settings) -> None:
    """Skip (exit 0) before any heavy work when there is too little to distil on: conversation
    items, the items of the facts the user taught (all a base model's nights train on) and
    memory-topic prompts."""
    from milton.evolve.distil import topic_prompts
    from milton.train.taught import items_in_force

    cfg = settings.evolve
    conversations = db.execute("select count(*) from training_items where split = 'train'").fetchone()[0]
    facts = len(items_in_force(db, settings))
    prompts = len(topic_prompts(db, cfg.teacher_prompts, seed=settings.train.seed)) if cfg.distil_steps else 0
    if conversations + facts + prompts < cfg.min_train_items:
        raise Skip(f"{conversations} conversation items, {facts} fact items and {prompts} memory-topic "
                   f"prompts: fewer than evolve.min_train_items ({cfg.min_train_items})",
                   conversation_items=conversations, fact_items=facts, topic_prompts=prompts)


def _serving(pipe: _Pipeline, tokenizer: Any, merged: dict[str, Any]) -> dict[str, Any]:
    """The model serve runs now, measured like the stages: base GGUF + adapter GGUF in llama.cpp.

    A Hugging Face ``model.base`` is not servable by llama.cpp as it is; its reference is the
    merged model as an f16 GGUF (base + adapter, unquantized).
    """
    from milton.train.jobs import adapter_store

    figures = ("eval_ppl", "regression_ppl", "size_mb", "tokens_per_s", "prompt_tokens_per_s")
    if pipe.source.base.kind != "gguf":
        return {"stage": "serving", "name": f"{pipe.source.base.name} + adapter (merged, f16)",
                **{k: merged.get(k) for k in figures}}
    lora = None
    if pipe.source.adapter_version:
        version = adapter_store(pipe.settings).current()
        if version is not None and version.name == pipe.source.adapter_version:
            lora = version.path / ADAPTER_GGUF
    name = pipe.source.base.name + (f" + adapter {pipe.source.adapter_version}" if lora else "")
    return {"stage": "serving", "name": name, "gguf": str(pipe.source.base.path),
            "lora": str(lora) if lora else None, **pipe.measure(pipe.source.base.path, tokenizer, lora)}


def stage_candidates(stages: dict[str, dict[str, Any]], only: str = "") -> list[dict[str, Any]]:
    """Every measured GGUF of every stage that was not excluded, as the gate sees them
    (``stage``, ``format``, the figures); ``only`` keeps one GGUF type."""
    out = []
    for name, info in stages.items():
        if info.get("skipped") or info.get("excluded"):
            continue
        for kind, figures in (info.get("types") or {}).items():
            if (not only or kind == only) and kind not in (info.get("not_offered") or {}):
                out.append({"stage": name, "format": kind, **figures})
    return out


def _gate_and_publish(ctx: JobContext, pipe: _Pipeline, stages: dict[str, dict[str, Any]],
                      serving: dict[str, Any]) -> dict[str, Any]:
    from milton.core.notify import notify
    from milton.evolve.export import gguf_name
    from milton.evolve.gate import choose, quality
    from milton.evolve.report import build_report, write_plot

    settings, cfg, work = pipe.settings, pipe.cfg, pipe.work
    candidates = stage_candidates(stages, cfg.promote_type.lower())
    if candidates:
        pipe.log("timing every candidate against the serving model", stage="gate")
        _retime(pipe, stages, candidates, serving)
    decision, winner, verdicts = choose(candidates, serving, cfg)
    report = build_report(pipe.run_id, stages, serving, decision, verdicts=verdicts)
    atomic_write_json(work / REPORT_JSON, report)
    write_plot(report, work / REPORT_PNG)
    # Rejected: the candidate nearest to qualifying (best held-out quality) is kept, not current.
    chosen = winner or max(candidates, key=lambda c: quality(serving.get("eval_ppl"), c.get("eval_ppl")) or 0,
                           default=None)
    version_name = None
    if chosen is not None:
        stage_dir, kind = work / chosen["stage"], chosen["format"]

        def build(tmp: Path) -> None:
            _link_or_copy(stage_dir / gguf_name(kind), tmp / BASE_GGUF)
            _copy_half(stage_dir, tmp / BASE_HF)
            if (stage_dir / BASE_VOCAB).is_file():
                _link_or_copy(stage_dir / BASE_VOCAB, tmp / BASE_VOCAB)
            shutil.copyfile(work / REPORT_JSON, tmp / REPORT_JSON)
            shutil.copyfile(work / REPORT_PNG, tmp / REPORT_PNG)

        version = base_store(settings).publish(
            build, metrics={**chosen, "decision": "promoted" if decision.promote else "rejected"},
            data_window={"train_items": len(pipe.dataset.train), "eval_items": len(pipe.dataset.eval)},
            extra={"source": pipe.source.as_dict(), "evolve_run": pipe.run_id, "gguf_type": kind,
                   "stage": chosen["stage"],
                   "gate": {"promote": decision.promote, "reason": decision.reason,
                            "against": serving["name"], "checks": decision.checks,
                            "verdicts": verdicts},
                   "stages": report["rows"]},
            make_current=decision.promote)
        version_name = version.name
    status = "promoted" if decision.promote else "rejected"
    finish(ctx.db, pipe.run_id, status, reason=decision.reason,
            metrics={"candidate": chosen, "serving": serving, "rows": report["rows"],
                     "verdicts": verdicts},
            version=version_name)
    if not cfg.keep_stages:
        _clean(work)
    title = f"milton: evolved base {version_name or '(none)'} {status}"
    if decision.promote:
        notify(settings, "promotion", title, decision.reason)
    else:
        notify(settings, "rejection", title, f"{decision.reason}; {serving['name']} keeps serving")
    ctx.log(f"evolved base {version_name} {status}", reason=decision.reason)
    return {"status_detail": status, "version": version_name, "reason": decision.reason,
            "run_id": pipe.run_id, "report": str(work / REPORT_PNG),
            "winner": decision.checks.get("winner"),
            **{f"candidate_{k}": v for k, v in (chosen or {}).items()},
            **{f"serving_{k}": v for k, v in serving.items() if k != "stage"}}


def _retime(pipe: _Pipeline, stages: dict[str, dict[str, Any]], candidates: list[dict[str, Any]],
            serving: dict[str, Any]) -> None:
    """Decode speed of the serving model and every candidate again, interleaved
    (:func:`milton.evolve.measure.interleaved_speed`): the figures the gate compares. Each
    stage's own timing stays as ``tokens_per_s_stage``."""
    from milton.evolve.export import gguf_name
    from milton.evolve.measure import interleaved_speed

    if not serving.get("gguf"):
        return  # an HF base: serve's reference is the merged f16, already a candidate's timing
    files = [(Path(serving["gguf"]), Path(serving["lora"]) if serving.get("lora") else None)]
    files += [(pipe.work / c["stage"] / gguf_name(c["format"]), None) for c in candidates]
    speeds = interleaved_speed(files, tokens=pipe.cfg.bench_tokens, threads=pipe.threads)
    serving.update(tokens_per_s_stage=serving.get("tokens_per_s"), tokens_per_s=speeds[0])
    for c, speed in zip(candidates, speeds[1:], strict=True):
        figures = stages[c["stage"]]["types"][c["format"]]
        figures.update(tokens_per_s_stage=figures.get("tokens_per_s"), tokens_per_s=speed)
        c.update(tokens_per_s_stage=c.get("tokens_per_s"), tokens_per_s=speed)


def _copy_half(source: Path, target: Path) -> None:
    """The final model directory with its weights in bfloat16: half the disk, the precision
    next month's merge starts from."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix == ".gguf" or path.name == STAGE_FILE or not path.is_file():
            continue
        if path.suffix == ".safetensors":
            tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
                       for k, v in load_file(str(path)).items()}
            save_file(tensors, str(target / path.name), metadata={"format": "pt"})
        else:
            shutil.copyfile(path, target / path.name)


def _clean(work: Path) -> None:
    """Drop the big intermediates of a finished run; its report stays beside the run."""
    for entry in work.iterdir():
        if entry.name in (REPORT_JSON, REPORT_PNG):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
