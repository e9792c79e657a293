"""Knowledge distillation: train a smaller student to match the teacher's next-token distributions.

Loss per labelled (assistant) token: ``alpha * CE(student, label) + (1 - alpha) * T² *
KL(softmax(teacher / T) || softmax(student / T))``, token-weighted over the optimizer step. The
soft targets carry what the teacher believes about every token, not only the right one, which
is why a student learns far more per example from them than from the labels alone; T² keeps the
KL gradient on the CE's scale whatever the temperature. Logits are only computed at positions
that predict a labelled token (Gemma's vocabulary has 262k entries).

The training loop is train-lora's (:func:`milton.train.loop.train_steps`): length-grouped
micro-batches, gradient accumulation, AdamW with warmup + cosine, clipping at 1.0, and resumable
checkpoints (the student's full state dict, optimizer, scheduler, RNG, data order, and a
fingerprint of the data, settings, teacher and starting student), so a run killed with
``kill -9`` and started again ends with the weights an uninterrupted run would have had.

The data: the user's conversations, plus the teacher's own greedy answers to prompts drawn from
memory topics (:func:`topic_prompts`, :func:`teacher_answers`), so the student also sees the
teacher behave on the subjects the user cares about.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milton.core.config import EvolveConfig, TrainConfig
from milton.train.formatting import IGNORE, Example, format_items
from milton.train.loop import (
    StepHook,
    adamw,
    collate,
    pad_id_of,
    peak_rss_mb,
    plan_batches,
    train_steps,
)

STUDENT_WEIGHTS = "model.safetensors"


class _OutOfTime(Exception):
    """Raised from the step hook to leave the training loop at the deadline."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


@dataclass
class DistilResult:
    model: Any = field(repr=False)  # the student, trained, in eval mode
    steps: int                      # optimizer steps done in total (including before a resume)
    tokens: int                     # non-padding tokens fed to the student in total
    loss_history: list[float]       # per-step distillation loss
    tokens_per_s: float             # this process's throughput
    resumed_from: int | None        # the checkpoint step this run continued from, if any
    peak_rss_mb: float
    total_steps: int = 0
    elapsed_s: float = 0.0
    n_examples: int = 0
    peak_gpu_mb: float | None = None
    stopped_early: bool = False     # evolve.max_minutes ran out before total_steps

    def metrics(self) -> dict[str, Any]:
        return {
            "distil_steps": self.steps, "distil_total_steps": self.total_steps,
            "distil_tokens": self.tokens,
            "distil_final_loss": self.loss_history[-1] if self.loss_history else None,
            "distil_tokens_per_s": round(self.tokens_per_s, 1),
            "distil_peak_rss_mb": round(self.peak_rss_mb, 1),
            "distil_resumed_from": self.resumed_from, "distil_s": round(self.elapsed_s, 2),
            "distil_examples": self.n_examples, "distil_stopped_early": self.stopped_early,
            **({"distil_peak_gpu_mb": round(self.peak_gpu_mb, 1)}
               if self.peak_gpu_mb is not None else {}),
        }


# -- the loss ---------------------------------------------------------------------------------
def _kd_sums(student_logits: Any, teacher_logits: Any | None, targets: Any,
             temperature: float) -> tuple[Any, Any]:
    """(summed CE, summed KL(teacher/T || student/T)) over rows of (N, V) logits."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own convention

    student = student_logits.float()
    ce = F.cross_entropy(student, targets, reduction="sum")
    if teacher_logits is None:
        return ce, torch.zeros((), device=student.device)
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return ce, kl


def _combine(ce: Any, kl: Any, alpha: float, temperature: float) -> Any:
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * kl


def distillation_loss(student_logits: Any, teacher_logits: Any, labels_mask: Any, targets: Any,
                      alpha: float, T: float) -> Any:  # noqa: N803 - T is the textbook name
    """alpha * CE + (1 - alpha) * T² * KL(teacher || student), each a mean over labelled tokens.

    ``*_logits`` are (..., V) at the same positions; ``labels_mask`` (...) marks the positions
    that count and ``targets`` (...) their token ids. No labelled position gives 0.
    """
    mask = labels_mask.bool()
    count = int(mask.sum())
    if count == 0:
        return student_logits.sum() * 0.0
    ce, kl = _kd_sums(student_logits[mask], teacher_logits[mask], targets[mask], T)
    return _combine(ce, kl, alpha, T) / count


def _kept_logits(model: Any, ids: Any, mask: Any, wanted: Any) -> Any:
    """Logits at positions ``wanted`` only (``logits_to_keep``), else sliced from full logits."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    try:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=wanted.to(device),
                     use_cache=False).logits
    except TypeError:  # a model class without logits_to_keep
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, wanted]


