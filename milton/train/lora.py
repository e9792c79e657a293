"""PEFT LoRA training with a plain PyTorch loop, resumable after a crash or ``kill -9``.

AdamW over the adapter weights only; the learning rate warms up linearly for
``warmup_ratio`` of the steps, then decays along a cosine to zero. Micro-batches of
``batch_size`` sequences of similar length (little padding) are accumulated ``grad_accum``
times per optimizer step, and the loss is the token-weighted mean over the step's labelled
(assistant) tokens, whatever the split into micro-batches. Logits are only computed at
labelled positions, which matters for models with a 262k-token vocabulary.

Every ``checkpoint_every`` steps (and after the last) the adapter, optimizer, scheduler, RNG
state, step, loss history and the whole data order go into ``<checkpoint_dir>/step-NNNNNN``,
built in a temporary directory and renamed into place, the older checkpoint removed after. A
run started again with the same items and settings continues from there with the same data
order and RNG stream, so it ends with the weights an uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milton.core.config import TrainConfig
from milton.core.errors import ConfigError
from milton.train.checkpoints import resume_step, write_step
from milton.train.formatting import IGNORE, Example, format_items

StepHook = Callable[[int, float, float, int, float], None]

#: Modules whose adapters llama.cpp cannot convert to GGUF.
_FORBIDDEN_TARGETS = re.compile(r"(^|[._])(embed_tokens|embed|embeddings|tok_embeddings|wte|wpe|"
                                r"lm_head|embed_out)($|[._])")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MEGA_BATCH = 32  # batches sorted by length inside windows of this many batches


@dataclass
class TrainResult:
    steps: int                    # optimizer steps done in total (including before a resume)
    tokens: int                   # non-padding tokens fed to the model in total
    loss_history: list[float]     # per-step loss (token-weighted mean over labelled tokens)
    tokens_per_s: float           # this process's throughput
    peak_rss_mb: float            # the process's peak resident memory
    resumed_from: int | None      # the checkpoint step this run continued from, if any
    total_steps: int = 0
    elapsed_s: float = 0.0        # this process's training time
    n_examples: int = 0
    peak_gpu_mb: float | None = None
    model: Any = field(default=None, repr=False)  # the PeftModel, adapter trained

    def metrics(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "total_steps": self.total_steps, "tokens": self.tokens,
            "final_loss": self.loss_history[-1] if self.loss_history else None,
            "tokens_per_s": round(self.tokens_per_s, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
            "resumed_from": self.resumed_from, "train_s": round(self.elapsed_s, 2),
            "n_examples": self.n_examples,
            **({"peak_gpu_mb": round(self.peak_gpu_mb, 1)} if self.peak_gpu_mb is not None else {}),
        }


# -- configuration ----------------------------------------------------------------------------
def check_target_modules(target_modules: list[str]) -> list[str]:
    """The configured modules, or a one-line ConfigError naming train.target_modules."""
    names = [str(name).strip() for name in target_modules]
    if not names or any(not name for name in names):
        raise ConfigError("train.target_modules: must name at least one module (e.g. q_proj)")
    bad = [name for name in names if _FORBIDDEN_TARGETS.search(name)]
    if bad:
        raise ConfigError(f"train.target_modules: {', '.join(bad)}: adapters on embeddings or "
                          "lm_head cannot be converted to GGUF; use attention/MLP projections "
                          "such as q_proj, k_proj, v_proj, o_proj")
    return names


def make_peft_model(model: Any, cfg: TrainConfig) -> Any:
    """Wrap a base model with a fresh LoRA adapter (seeded), or return it if already wrapped."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return model
    targets = check_target_modules(list(cfg.target_modules))
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    try:
        with warnings.catch_warnings():  # PEFT probes a property transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"train.target_modules: {first}") from None


def save_adapter(peft_model: Any, directory: Path) -> Path:
    """``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's format) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    readme_before = (directory / "README.md").exists()
    peft_model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    if not readme_before:  # PEFT adds a model card nobody asked for
        (directory / "README.md").unlink(missing_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (directory / name).is_file():
            raise RuntimeError(f"PEFT did not write {name} into {directory}")
    return directory


def load_adapter(base_model: Any, directory: Path, *, trainable: bool = False) -> Any:
    """A saved adapter on ``base_model`` (PeftModel.from_pretrained, offline)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


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


def batch_nll(model: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, int]:
    """(summed next-token NLL over labelled tokens, their count) for one padded batch.

    Logits are computed only at positions that predict a labelled token (``logits_to_keep``
    with the union of those positions), falling back to full logits for models without it.
    """
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    wanted = (targets != IGNORE).any(dim=0).nonzero(as_tuple=True)[0]  # positions t predicting t+1
    count = int((targets != IGNORE).sum())
    if count == 0:
        return torch.zeros((), device=ids.device), 0
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=wanted,
                       use_cache=False).logits
        picked = targets[:, wanted]
    except TypeError:  # a model class without logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        picked = targets
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), picked.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, count


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


# -- checkpoints ---------------------------------------------------------------------------------
def _write_checkpoint(checkpoint_dir: Path, step: int, peft_model: Any, optimizer: Any,
                      scheduler: Any, state: dict[str, Any]) -> Path:
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    return write_step(checkpoint_dir, step, ADAPTER_WEIGHTS, weights, optimizer, scheduler, state)


def _load_weights(peft_model: Any, weights: dict[str, Any]) -> bool:
    """A checkpoint's adapter weights into ``peft_model`` (on its device)."""
    from peft import set_peft_model_state_dict

    device = next(p for p in peft_model.parameters()).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in weights.items()})
    return True


