"""The one optimizer-step loop behind train-lora, evolve's distillation and its pruning recovery.

Micro-batches of ``batch_size`` sequences of similar length (little padding, :func:`plan_batches`)
are accumulated ``grad_accum`` times per optimizer step; each step's loss is the token-weighted
mean over its labelled (assistant) tokens, whatever the split into micro-batches, so the
micro-step divides its summed loss by the step's labelled-token count before ``backward()``.
Gradients are clipped at 1.0, then AdamW and the schedule (linear warmup for ``warmup_ratio``
of the steps, then a cosine to zero, :func:`lr_factor`) step.

:func:`train_steps` runs that loop resumably: every ``checkpoint_every`` steps (and after the
last) the trained weights, optimizer, scheduler, RNG state, step, loss history and the whole
data order go into a ``step-NNNNNN`` checkpoint (:mod:`milton.train.checkpoints`), and a run
started again on the same data and settings (the fingerprint) continues from there with the
same data order and RNG stream, so it ends with the weights an uninterrupted run would have
had. :func:`run_steps` is the bare loop (pruning's recovery steps are not checkpointed).
"""

from __future__ import annotations

import contextlib
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milton.train.checkpoints import resume_step, write_step
from milton.train.formatting import IGNORE, Example

#: ``on_step(step, loss, lr, tokens, elapsed_s)`` after every optimizer step: the 1-based step,
#: its loss and learning rate, the tokens it consumed, the seconds since the loop started.
StepHook = Callable[[int, float, float, int, float], None]
#: ``micro_step(ids, mask, labels, n_labelled)`` on one padded micro-batch (on the model's
#: device): computes its loss, calls ``backward()`` on it divided by ``n_labelled`` (the step's
#: labelled tokens) and returns its share of the step's loss.
MicroStep = Callable[[Any, Any, Any, int], float]
#: ``regularize(step)`` once per optimizer step (0-based), after its micro-batches: adds its own
#: gradients (``backward()``) for a term outside the data, such as train-lora's anchor KL.
Regularizer = Callable[[int], float]
MEGA_BATCH = 32  # batches sorted by length inside windows of this many batches


# -- batching ---------------------------------------------------------------------------------
def plan_batches(lengths: list[int], batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Micro-batches (lists of example indices) for the whole run.

    Each epoch is a seeded shuffle, cut into windows of ``MEGA_BATCH`` batches that are sorted
    by length (so a batch pads little), batched, and the batches shuffled again. A fractional
    last epoch takes the first part of its order.
    """
    n = len(lengths)
    if n == 0:
        return []
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * per_epoch))
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < total:
        order = list(range(n))
        rng.shuffle(order)
        window = batch_size * MEGA_BATCH
        batches: list[list[int]] = []
        for start in range(0, n, window):
            chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        out += batches
    return out[:total]


def collate(examples: list[Example], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, labels) tensors, right-padded to the longest example."""
    import torch

    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return ids, mask, labels


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def labelled_logits(model: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, Any] | None:
    """(logits, targets) at the positions that predict a labelled token, or None if none.

    Logits are computed only at those positions (``logits_to_keep`` with their union over the
    batch; ``targets`` is IGNORE where a row has no label there), falling back to full logits
    for models without it. Shared by the NLL and train-lora's anchor KL.
    """
    targets = labels[:, 1:]
    if not bool((targets != IGNORE).any()):
        return None
    wanted = (targets != IGNORE).any(dim=0).nonzero(as_tuple=True)[0]  # positions t predicting t+1
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=wanted,
                       use_cache=False).logits
        return logits, targets[:, wanted]
    except TypeError:  # a model class without logits_to_keep
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1], targets


def batch_nll(model: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, int]:
    """(summed next-token NLL over labelled tokens, their count) for one padded batch."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own convention

    found = labelled_logits(model, ids, mask, labels)
    if found is None:
        return torch.zeros((), device=ids.device), 0
    logits, picked = found
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((picked != IGNORE).sum())


def nll_step(model: Any) -> MicroStep:
    """The plain language-model :data:`MicroStep`: token-weighted next-token NLL."""

    def step(ids: Any, mask: Any, labels: Any, n_labelled: int) -> float:
        nll, count = batch_nll(model, ids, mask, labels)
        if not count:
            return 0.0
        (nll / n_labelled).backward()
        return float(nll.detach()) / n_labelled

    return step


# -- schedule -----------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else 0


def adamw(params: list[Any], lr: float, total_steps: int, warmup_ratio: float) -> tuple[Any, Any]:
    """(AdamW without weight decay, its warmup + cosine scheduler) over ``params``."""
    import torch

    warmup = warmup_steps_for(total_steps, warmup_ratio)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup))
    return optimizer, scheduler


# -- progress -----------------------------------------------------------------------------------
@contextlib.contextmanager
def progress_bar(total: int, start: int, enabled: bool,
                 label: str = "train-lora") -> Iterator[Callable[..., None]]:
    """A Rich bar (loss, tokens/s) when stderr is a terminal; otherwise a no-op updater."""
    if not enabled:
        yield lambda **_: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )
    with progress:
        task = progress.add_task("train", total=total, completed=start, loss="-", tps="-")

        def update(**fields: Any) -> None:
            progress.update(task, **fields)

        yield update


def peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / (1024 * 1024) if sys.platform == "darwin" else usage / 1024


# -- the loop -----------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where a run stands: what a step checkpoint saves and a resume restores."""

    step: int = 0                               # optimizer steps done
    tokens: int = 0                             # non-padding tokens fed to the model
    losses: list[float] = field(default_factory=list)  # per-step loss
    order: list[list[int]] | None = None        # the whole run's micro-batches
    resumed_from: int | None = None             # the checkpoint step this process continued from