def batch_kd(teacher: Any, student: Any, ids: Any, mask: Any, labels: Any, temperature: float,
             *, need_teacher: bool = True, need_grad: bool = True) -> tuple[Any, Any, int]:
    """(summed CE, summed KL, labelled-token count) of one padded batch.

    The teacher runs without gradients; ``need_teacher=False`` (alpha = 1) skips it.
    """
    import contextlib

    import torch

    targets = labels[:, 1:]
    wanted = (targets != IGNORE).any(dim=0).nonzero(as_tuple=True)[0]
    count = int((targets != IGNORE).sum())
    if count == 0:
        zero = torch.zeros((), device=ids.device)
        return zero, zero, 0
    picked = targets[:, wanted]
    keep = picked != IGNORE
    teacher_rows = None
    if need_teacher:
        with torch.no_grad():
            teacher_rows = _kept_logits(teacher, ids, mask, wanted)[keep.to(_dev(teacher))]
    with contextlib.nullcontext() if need_grad else torch.no_grad():
        student_logits = _kept_logits(student, ids, mask, wanted)
        rows = student_logits[keep.to(student_logits.device)]
        if teacher_rows is not None:
            teacher_rows = teacher_rows.to(rows.device)
        ce, kl = _kd_sums(rows, teacher_rows, picked[keep].to(rows.device), temperature)
    return ce, kl, count


def _dev(model: Any) -> Any:
    return next(model.parameters()).device


# -- held-out measure -------------------------------------------------------------------------
def mean_kl(teacher: Any, student: Any, tokenizer: Any, items: list[Any], train_cfg: TrainConfig,
            *, chat_format: str = "auto", temperature: float = 1.0) -> float | None:
    """Token-weighted mean KL(teacher || student) over the items' labelled tokens (None if none).

    The held-out measure distillation must lower: how far the student's next-token
    distributions are from the teacher's where it matters (the answers).
    """
    import torch

    examples = format_items(list(items), tokenizer, chat_format, train_cfg.max_seq_len)
    if not examples:
        return None
    pad_id = pad_id_of(tokenizer)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), train_cfg.batch_size):
                batch = [examples[i] for i in order[start:start + train_cfg.batch_size]]
                ids, mask, labels = collate(batch, pad_id)
                _, kl, n = batch_kd(teacher, student, ids, mask, labels, temperature,
                                    need_grad=False)
                total += float(kl)
                count += n
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    return total / count if count else None


