"""PEFT LoRA training on the one step loop (:mod:`milton.train.loop`), resumable after a crash
or ``kill -9``.

AdamW over the adapter weights only, with warmup and a cosine decay; length-grouped
micro-batches with gradient accumulation and a token-weighted loss over the labelled
(assistant) tokens. Logits are only computed at labelled positions, which matters for models
with a 262k-token vocabulary. Every ``checkpoint_every`` steps (and after the last) the
adapter, optimizer, scheduler, RNG state, step, loss history and the whole data order go into
``<checkpoint_dir>/step-NNNNNN``; a run started again with the same items and settings
continues from there and ends with the weights an uninterrupted run would have had.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milton.core.config import TrainConfig
from milton.core.errors import ConfigError
from milton.models.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from milton.train.evaluate import adapter_disabled
from milton.train.formatting import IGNORE, Example, format_items
from milton.train.loop import (
    Regularizer,
    StepHook,
    adamw,
    collate,
    labelled_logits,
    nll_step,
    pad_id_of,
    peak_rss_mb,
    plan_batches,
    train_steps,
)

#: Modules whose adapters llama.cpp cannot convert to GGUF (embeddings, lm_head): never LoRA
#: targets, and never pruned.
FORBIDDEN_TARGETS = re.compile(r"(^|[._])(embed_tokens|embed|embeddings|tok_embeddings|wte|wpe|"
                               r"lm_head|embed_out)($|[._])")


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
    anchor_kl: list[float] = field(default_factory=list)  # per-step anchor KL (this process)
    peak_gpu_mb: float | None = None
    model: Any = field(default=None, repr=False)  # the PeftModel, adapter trained

    def metrics(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "total_steps": self.total_steps, "tokens": self.tokens,
            "final_loss": self.loss_history[-1] if self.loss_history else None,
            "tokens_per_s": round(self.tokens_per_s, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
            "resumed_from": self.resumed_from, "train_s": round(self.elapsed_s, 2),
            "n_examples": self.n_examples,
            **({"anchor_kl_first": round(self.anchor_kl[0], 4),
                "anchor_kl_last": round(self.anchor_kl[-1], 4)} if self.anchor_kl else {}),
            **({"peak_gpu_mb": round(self.peak_gpu_mb, 1)} if self.peak_gpu_mb is not None else {}),
        }


# -- configuration ----------------------------------------------------------------------------
def check_target_modules(target_modules: list[str]) -> list[str]:
    """The configured modules, or a one-line ConfigError naming train.target_modules."""
    names = [str(name).strip() for name in target_modules]
    if not names or any(not name for name in names):
        raise ConfigError("train.target_modules: must name at least one module (e.g. q_proj)")
    bad = [name for name in names if FORBIDDEN_TARGETS.search(name)]
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


# -- checkpoints ---------------------------------------------------------------------------------
def _adapter_weights(peft_model: Any) -> dict[str, Any]:
    """The adapter's weights, on the CPU, as a step checkpoint saves them."""
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}


def _load_weights(peft_model: Any, weights: dict[str, Any]) -> bool:
    """A checkpoint's adapter weights into ``peft_model`` (on its device)."""
    from peft import set_peft_model_state_dict

    device = next(p for p in peft_model.parameters()).device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in weights.items()})
    return True


def _fingerprint(examples: list[Example], cfg: TrainConfig, total_steps: int,
                 anchors: list[Example]) -> str:
    """What must match for a checkpoint to be resumed: the data and the run's settings."""
    digest = hashlib.sha256()
    settings = {k: getattr(cfg, k) for k in (
        "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "warmup_ratio",
        "batch_size", "grad_accum", "epochs", "max_seq_len", "seed", "anchor_weight")}
    digest.update(json.dumps({"cfg": settings, "total_steps": total_steps}, sort_keys=True,
                             default=str).encode())
    for ex in examples + anchors:
        digest.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return digest.hexdigest()


