"""evolve's pruning stage: Wanda (or magnitude) pruning, iterated with masked recovery.

**Scores.** Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models") scores a weight by ``|W_ij| * ||X_j||_2``, where ``X_j`` is the j-th input
feature of the layer over the calibration tokens, and compares weights within each output row:
every row of every decoder projection loses the same share. A feature with large activations
keeps its small weights, which matters because LLMs have a few such outlier features and
magnitude pruning cuts exactly the weights that read them. ``magnitude`` (``|W_ij|``, compared
per output row too, so the two differ only in the activation term) is the weak baseline.
Activations are taken in one forward pass of the current model (Wanda's reference code feeds
each pruned layer's output to the next; on a model that is re-calibrated after each recovery
this makes little difference).

**Iterations.** :func:`iterative_prune` raises every layer's sparsity by ``prune_step`` at a
time up to ``prune_max``; each step prunes (weights already zero stay zero), fine-tunes every
parameter (optionally all but the embeddings) for ``recovery_steps`` at ``recovery_lr`` with the pruned weights
held at exactly zero, and measures quality = start perplexity / perplexity on the eval items.
The first iteration whose quality falls below ``quality_threshold`` is undone and ends the run.

**Resume.** After each accepted iteration the parameters, masks and history go into
``<checkpoint_dir>/iter-NNN`` (built in a temporary directory and renamed into place, the older
one removed after). Every random choice of an iteration is seeded from the iteration number, so
a run killed at any point and started again on the same model, items and settings continues
after the last accepted iteration and ends with the weights an uninterrupted run would have.

**What it buys, honestly.** Unstructured zeros do not make a GGUF smaller or faster: GGUF
tensors are dense (a zero costs the same bits as any value in f16, q8_0 or q4_k_m) and ggml's
matmul kernels skip nothing, so llama.cpp runs a 50%-sparse model exactly as fast as the dense
one (llama.cpp has no sparse kernels; its sparsity feature requests, e.g. ggml-org/llama.cpp
#3594, were closed unimplemented). Only a compressed copy of the file (zstd of an f16 GGUF for
backup or download) shrinks. Size and speed come from the smaller distilled student and from
quantization. Pruning is here as a regularised compression step (the recovery fine-tune keeps
what matters in fewer weights) and to have sparse weights ready for kernels that can use
them. Note also that only the decoder projections are pruned: for Gemma 3 270M that is 100M of
268M weights (the 262k-token embedding is 168M), so 50% of them is 19% of the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milton.core.config import EvolveConfig, TrainConfig
from milton.train.checkpoints import (
    latest,
    read_state,
    rewrite_state,
    write_checkpoint,
    write_state,
)
from milton.train.evaluate import perplexity
from milton.train.formatting import Example, format_items, resolve_format
from milton.train.loop import (
    LoopState,
    adamw,
    collate,
    nll_step,
    pad_id_of,
    plan_batches,
    progress_bar,
    run_steps,
)
from milton.train.lora import FORBIDDEN_TARGETS

METHODS = ("wanda", "magnitude", "none")
IterationHook = Callable[[dict[str, Any]], None]

_CHECKPOINT_RE = re.compile(r"^iter-(\d{3,})$")
PARAMS_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"


@dataclass
class PruneResult:
    model: Any                          # the pruned (and recovered) model, last accepted state
    sparsity: float                     # sparsity of the last accepted iteration (0 if none)
    iterations: list[dict[str, Any]]    # sparsity, ppl, quality, accepted, recovery_loss
    stopped: str                        # 'threshold' | 'max' | 'budget' | 'none' (method none)
    start_ppl: float | None             # eval perplexity before any pruning
    resumed_from: int | None            # accepted iterations a checkpoint supplied, if any
    masks: dict[str, Any] = field(default_factory=dict, repr=False)  # keep-masks, per layer

    def metrics(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "stopped": self.stopped, "start_ppl": self.start_ppl,
                "iterations": self.iterations, "resumed_from": self.resumed_from}


# -- layers -----------------------------------------------------------------------------------
def prunable_linears(model: Any) -> dict[str, Any]:
    """Full name -> ``nn.Linear`` for every projection inside the decoder layers.

    Found through ``get_decoder().layers`` (Llama, Gemma 3 and most HF causal LMs), so
    embeddings, ``lm_head`` and any vision tower are never included. Expects a plain model:
    merge LoRA adapters first.
    """
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers (get_decoder().layers)")
    inside = {id(module) for module in layers.modules()}
    found = {name: module for name, module in model.named_modules()
             if id(module) in inside and isinstance(module, torch.nn.Linear)
             and not FORBIDDEN_TARGETS.search(name) and "lora_" not in name}
    if not found:
        raise ValueError(f"{type(model).__name__}: no linear layers in the decoder")
    return found


def sparsity_of(model: Any) -> float:
    """Share of exactly-zero weights over all prunable layers."""
    zeros = total = 0
    for linear in prunable_linears(model).values():
        zeros += int((linear.weight == 0).sum())
        total += linear.weight.numel()
    return zeros / total if total else 0.0


# -- calibration ------------------------------------------------------------------------------
def input_norms(model: Any, tokenizer: Any, calib_items: list[Any], train_cfg: TrainConfig, *,
                chat_format: str = "auto") -> dict[str, Any]:
    """Layer name -> L2 norm of each input feature over the calibration tokens (float32).

    Every non-padding token of the formatted items counts (prompt and answer alike); padded
    positions are dropped through the attention mask before they are summed.
    """
    examples = format_items(list(calib_items), tokenizer, chat_format, train_cfg.max_seq_len)
    if not examples:
        raise ValueError("no calibration item has a token")
    return _input_norms(model, tokenizer, examples, train_cfg.batch_size)


def _input_norms(model: Any, tokenizer: Any, examples: list[Example],
                 batch_size: int) -> dict[str, Any]:
    import torch

    layers = prunable_linears(model)
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
            for name, lin in layers.items()}
    rows: dict[str, Any] = {}  # the current batch's non-padding positions, flattened

    def hook(name: str) -> Callable[..., None]:
        def record(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            if x.shape[0] != rows["keep"].shape[0]:
                raise RuntimeError(f"{name}: input rows do not match the batch's tokens")
            kept = x[rows["keep"].to(x.device)].float()
            sums[name] += kept.pow(2).sum(dim=0)
        return record

    handles = [lin.register_forward_hook(hook(name)) for name, lin in layers.items()]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[start:start + batch_size]]
                ids, mask, _ = (t.to(device) for t in collate(batch, pad_id))
                rows["keep"] = mask.reshape(-1).bool()
                _forward_cheap(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: total.sqrt() for name, total in sums.items()}


def _forward_cheap(model: Any, ids: Any, mask: Any) -> None:
    """A forward pass for its hooks only: logits for one position (a 262k vocabulary is big)."""
    try:
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
    except TypeError:  # a model class without logits_to_keep
        model(input_ids=ids, attention_mask=mask, use_cache=False)


# -- pruning ----------------------------------------------------------------------------------
def prune(model: Any, sparsity: float, method: str, norms: dict[str, Any] | None = None,
          masks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Zero the lowest-scoring ``round(sparsity * in_features)`` weights of every row.

    Weights already pruned (False in ``masks``, or exactly zero when no masks are given) stay
    pruned and count towards the row's share, so pruning is cumulative; a ``sparsity`` below
    the current one prunes nothing new. Returns the keep-masks (bool, True = kept, on the
    weights' device); pruned weights are set to exactly +0.0.
    """
    import torch

    if method not in ("wanda", "magnitude"):
        raise ValueError(f"prune: method must be wanda or magnitude, not {method!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"prune: sparsity must be in [0, 1), not {sparsity}")
    if method == "wanda" and norms is None:
        raise ValueError("prune: wanda needs the input norms (input_norms())")
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, linear in prunable_linears(model).items():
            weight = linear.weight
            before = masks[name].to(weight.device) if masks and name in masks else weight != 0
            score = weight.detach().abs().float()
            if method == "wanda":
                score = score * norms[name].to(weight.device, torch.float32).unsqueeze(0)
            keep = before.clone()
            n_prune = round(sparsity * weight.shape[1])
            if n_prune:
                score = score.masked_fill(~before, -math.inf)  # already pruned: chosen first
                lowest = torch.topk(score, n_prune, dim=1, largest=False).indices
                keep.scatter_(1, lowest, False)
            weight.masked_fill_(~keep, 0.0)
            out[name] = keep
    return out


def apply_masks(model: Any, masks: dict[str, Any]) -> None:
    """Set every masked-out weight back to exactly zero."""
    import torch

    layers = prunable_linears(model)
    with torch.no_grad():
        for name, keep in masks.items():
            weight = layers[name].weight
            weight.masked_fill_(~keep.to(weight.device), 0.0)


# -- recovery ---------------------------------------------------------------------------------
def recover(model: Any, tokenizer: Any, items: list[Any], masks: dict[str, Any], steps: int,
            lr: float, train_cfg: TrainConfig, *, chat_format: str = "auto",
            seed: int | None = None, freeze_embeddings: bool = False) -> list[float]:
    """Fine-tune every parameter for ``steps`` optimizer steps, pruned weights held at zero.

    AdamW (no weight decay), linear warmup for ``train_cfg.warmup_ratio`` then cosine decay of
    ``lr``; ``grad_accum`` micro-batches of ``batch_size`` per step and a token-weighted CE over
    the labelled tokens, as in train-lora. Gradients of pruned weights are zeroed before each
    step and the masks re-applied after it. Returns the per-step losses; ``seed`` (default
    ``train_cfg.seed``) fixes the data order and any dropout. ``freeze_embeddings`` leaves the
    input embeddings (and a tied lm_head) alone: pruning never touches them, and for Gemma 3
    270M they are 168M of 268M weights, ~2 GB of gradients and AdamW state in float32.
    """
    examples = format_items(list(items), tokenizer, chat_format, train_cfg.max_seq_len)
    if steps <= 0 or not examples:
        return []
    return _recover(model, tokenizer, examples, masks, steps, lr, train_cfg,
                    train_cfg.seed if seed is None else seed, freeze_embeddings)


def _recover(model: Any, tokenizer: Any, examples: list[Example], masks: dict[str, Any],
             steps: int, lr: float, cfg: TrainConfig, seed: int, freeze_embeddings: bool,
             on_step: Callable[[float], None] | None = None) -> list[float]:
    import torch

    device = next(model.parameters()).device
    layers = prunable_linears(model)
    pruned = [(layers[name].weight, ~keep.to(layers[name].weight.device))
              for name, keep in masks.items()]
    frozen = model.get_input_embeddings().weight if freeze_embeddings else None
    params = [p for p in model.parameters() if p.requires_grad and p is not frozen]
    if frozen is not None and frozen.requires_grad:
        frozen.requires_grad_(False)
    else:
        frozen = None  # nothing to give back afterwards
    optimizer, scheduler = adamw(params, lr, steps, cfg.warmup_ratio)
    state = LoopState(order=_micro_batches(examples, cfg.batch_size, steps * cfg.grad_accum, seed))
    torch.manual_seed(seed)

    def mask_grads() -> None:
        for weight, dropped in pruned:
            if weight.grad is not None:
                weight.grad.masked_fill_(dropped, 0.0)

    def mask_weights() -> None:
        with torch.no_grad():
            for weight, dropped in pruned:
                weight.masked_fill_(dropped, 0.0)

    model.train()
    try:
        run_steps(state, total_steps=steps, examples=examples, pad_id=pad_id_of(tokenizer),
                  device=device, grad_accum=cfg.grad_accum, optimizer=optimizer,
                  scheduler=scheduler, params=params, micro_step=nll_step(model),
                  on_step=(lambda _step, loss, *_: on_step(loss)) if on_step else None,
                  before_clip=mask_grads, after_step=mask_weights)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if frozen is not None:
            frozen.requires_grad_(True)
        model.eval()
    return state.losses


def _micro_batches(examples: list[Example], batch_size: int, count: int,
                   seed: int) -> list[list[int]]:
    """Exactly ``count`` micro-batches in train-lora's order (length-sorted, seeded)."""
    per_epoch = math.ceil(len(examples) / batch_size)
    order = plan_batches([len(ex.input_ids) for ex in examples], batch_size,
                         count / per_epoch + 1e-9, seed)
    return order[:count]


# -- checkpoints ------------------------------------------------------------------------------
def latest_checkpoint(checkpoint_dir: Path) -> tuple[int, Path] | None:
    """(accepted iterations, path) of the newest complete checkpoint, if any."""
    return latest(checkpoint_dir, _CHECKPOINT_RE)


def _write_checkpoint(checkpoint_dir: Path, iteration: int, model: Any | None,
                      masks: dict[str, Any], state: dict[str, Any]) -> Path:
    """``iter-NNN``: parameters (none for iteration 0: the caller's model), masks, state."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        if model is not None:
            save_file({name: p.detach().to("cpu").contiguous()
                       for name, p in model.named_parameters()}, str(tmp / PARAMS_FILE))
        save_file({name: keep.to("cpu").contiguous() for name, keep in masks.items()},
                  str(tmp / MASKS_FILE))
        write_state(tmp, state)

    return write_checkpoint(checkpoint_dir, f"iter-{iteration:03d}", fill,
                            pattern=_CHECKPOINT_RE)


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """Everything in a checkpoint, read fully before any of it is applied; None if unreadable."""
    from safetensors.torch import load_file

    try:
        state = read_state(path)
        params = load_file(str(path / PARAMS_FILE)) if (path / PARAMS_FILE).exists() else None
        if params is None and int(state["accepted"]) > 0:
            return None
        return {"state": state, "params": params, "masks": load_file(str(path / MASKS_FILE))}
    except Exception:  # noqa: BLE001 - a damaged checkpoint is skipped, the run starts over
        return None


def _apply_params(model: Any, params: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])


def _snapshot(model: Any) -> dict[str, Any]:
    """A CPU copy of every parameter (tied ones once), to undo a rejected iteration."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def _fingerprint(model: Any, sets: dict[str, list[Example]], evolve_cfg: EvolveConfig,
                 train_cfg: TrainConfig, chat_format: str, freeze_embeddings: bool) -> str:
    """What must match for a checkpoint to be resumed: starting weights, data and settings."""
    import torch

    digest = hashlib.sha256()
    settings = {
        "evolve": {k: getattr(evolve_cfg, k) for k in (
            "prune_method", "prune_step", "prune_max", "recovery_steps", "calibration_items",
            "quality_threshold", "recovery_lr")},
        "train": {k: getattr(train_cfg, k) for k in (
            "batch_size", "grad_accum", "max_seq_len", "seed", "warmup_ratio")},
        "chat_format": chat_format, "freeze_embeddings": freeze_embeddings,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for label, examples in sets.items():
        digest.update(f"\0{label}\0".encode())
        for ex in examples:
            digest.update(json.dumps([ex.input_ids, ex.labels]).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- the iterative run ------------------------------------------------------------------------
def schedule(evolve_cfg: EvolveConfig) -> list[float]:
    """Target sparsities: prune_step, 2 x prune_step, ... up to prune_max."""
    out, k = [], 1
    while (target := round(k * evolve_cfg.prune_step, 6)) <= evolve_cfg.prune_max + 1e-9:
        out.append(target)
        k += 1
    return out


@dataclass
class _Run:
    """One iterative run: its inputs, and the state a checkpoint carries."""

    model: Any
    tokenizer: Any
    sets: dict[str, list[Example]]
    eval_items: list[Any]
    evolve_cfg: EvolveConfig
    train_cfg: TrainConfig
    checkpoint_dir: Path
    chat_format: str
    fingerprint: str
    on_iteration: IterationHook | None
    freeze_embeddings: bool = False
    deadline: float | None = None       # time.monotonic() after which no iteration starts
    update: Callable[..., None] = lambda **_: None  # the progress bar
    accepted: int = 0                   # accepted iterations so far
    iterations: list[dict[str, Any]] = field(default_factory=list)
    start_ppl: float | None = None
    masks: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None
    resumed_from: int | None = None

    def state(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "iterations": self.iterations,
                "start_ppl": self.start_ppl, "stopped": self.stopped,
                "fingerprint": self.fingerprint}

    def ppl(self) -> float:
        value = perplexity(self.model, self.tokenizer, self.eval_items, self.train_cfg,
                           chat_format=self.chat_format)
        return float("inf") if value is None else value


def iterative_prune(model: Any, tokenizer: Any, *, calib_items: list[Any],
                    train_items: list[Any], eval_items: list[Any], evolve_cfg: EvolveConfig,
                    train_cfg: TrainConfig, checkpoint_dir: Path, chat_format: str = "auto",
                    on_iteration: IterationHook | None = None, freeze_embeddings: bool = False,
                    progress: bool | None = None, deadline: float | None = None) -> PruneResult:
    """Prune ``model`` in place step by step while it keeps ``quality_threshold``; see module.

    Calibration uses the first ``calibration_items`` of ``calib_items``; recovery fine-tunes
    on ``train_items`` at ``recovery_lr``. No iteration starts after ``deadline``
    (``time.monotonic()``; the run then stops as ``budget``, keeping its accepted iterations). ``on_iteration(record)`` is called after each
    iteration is evaluated (and checkpointed, if accepted). A checkpoint of a run that already
    ended returns its result at once. ``freeze_embeddings``: see :func:`recover`; ``progress``
    (a bar over the recovery steps) defaults to "stderr is a terminal". Raises ValueError when
    no eval item has a token.
    """
    method = evolve_cfg.prune_method
    if method not in METHODS:
        raise ValueError(f"evolve.prune_method: {method!r} is not one of {', '.join(METHODS)}")
    if method == "none":
        return PruneResult(model, 0.0, [], "none", None, None)
    resolved = resolve_format(tokenizer, chat_format)
    sets = {name: format_items(list(items), tokenizer, resolved, train_cfg.max_seq_len)
            for name, items in (("calib", list(calib_items)[:evolve_cfg.calibration_items]),
                                ("train", train_items), ("eval", eval_items))}
    if not sets["eval"]:
        raise ValueError("pruning needs eval items with tokens to measure quality")
    if method == "wanda" and not sets["calib"]:
        raise ValueError("wanda pruning needs calibration items with tokens")
    fingerprint = _fingerprint(model, sets, evolve_cfg, train_cfg, resolved, freeze_embeddings)
    run = _Run(model, tokenizer, sets, list(eval_items), evolve_cfg, train_cfg,
               Path(checkpoint_dir), resolved, fingerprint, on_iteration, freeze_embeddings,
               deadline=deadline)
    if not _resume(run):
        run.start_ppl = run.ppl()
    if run.stopped is None:
        steps = evolve_cfg.recovery_steps if sets["train"] else 0
        show = sys.stderr.isatty() if progress is None else progress
        with progress_bar(len(schedule(evolve_cfg)) * steps, run.accepted * steps, show,
                       label="prune") as run.update:
            _iterate(run)
    accepted = [it for it in run.iterations if it["accepted"]]
    return PruneResult(model, accepted[-1]["sparsity"] if accepted else 0.0, run.iterations,
                       run.stopped, run.start_ppl, run.resumed_from, run.masks)


def _resume(run: _Run) -> bool:
    """Load the run's checkpoint into ``run`` (weights into its model) if there is one."""
    found = latest_checkpoint(run.checkpoint_dir)
    blob = _read_checkpoint(found[1]) if found is not None else None
    if blob is None or blob["state"].get("fingerprint") != run.fingerprint:
        return False
    if blob["params"] is not None:
        _apply_params(run.model, blob["params"])
    device = next(run.model.parameters()).device
    state = blob["state"]
    run.accepted = run.resumed_from = int(state["accepted"])
    run.iterations, run.start_ppl = state["iterations"], state["start_ppl"]
    run.stopped = state.get("stopped")
    if run.stopped == "budget":  # a new process, a new budget: go on
        run.stopped = None
    run.masks = {name: keep.to(device) for name, keep in blob["masks"].items()}
    return True


def _iterate(run: _Run) -> None:
    """Prune -> recover -> evaluate from iteration ``accepted + 1`` on, until a stop."""
    targets = schedule(run.evolve_cfg)
    for k in range(run.accepted + 1, len(targets) + 1):
        if run.deadline is not None and time.monotonic() > run.deadline:
            run.stopped = "budget"
            _finish(run)
            return
        before = _snapshot(run.model)
        masks, record = _one_iteration(run, k, targets[k - 1])
        run.iterations.append(record)
        if not record["accepted"]:
            _apply_params(run.model, before)
            run.stopped = "threshold"
            _finish(run)
        else:
            run.accepted, run.masks = k, masks
            _write_checkpoint(run.checkpoint_dir, k, run.model, masks, run.state())
        if run.on_iteration is not None:
            run.on_iteration(dict(record))
        if run.stopped:
            return
    run.stopped = "max"
    _finish(run)


def _one_iteration(run: _Run, k: int, target: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(masks, record) of iteration ``k``: prune to ``target``, recover (seeded by k), measure."""
    cfg, method = run.evolve_cfg, run.evolve_cfg.prune_method
    norms = (_input_norms(run.model, run.tokenizer, run.sets["calib"], run.train_cfg.batch_size)
             if method == "wanda" else None)
    masks = prune(run.model, target, method, norms, run.masks or None)
    losses = []
    if run.sets["train"] and cfg.recovery_steps > 0:
        done = (k - 1) * cfg.recovery_steps

        def step(loss: float) -> None:
            nonlocal done
            done += 1
            run.update(completed=done, loss=f"{loss:.3f}")

        losses = _recover(run.model, run.tokenizer, run.sets["train"], masks, cfg.recovery_steps,
                          cfg.recovery_lr, run.train_cfg, run.train_cfg.seed + k,
                          run.freeze_embeddings, step)
    ppl = run.ppl()
    quality = run.start_ppl / ppl if ppl else 0.0
    return masks, {"sparsity": target, "ppl": ppl, "quality": quality,
                   "accepted": quality >= cfg.quality_threshold,
                   "recovery_loss": losses[-1] if losses else None}


def _finish(run: _Run) -> None:
    """Mark the run ended in its last checkpoint (none accepted: a weightless iter-000)."""
    found = latest_checkpoint(run.checkpoint_dir)
    if run.accepted and found is not None and found[0] == run.accepted:
        rewrite_state(found[1], run.state())
    else:
        _write_checkpoint(run.checkpoint_dir, 0, None, run.masks, run.state())