# -- checkpoints --------------------------------------------------------------------------------
def _unique_state(model: Any) -> dict[str, Any]:
    """The state dict on the CPU with tied tensors stored once (safetensors refuses aliases)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for key, value in model.state_dict().items():
        alias = (value.data_ptr(), tuple(value.shape))
        if alias in seen:
            continue
        seen.add(alias)
        out[key] = value.detach().to("cpu").contiguous()
    return out


def _load_weights(student: Any, weights: dict[str, Any]) -> bool:
    """A checkpoint's weights into ``student``; False (nothing loaded) if they don't fit."""
    expected = set(student.state_dict())
    if not set(weights) <= expected or not set(_unique_state_keys(student)) <= set(weights):
        return False
    device = _dev(student)
    student.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    return True


def _unique_state_keys(model: Any) -> list[str]:
    seen: set[tuple[int, tuple[int, ...]]] = set()
    keys = []
    for key, value in model.state_dict().items():
        alias = (value.data_ptr(), tuple(value.shape))
        if alias not in seen:
            seen.add(alias)
            keys.append(key)
    return keys


def _weights_digest(model: Any) -> str:
    """A cheap identity of a model's weights: names, shapes and the first values of each."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        head = value.detach().reshape(-1)[:16].float().cpu().numpy().tobytes()
        digest.update(f"{key}\0{tuple(value.shape)}\0{value.dtype}\0".encode() + head)
    return digest.hexdigest()