# -- anchors ------------------------------------------------------------------------------------
def anchor_kl(peft_model: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, int]:
    """(summed KL(base || adapted) over the labelled positions, their count) for one batch.

    The reference is the same model with its adapter switched off, so no second copy of the
    weights is held; only the labelled positions' logits are computed (:func:`labelled_logits`).
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own convention

    def log_probs() -> Any:
        found = labelled_logits(peft_model, ids, mask, labels)
        if found is None:
            return None
        logits, targets = found
        return F.log_softmax(logits[targets != IGNORE].float(), dim=-1)

    with torch.no_grad(), adapter_disabled(peft_model):
        reference = log_probs()
    if reference is None:
        return torch.zeros((), device=ids.device), 0
    adapted = log_probs()
    kl = F.kl_div(adapted, reference, log_target=True, reduction="sum")
    return kl, int(reference.shape[0])


def anchor_regularizer(peft_model: Any, anchors: list[Example], pad_id: int, weight: float,
                       batch_size: int, seed: int, seen: list[float]) -> Regularizer:
    """Per optimizer step, ``weight`` x the mean KL(base || adapted) on ``batch_size`` anchor
    examples (a seeded cycle through them, so a resumed run sees the same ones).

    Why: trained on "Your cat is named Quillon." alone, the adapter answers every question in
    that form and general-text perplexity rises 2-5x (measured on the embedded Gemma); holding
    its answers to general prompts at the base model's keeps what it knew while the facts go in.
    """
    order = list(range(len(anchors)))
    random.Random(f"{seed}:anchors").shuffle(order)
    device = next(peft_model.parameters()).device

    def regularize(step: int) -> float:
        start = step * batch_size
        batch = [anchors[order[(start + k) % len(order)]] for k in range(min(batch_size, len(order)))]
        ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
        kl, count = anchor_kl(peft_model, ids, mask, labels)
        if not count:
            return 0.0
        (weight * kl / count).backward()
        value = float(kl.detach()) / count
        seen.append(value)
        return value

    return regularize


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
               progress: bool | None = None,
               stop: Callable[[int, Any], bool] | None = None,
               anchors: list[Any] | None = None) -> TrainResult:
    """Train a LoRA adapter on ``train_items``; see the module docstring.

    ``model`` is a base model (wrapped here with a fresh, seeded adapter) or a PeftModel whose
    adapter is trainable (``load_adapter(base, dir, trainable=True)``) to train further.
    Raises ValueError when no item has a token to learn from.
    ``on_step(step, loss, lr, tokens, elapsed_s)`` is called after every optimizer step with
    the 1-based step, its loss and learning rate, the tokens it consumed and the seconds
    since this process started training. ``progress`` defaults to "stderr is a terminal".
    ``stop(step, peft_model)`` is asked after every step before the last; True ends training
    there (early stopping: the job probes recall at epoch ends). ``anchors`` (items) are held
    at the base model's answers with ``train.anchor_weight`` (:func:`anchor_regularizer`).
    """
    check_target_modules(list(cfg.target_modules))
    examples = format_items(list(train_items), tokenizer, chat_format, cfg.max_seq_len)
    if not examples:
        raise ValueError("no training example has a token to learn from")
    peft_model = make_peft_model(model, cfg)
    total_steps = plan_steps(len(examples), cfg, max_steps_override)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter has no trainable weights (load it with trainable=True)")
    optimizer, scheduler = adamw(params, cfg.learning_rate, total_steps, cfg.warmup_ratio)
    anchor_examples = (format_items(list(anchors), tokenizer, chat_format, cfg.max_seq_len)
                       if anchors and cfg.anchor_weight > 0 else [])
    kl_seen: list[float] = []
    regularize = anchor_regularizer(peft_model, anchor_examples, pad_id_of(tokenizer),
                                    cfg.anchor_weight, cfg.batch_size, cfg.seed,
                                    kl_seen) if anchor_examples else None
    run = train_steps(
        peft_model, examples=examples, total_steps=total_steps, grad_accum=cfg.grad_accum,
        seed=cfg.seed, plan=lambda: plan_batches([len(ex.input_ids) for ex in examples],
                                                 cfg.batch_size, cfg.epochs, cfg.seed),
        optimizer=optimizer, scheduler=scheduler, params=params,
        micro_step=nll_step(peft_model), pad_id=pad_id_of(tokenizer),
        checkpoint_dir=checkpoint_dir, checkpoint_every=cfg.checkpoint_every,
        weights_file=ADAPTER_WEIGHTS, weights=lambda: _adapter_weights(peft_model),
        load_weights=lambda weights: _load_weights(peft_model, weights),
        fingerprint=_fingerprint(examples, cfg, total_steps, anchor_examples), resume=resume,
        on_step=on_step, progress=progress,
        stop=(lambda step: stop(step, peft_model)) if stop else None, regularize=regularize)
    state = run.state
    return TrainResult(
        steps=state.step, tokens=state.tokens, loss_history=state.losses,
        tokens_per_s=run.tokens_per_s, peak_rss_mb=peak_rss_mb(), resumed_from=state.resumed_from,
        total_steps=total_steps, elapsed_s=run.elapsed_s, n_examples=len(examples),
        peak_gpu_mb=run.peak_gpu_mb, model=peft_model, anchor_kl=kl_seen)