def _fingerprint(examples: list[Example], cfg: TrainConfig, total_steps: int) -> str:
    """What must match for a checkpoint to be resumed: the data and the run's settings."""
    digest = hashlib.sha256()
    settings = {k: getattr(cfg, k) for k in (
        "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "warmup_ratio",
        "batch_size", "grad_accum", "epochs", "max_seq_len", "seed")}
    digest.update(json.dumps({"cfg": settings, "total_steps": total_steps}, sort_keys=True,
                             default=str).encode())
    for ex in examples:
        digest.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return digest.hexdigest()


# -- progress --------------------------------------------------------------------------------
@contextlib.contextmanager
def _progress(total: int, start: int, enabled: bool,
              label: str = "train-lora") -> Iterator[Callable[..., None]]:
    """A Rich bar (loss, tokens/s) when stderr is a terminal; otherwise a no-op updater."""
    if not enabled:
        yield lambda **_: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

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


# -- training -----------------------------------------------------------------------------------
def plan_steps(n_examples: int, cfg: TrainConfig, max_steps: int | None = None) -> int:
    """Optimizer steps a run over ``n_examples`` will take."""
    if n_examples == 0:
        return 0
    micro = max(1, math.ceil(cfg.epochs * math.ceil(n_examples / cfg.batch_size)))
    return max(1, min(max_steps or cfg.max_steps, math.ceil(micro / cfg.grad_accum)))


def train_lora(model: Any, tokenizer: Any, train_items: list[Any], cfg: TrainConfig, *,
               checkpoint_dir: Path, resume: bool = True, on_step: StepHook | None = None,
               max_steps_override: int | None = None, chat_format: str = "auto",
               progress: bool | None = None) -> TrainResult:
    """Train a LoRA adapter on ``train_items``; see the module docstring.

    ``model`` is a base model (wrapped here with a fresh, seeded adapter) or a PeftModel whose
    adapter is trainable (``load_adapter(base, dir, trainable=True)``) to train further.
    Raises ValueError when no item has a token to learn from.
    ``on_step(step, loss, lr, tokens, elapsed_s)`` is called after every optimizer step with
    the 1-based step, its loss and learning rate, the tokens it consumed and the seconds
    since this process started training. ``progress`` defaults to "stderr is a terminal".
    """
    import torch

    check_target_modules(list(cfg.target_modules))
    examples = format_items(list(train_items), tokenizer, chat_format, cfg.max_seq_len)
    if not examples:
        raise ValueError("no training example has a token to learn from")
    peft_model = make_peft_model(model, cfg)
    device = next(peft_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    total_steps = plan_steps(len(examples), cfg, max_steps_override)
    warmup = warmup_steps_for(total_steps, cfg.warmup_ratio)
    fingerprint = _fingerprint(examples, cfg, total_steps)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter has no trainable weights (load it with trainable=True)")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup))

    step, tokens, losses, resumed_from = 0, 0, [], None
    order: list[list[int]] | None = None
    checkpoint_dir = Path(checkpoint_dir)
    state = resume_step(checkpoint_dir, ADAPTER_WEIGHTS, fingerprint,
                        lambda weights: _load_weights(peft_model, weights), optimizer,
                        scheduler) if resume else None
    if state is not None:
        step, tokens = int(state["step"]), int(state["tokens"])
        losses = [float(x) for x in state["loss_history"]]
        order = state["order"]
        resumed_from = step
    if order is None:
        torch.manual_seed(cfg.seed)
        order = plan_batches([len(ex.input_ids) for ex in examples], cfg.batch_size, cfg.epochs,
                             cfg.seed)

    def checkpoint(at: int) -> None:
        _write_checkpoint(checkpoint_dir, at, peft_model, optimizer, scheduler, {
            "step": at, "total_steps": total_steps, "tokens": tokens, "loss_history": losses,
            "order": order, "fingerprint": fingerprint, "n_examples": len(examples)})

    show = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()
    run_tokens = 0
    peft_model.train()
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with _progress(total_steps, step, show) as update:
            while step < total_steps:
                micro = order[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
                batches = [collate([examples[i] for i in batch], pad_id) for batch in micro]
                n_labelled = sum(int((b[2][:, 1:] != IGNORE).sum()) for b in batches)
                step_loss, step_tokens = 0.0, 0
                optimizer.zero_grad(set_to_none=True)
                for ids, mask, labels in batches:
                    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                    nll, count = batch_nll(peft_model, ids, mask, labels)
                    if count:
                        (nll / n_labelled).backward()
                        step_loss += float(nll.detach()) / n_labelled
                    step_tokens += int(mask.sum())
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step += 1
                tokens += step_tokens
                run_tokens += step_tokens
                losses.append(step_loss)
                elapsed = time.perf_counter() - started
                if on_step is not None:
                    on_step(step, step_loss, lr, step_tokens, elapsed)
                update(completed=step, loss=f"{step_loss:.3f}",
                       tps=f"{run_tokens / elapsed:,.0f}" if elapsed > 0 else "-")
                if step % cfg.checkpoint_every == 0 or step == total_steps:
                    checkpoint(step)
    finally:
        peft_model.eval()
    elapsed = time.perf_counter() - started
    peak_gpu = None
    if torch.cuda.is_available() and device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(device) / (1024 * 1024)
    return TrainResult(
        steps=step, tokens=tokens, loss_history=losses,
        tokens_per_s=run_tokens / elapsed if elapsed > 0 and run_tokens else 0.0,
        peak_rss_mb=peak_rss_mb(), resumed_from=resumed_from, total_steps=total_steps,
        elapsed_s=elapsed, n_examples=len(examples), peak_gpu_mb=peak_gpu, model=peft_model)