def _fingerprint(examples: list[Example], evolve_cfg: EvolveConfig, train_cfg: TrainConfig,
                 total_steps: int, teacher: Any, student: Any, frozen: bool) -> str:
    """What must match for a checkpoint to be resumed: data, settings, teacher, start student."""
    digest = hashlib.sha256()
    settings = {
        "evolve": {k: getattr(evolve_cfg, k) for k in ("alpha", "temperature", "distil_lr")},
        "train": {k: getattr(train_cfg, k) for k in ("batch_size", "grad_accum", "max_seq_len",
                                                     "warmup_ratio", "seed")},
        "total_steps": total_steps, "freeze_embeddings": frozen,
        "teacher": _weights_digest(teacher), "student": _weights_digest(student),
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for ex in examples:
        digest.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return digest.hexdigest()


# -- training -----------------------------------------------------------------------------------
def _trainable(student: Any, freeze_embeddings: bool) -> list[Any]:
    """The student's weights that distillation updates (all, or all but the embeddings)."""
    frozen = None
    if freeze_embeddings and student.get_input_embeddings() is not None:
        frozen = student.get_input_embeddings().weight
    params = []
    for p in student.parameters():
        p.requires_grad_(p is not frozen)
        if p is not frozen:
            params.append(p)
    return params


def plan_distil_steps(evolve_cfg: EvolveConfig, max_steps_override: int | None = None) -> int:
    steps = evolve_cfg.distil_steps
    if max_steps_override is not None:
        steps = min(steps, max(0, max_steps_override))
    return steps


def _order(examples: list[Example], train_cfg: TrainConfig, total_steps: int) -> list[list[int]]:
    """Exactly ``total_steps * grad_accum`` micro-batches, in as many seeded epochs as needed."""
    needed = total_steps * train_cfg.grad_accum
    per_epoch = math.ceil(len(examples) / train_cfg.batch_size)
    epochs = math.ceil(needed / per_epoch)
    lengths = [len(ex.input_ids) for ex in examples]
    return plan_batches(lengths, train_cfg.batch_size, epochs, train_cfg.seed)[:needed]


def distil(teacher: Any, student: Any, tokenizer: Any, items: list[Any], evolve_cfg: EvolveConfig,
           train_cfg: TrainConfig, *, checkpoint_dir: Path, on_step: StepHook | None = None,
           max_steps_override: int | None = None, chat_format: str = "auto",
           progress: bool | None = None, freeze_embeddings: bool = False,
           deadline: float | None = None) -> DistilResult:
    """Distil ``teacher`` into ``student`` (all its weights) on ``items``; see the module doc.

    ``evolve.distil_steps`` optimizer steps (at most ``max_steps_override``); 0 returns the
    student untouched. Raises ValueError when no item has a token to learn from.
    ``on_step(step, loss, lr, tokens, elapsed_s)`` is called after every optimizer step.
    ``freeze_embeddings`` keeps the input embeddings (and a tied lm_head) as they are: a
    derived student already has the teacher's, and for Gemma 3 270M they are 168M of its
    235M weights, so freezing them saves ~2 GB of gradients and optimizer state and a third
    of the step time on a CPU. Past ``deadline`` (``time.monotonic()``) training stops after
    the current step, checkpointed, and the student as it is then is the result
    (``stopped_early``); a later call with more time continues from that checkpoint.
    """
    total_steps = plan_distil_steps(evolve_cfg, max_steps_override)
    if total_steps == 0:
        student.eval()
        return DistilResult(model=student, steps=0, tokens=0, loss_history=[], tokens_per_s=0.0,
                            resumed_from=None, peak_rss_mb=peak_rss_mb())
    examples = format_items(list(items), tokenizer, chat_format, train_cfg.max_seq_len)
    if not examples:
        raise ValueError("no distillation example has a token to learn from")
    teacher.eval()  # no_grad in batch_kd: its weights are never touched
    grad_before = [(p, p.requires_grad) for p in student.parameters()]
    params = _trainable(student, freeze_embeddings)
    alpha, temperature = float(evolve_cfg.alpha), float(evolve_cfg.temperature)
    fingerprint = _fingerprint(examples, evolve_cfg, train_cfg, total_steps, teacher, student,
                               freeze_embeddings)
    optimizer, scheduler = adamw(params, evolve_cfg.distil_lr, total_steps, train_cfg.warmup_ratio)

    def micro_step(ids: Any, mask: Any, labels: Any, n_labelled: int) -> float:
        ce, kl, count = batch_kd(teacher, student, ids, mask, labels, temperature,
                                 need_teacher=alpha < 1.0)
        if not count:
            return 0.0
        loss = _combine(ce, kl, alpha, temperature) / n_labelled
        loss.backward()
        return float(loss.detach())

    seen: dict[str, Any] = {"losses": [], "tokens": 0, "elapsed_s": 0.0}

    def step_hook(step: int, loss: float, lr: float, tokens: int, elapsed_s: float) -> None:
        seen["losses"].append(loss)
        seen["tokens"] += tokens
        seen["elapsed_s"] = elapsed_s
        if on_step is not None:
            on_step(step, loss, lr, tokens, elapsed_s)
        if deadline is not None and time.monotonic() > deadline and step < total_steps:
            raise _OutOfTime(step)

    try:
        run = train_steps(
            student, examples=examples, total_steps=total_steps, grad_accum=train_cfg.grad_accum,
            seed=train_cfg.seed, plan=lambda: _order(examples, train_cfg, total_steps),
            optimizer=optimizer, scheduler=scheduler, params=params, micro_step=micro_step,
            pad_id=pad_id_of(tokenizer), checkpoint_dir=checkpoint_dir,
            checkpoint_every=train_cfg.checkpoint_every, weights_file=STUDENT_WEIGHTS,
            weights=lambda: _unique_state(student),
            load_weights=lambda weights: _load_weights(student, weights),
            fingerprint=fingerprint, on_step=step_hook, progress=progress, label="distil")
    except _OutOfTime as stop:  # the last step checkpoint stays for a run with more time
        student.eval()
        elapsed = float(seen["elapsed_s"])
        return DistilResult(
            model=student, steps=stop.step, tokens=int(seen["tokens"]), loss_history=seen["losses"],
            tokens_per_s=seen["tokens"] / elapsed if elapsed > 0 else 0.0, resumed_from=None,
            peak_rss_mb=peak_rss_mb(), total_steps=total_steps, elapsed_s=elapsed,
            n_examples=len(examples), stopped_early=True)
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p, flag in grad_before:
            p.requires_grad_(flag)
    state = run.state
    return DistilResult(
        model=student, steps=state.step, tokens=state.tokens, loss_history=state.losses,
        tokens_per_s=run.tokens_per_s, resumed_from=state.resumed_from,
        peak_rss_mb=peak_rss_mb(), total_steps=total_steps, elapsed_s=run.elapsed_s,
        n_examples=len(examples), peak_gpu_mb=run.peak_gpu_mb)


# -- data ---------------------------------------------------------------------------------------
def teacher_answers(teacher: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
                    chat_format: str = "auto", deadline: float | None = None) -> list[dict[str, Any]]:
    """The teacher's greedy answers as pair items (empty answers skipped); no new answer is
    started after ``deadline`` (``time.monotonic()``)."""
    from milton.train.evaluate import generate

    out = []
    for prompt in prompts:
        if deadline is not None and time.monotonic() > deadline:
            break
        if not prompt or not prompt.strip():
            continue
        item = {"kind": "pair", "prompt": prompt, "response": ""}
        answer = generate(teacher, tokenizer, item, max_new_tokens, chat_format=chat_format)
        if answer.strip():
            out.append({"kind": "pair", "prompt": prompt, "response": answer,
                        "source": "teacher"})
    return out


TOPIC_TEMPLATES = (
    "Tell me about {topic}.",
    "What do you know about {topic}?",
    "Give me a short overview of {topic}.",
    "What should I keep in mind when working with {topic}?",
    "Explain {topic} in a few sentences.",
)
#: Tags Milton itself puts on memories, which say nothing about what the user cares about.
_BOOKKEEPING_TAGS = frozenset({"document", "conversation"})
_SPEAKER = re.compile(r"^\s*(user|assistant|tool)\s*:\s*", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MAX_SENTENCE = 200


def _json_list(text: str | None) -> list[str]:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [str(v).strip() for v in value if str(v).strip()] if isinstance(value, list) else []


def _rows(db: Any, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query; none when the table does not exist (an unmigrated or foreign db)."""
    import sqlite3

    try:
        return list(db.execute(sql).fetchall())
    except sqlite3.OperationalError:
        return []


def topic_counts(db: Any) -> Counter[str]:
    """How many memories (tags) and sessions (topics) name each topic."""
    counts: Counter[str] = Counter()
    for (tags,) in _rows(db, "select tags from memories"):
        counts.update(set(_json_list(tags)) - _BOOKKEEPING_TAGS)
    for (topics,) in _rows(db, "select topics from sessions where topics is not null"):
        counts.update(set(_json_list(topics)) - _BOOKKEEPING_TAGS)
    return counts


def _first_sentence(text: str) -> str:
    text = _SPEAKER.sub("", text.strip().splitlines()[0] if text.strip() else "")
    sentence = _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()
    if len(sentence) > _MAX_SENTENCE:
        sentence = sentence[:_MAX_SENTENCE].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return sentence


def _sentence_prompts(db: Any, n: int) -> list[str]:
    """Prompts from the first sentences of the most important memories (no topics known)."""
    out: dict[str, None] = {}
    rows = _rows(db, "select content from memories order by importance desc, created desc, id")
    for (content,) in rows:
        sentence = _first_sentence(content or "")
        if len(sentence.split()) < 3:
            continue
        prompt = sentence if sentence.endswith("?") else f"Tell me more about this: {sentence}"
        out.setdefault(prompt, None)
        if len(out) >= n:
            break
    return list(out)


def topic_prompts(db: Any, n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` natural prompts about the most frequent memory topics (deterministic).

    Topics come from memories' tags and sessions' topics, ranked by how many rows name them.
    Each topic is asked once in every round, with phrasings in a seeded per-topic order,
    until ``n`` prompts are made. Without any topic, the first sentences of the most
    important memories are used instead; with no memories (or ``n`` = 0) there is nothing.
    """
    if n <= 0:
        return []
    counts = topic_counts(db)
    if not counts:
        return _sentence_prompts(db, n)
    ranked = [topic for topic, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    phrasings = {}
    for topic in ranked:
        order = list(TOPIC_TEMPLATES)
        random.Random(f"{seed}:{topic}").shuffle(order)
        phrasings[topic] = order
    out: list[str] = []
    for round_ in range(len(TOPIC_TEMPLATES)):
        for topic in ranked:
            out.append(phrasings[topic][round_].format(topic=topic))
            if len(out) >= n:
                return out
    return out
