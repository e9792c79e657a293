"""Atomic, resumable checkpoints, shared by train-lora, evolve's distillation and its pruning.

A checkpoint is a directory ``<checkpoint_dir>/<name>`` that is built whole in a temporary
``.tmp-<hex>`` sibling, fsynced (files and directory), renamed into place and the parent fsynced;
only then are the older checkpoints (and temporaries a crash left behind) removed. A reader
therefore sees a complete checkpoint or none, and :func:`latest` only counts a directory that
holds its marker file (``state.json``).

The training loops' checkpoints (``step-NNNNNN``) hold the trained weights (a safetensors file
named by the caller), ``optimizer.pt`` (optimizer and scheduler state dicts), ``rng.pt`` (the
torch RNG state, and CUDA's when there is one) and ``state.json``. These file names are the
on-disk format: a job upgraded mid-run resumes from what the older code wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from milton.core.fsio import atomic_write_bytes, fsync_dir, fsync_tree

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
TMP_PREFIX = ".tmp-"
#: The training loops' checkpoints: ``step-NNNNNN``, the optimizer steps done.
STEP_RE = re.compile(r"^step-(\d{6,})$")


# -- directories --------------------------------------------------------------------------------
def latest(checkpoint_dir: Path, pattern: re.Pattern[str],
           marker: str = STATE_FILE) -> tuple[int, Path] | None:
    """(number, path) of the newest complete checkpoint: a directory whose name matches
    ``pattern`` (group 1 the number) and that holds ``marker``; None if there is none."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    found = [(int(match.group(1)), entry) for entry in checkpoint_dir.iterdir()
             if (match := pattern.match(entry.name)) and (entry / marker).is_file()]
    return max(found) if found else None


def write_checkpoint(checkpoint_dir: Path, name: str, fill: Callable[[Path], None], *,
                     pattern: re.Pattern[str]) -> Path:
    """``checkpoint_dir/name``, filled by ``fill(tmp)`` in a temporary directory and renamed
    into place (replacing one of that name); then every other entry matching ``pattern`` and
    every crashed temporary is removed. On any error the temporary is removed and it re-raises.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    final = checkpoint_dir / name
    try:
        fill(tmp)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(checkpoint_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for entry in checkpoint_dir.iterdir():  # keep the last one only (and sweep crashed temps)
        if entry != final and (pattern.match(entry.name) or entry.name.startswith(TMP_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
    return final


# -- state.json ---------------------------------------------------------------------------------
def _state_bytes(state: dict[str, Any]) -> bytes:
    return (json.dumps(state) + "\n").encode("utf-8")


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """``state.json`` into a checkpoint being built (:func:`write_checkpoint` fsyncs it)."""
    (Path(directory) / STATE_FILE).write_bytes(_state_bytes(state))


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))


def rewrite_state(directory: Path, state: dict[str, Any]) -> None:
    """Replace a finished checkpoint's ``state.json`` atomically (its other files unchanged)."""
    atomic_write_bytes(Path(directory) / STATE_FILE, _state_bytes(state))


# -- optimizer, scheduler and RNG -----------------------------------------------------------------
def save_optimizer_state(directory: Path, optimizer: Any, scheduler: Any) -> None:
    """``optimizer.pt`` (optimizer + scheduler state dicts) and ``rng.pt`` (torch, CUDA RNG)."""
    import torch

    directory = Path(directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               directory / OPTIMIZER_FILE)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, directory / RNG_FILE)


def read_optimizer_state(directory: Path) -> dict[str, Any]:
    """``{"optim": ..., "rng": ...}`` as :func:`save_optimizer_state` wrote them (CPU tensors)."""
    import torch

    directory = Path(directory)
    return {"optim": torch.load(directory / OPTIMIZER_FILE, map_location="cpu",
                                weights_only=True),
            "rng": torch.load(directory / RNG_FILE, weights_only=True)}


def restore_optimizer_state(blob: dict[str, Any], optimizer: Any, scheduler: Any) -> None:
    """Load what :func:`read_optimizer_state` read into the run, RNG streams included."""
    import torch

    optimizer.load_state_dict(blob["optim"]["optimizer"])  # moves state to the params' device
    scheduler.load_state_dict(blob["optim"]["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])


# -- the training loops' step checkpoints ---------------------------------------------------------
def latest_step(checkpoint_dir: Path) -> tuple[int, Path] | None:
    """(step, path) of the newest complete ``step-NNNNNN`` checkpoint, if any."""
    return latest(checkpoint_dir, STEP_RE)


def write_step(checkpoint_dir: Path, step: int, weights_file: str, weights: dict[str, Any],
               optimizer: Any, scheduler: Any, state: dict[str, Any]) -> Path:
    """``step-NNNNNN``: ``weights`` (CPU tensors, no aliases) as ``weights_file``, optimizer,
    scheduler and RNG state, and ``state``; the older step checkpoint removed after."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file(weights, str(tmp / weights_file))
        save_optimizer_state(tmp, optimizer, scheduler)
        write_state(tmp, state)

    return write_checkpoint(checkpoint_dir, f"step-{step:06d}", fill, pattern=STEP_RE)


def read_step(path: Path, weights_file: str) -> dict[str, Any] | None:
    """Everything in a step checkpoint (``state``, ``weights``, ``optim``, ``rng``), read fully
    before any of it is applied; None if it cannot be read (the run then starts over)."""
    from safetensors.torch import load_file

    try:
        return {"state": read_state(path), "weights": load_file(str(Path(path) / weights_file)),
                **read_optimizer_state(path)}
    except Exception:  # noqa: BLE001 - a damaged checkpoint is skipped, the run starts over
        return None


def resume_step(checkpoint_dir: Path, weights_file: str, fingerprint: str,
                load_weights: Callable[[dict[str, Any]], bool], optimizer: Any,
                scheduler: Any) -> dict[str, Any] | None:
    """Continue from the newest step checkpoint: its ``state`` once its weights, optimizer,
    scheduler and RNG state are loaded into the run, or None (start over, nothing applied).

    A checkpoint counts only if it reads whole, its state's ``fingerprint`` is ``fingerprint``
    (same data and settings) and ``load_weights(weights)`` takes the weights (False: they do
    not fit this model).
    """
    found = latest_step(checkpoint_dir)
    blob = read_step(found[1], weights_file) if found is not None else None
    if blob is None or blob["state"].get("fingerprint") != fingerprint:
        return None
    if not load_weights(blob["weights"]):
        return None
    restore_optimizer_state(blob, optimizer, scheduler)
    return blob["state"]
