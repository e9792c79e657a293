"""Where model artifacts live and what their files are called, in one place.

Every versioned model is an artifact kind under ``checkpoints/`` (:mod:`milton.core.artifacts`):

* ``anomaly``: the rare-process detector (``milton train-anomaly``);
* ``adapter``: a LoRA adapter (``milton train-lora``), made for one base (its manifest's
  ``base_model.sha256``); a version holds :data:`ADAPTER_DIR` (PEFT's format: what the
  transformers backend serves, evolve merges and the next train-lora continues),
  :data:`ADAPTER_GGUF` (what llama.cpp applies), :data:`ADAPTER_BASE_CONFIG` (the base's
  ``config.json``, for the converter) and :data:`DATASET_DIR` (what it learned from);
* ``base``: an evolved base (``milton evolve``); a version holds :data:`BASE_GGUF` (what serve
  runs and train-lora adapts) and :data:`BASE_HF` (full precision, what the next evolve starts
  from).

:func:`artifact_store` opens a kind with the number of versions it keeps (:func:`keep_versions`:
the kind's own ``keep_versions`` setting, else ``artifacts.keep``).
"""

from __future__ import annotations

from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings

ANOMALY_KIND = "anomaly"
ADAPTER_KIND = "adapter"
BASE_KIND = "base"

ADAPTER_DIR = "adapter"
ADAPTER_GGUF = "adapter.gguf"
ADAPTER_BASE_CONFIG = "base"
DATASET_DIR = "dataset"
#: Inside :data:`ADAPTER_DIR`: PEFT's own file names.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

BASE_GGUF = "model.gguf"
BASE_HF = "hf"
#: The full tokenizer of a base whose GGUF has a trimmed vocabulary (a GGUF with no tensors).
BASE_VOCAB = "vocab.gguf"


def keep_versions(settings: Settings, kind: str) -> int:
    """How many versions of ``kind`` retention keeps (besides the current and pinned ones)."""
    keep = {ANOMALY_KIND: settings.anomaly.keep_versions,
            ADAPTER_KIND: settings.train.keep_versions,
            BASE_KIND: settings.evolve.keep_versions}
    return keep.get(kind, settings.artifacts.keep)


def artifact_store(settings: Settings, kind: str) -> ArtifactStore:
    """``checkpoints/<kind>`` with its retention."""
    return ArtifactStore(settings.paths.checkpoints_dir, kind, keep=keep_versions(settings, kind))