def run_steps(state: LoopState, *, total_steps: int, examples: list[Example], pad_id: int,
              device: Any, grad_accum: int, optimizer: Any, scheduler: Any, params: list[Any],
              micro_step: MicroStep, on_step: StepHook | None = None,
              update: Callable[..., None] | None = None,
              checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0,
              before_clip: Callable[[], None] | None = None,
              after_step: Callable[[], None] | None = None,
              stop: Callable[[int], bool] | None = None,
              regularize: Regularizer | None = None) -> tuple[int, float]:
    """Optimizer steps from ``state.step`` up to ``total_steps`` over ``state.order``; see the
    module docstring. ``before_clip`` and ``after_step`` let a caller edit the gradients and the
    weights around the update (pruning holds its zeros); ``stop(step)`` after a step ends the
    run early when it returns True (early stopping); ``regularize(step)`` adds a term's
    gradients to every step (deterministic in the step, so a resumed run matches). Returns (tokens fed, seconds) of this
    call."""
    import torch

    assert state.order is not None
    started = time.perf_counter()
    run_tokens = 0
    while state.step < total_steps:
        micro = state.order[state.step * grad_accum:(state.step + 1) * grad_accum]
        batches = [collate([examples[i] for i in batch], pad_id) for batch in micro]
        n_labelled = sum(int((b[2][:, 1:] != IGNORE).sum()) for b in batches)
        step_loss, step_tokens = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for ids, mask, labels in batches:
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            step_loss += micro_step(ids, mask, labels, n_labelled)
            step_tokens += int(mask.sum())
        if regularize is not None:
            regularize(state.step)
        if before_clip is not None:
            before_clip()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        state.step += 1
        state.tokens += step_tokens
        run_tokens += step_tokens
        state.losses.append(step_loss)
        elapsed = time.perf_counter() - started
        if on_step is not None:
            on_step(state.step, step_loss, lr, step_tokens, elapsed)
        if update is not None:
            update(completed=state.step, loss=f"{step_loss:.3f}",
                   tps=f"{run_tokens / elapsed:,.0f}" if elapsed > 0 else "-")
        if checkpoint is not None and (state.step % checkpoint_every == 0
                                       or state.step == total_steps):
            checkpoint(state.step)
        if stop is not None and state.step < total_steps and stop(state.step):
            break
    return run_tokens, time.perf_counter() - started


@dataclass
class StepsResult:
    """What :func:`train_steps` did: the run's state, and this process's share of it."""

    state: LoopState
    total_steps: int
    run_tokens: int
    elapsed_s: float
    peak_gpu_mb: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.run_tokens / self.elapsed_s if self.elapsed_s > 0 and self.run_tokens else 0.0


def train_steps(model: Any, *, examples: list[Example], total_steps: int, grad_accum: int,
                seed: int, plan: Callable[[], list[list[int]]], optimizer: Any, scheduler: Any,
                params: list[Any], micro_step: MicroStep, pad_id: int, checkpoint_dir: Path,
                checkpoint_every: int, weights_file: str, weights: Callable[[], dict[str, Any]],
                load_weights: Callable[[dict[str, Any]], bool], fingerprint: str,
                resume: bool = True, on_step: StepHook | None = None,
                progress: bool | None = None, label: str = "train-lora",
                stop: Callable[[int], bool] | None = None,
                regularize: Regularizer | None = None) -> StepsResult:
    """:func:`run_steps` resumably, with a progress bar, ``model`` in train mode meanwhile.

    A step checkpoint whose fingerprint is ``fingerprint`` and whose ``weights_file`` the model
    takes (``load_weights``) is continued; otherwise the run starts over with ``plan()`` as its
    data order, seeded with ``seed``. ``weights()`` gives the tensors a checkpoint saves.
    ``progress`` defaults to "stderr is a terminal".
    """
    import torch

    checkpoint_dir = Path(checkpoint_dir)
    state = LoopState()
    saved = resume_step(checkpoint_dir, weights_file, fingerprint, load_weights, optimizer,
                        scheduler) if resume else None
    if saved is not None:
        state = LoopState(step=int(saved["step"]), tokens=int(saved["tokens"]),
                          losses=[float(x) for x in saved["loss_history"]], order=saved["order"],
                          resumed_from=int(saved["step"]))
    if state.order is None:
        torch.manual_seed(seed)
        state.order = plan()

    def checkpoint(at: int) -> None:
        write_step(checkpoint_dir, at, weights_file, weights(), optimizer, scheduler, {
            "step": at, "total_steps": total_steps, "tokens": state.tokens,
            "loss_history": state.losses, "order": state.order, "fingerprint": fingerprint,
            "n_examples": len(examples)})

    show = sys.stderr.isatty() if progress is None else progress
    device = next(model.parameters()).device
    on_gpu = torch.cuda.is_available() and device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    try:
        with progress_bar(total_steps, state.step, show, label=label) as update:
            run_tokens, elapsed = run_steps(
                state, total_steps=total_steps, examples=examples, pad_id=pad_id, device=device,
                grad_accum=grad_accum, optimizer=optimizer, scheduler=scheduler, params=params,
                micro_step=micro_step, on_step=on_step, update=update, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, stop=stop, regularize=regularize)
    finally:
        model.eval()
    peak_gpu = torch.cuda.max_memory_allocated(device) / (1024 * 1024) if on_gpu else None
    return StepsResult(state, total_steps, run_tokens, elapsed, peak_gpu)
