"""Stage 1 of evolve: the serving model as one plain Hugging Face model (base + adapter merged).

The starting point is what serve runs: the evolved base when one is promoted (from its
full-precision ``hf/`` copy, not the quantized GGUF, so quantization error does not compound
month after month), else ``model.base``; plus the promoted adapter when it was trained on that
base. The result is a complete model directory that the converter and later stages can load.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milton.core.config import Settings
from milton.models.hf import load_base
from milton.models.layout import BASE_HF
from milton.models.refs import BaseModelRef, resolve_base

TOKENIZER_FILES = ("tokenizer.model",)  # what save_pretrained does not rewrite but converters read


@dataclass(frozen=True)
class Source:
    """What an evolve run starts from."""

    base: BaseModelRef            # the serving base (its sha256 keys adapters and resumes)
    load_from: BaseModelRef       # where its weights are read (hf/ of an evolved base)
    adapter_version: str | None   # promoted adapter made for this base, if any
    adapter_dir: Path | None

    def as_dict(self) -> dict[str, Any]:
        return {"base": self.base.as_dict(), "load_from": str(self.load_from.path),
                "adapter_version": self.adapter_version}


def find_source(settings: Settings) -> Source:
    from milton.models.layout import ADAPTER_DIR
    from milton.train.jobs import adapter_store

    base = resolve_base(settings)
    load_from = base
    if base.evolved:
        hf_dir = base.path.parent / BASE_HF
        if (hf_dir / "config.json").is_file():
            load_from = BaseModelRef(path=hf_dir, kind="hf", sha256=base.sha256,
                                     name=f"{base.name}/{BASE_HF}", evolved=base.evolved)
    current = adapter_store(settings).current()
    if current is not None:
        made_for = (current.manifest.get("base_model") or {}).get("sha256")
        if made_for == base.sha256 and (current.path / ADAPTER_DIR).is_dir():
            return Source(base, load_from, current.name, current.path / ADAPTER_DIR)
    return Source(base, load_from, None, None)


def load_merged(settings: Settings, source: Source) -> tuple[Any, Any]:
    """(model, tokenizer): the source base in float32 with its adapter merged in."""
    import torch

    from milton.train.lora import load_adapter

    model, tokenizer = load_base(source.load_from, settings.model.device, settings.model.threads,
                                 dtype=torch.float32)
    if source.adapter_dir is not None:
        model = load_adapter(model, source.adapter_dir).merge_and_unload()
    model.eval()
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, directory: Path, *, like: Path | None = None,
               dtype: Any = None) -> Path:
    """``save_pretrained`` of model and tokenizer as the converter needs them.

    The config gets ``architectures`` and loses a GGUF ``quantization_config``; a SentencePiece
    ``tokenizer.model`` beside the source (``like``) is copied, because llama.cpp's converter
    prefers it to ``tokenizer.json`` for Llama/Gemma vocabularies. ``like`` is a model
    directory (never a GGUF's folder, whose other files are unrelated).
    """
    from transformers.utils import logging as hf_logging

    from milton.models.hf import strip_quantizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    strip_quantizer(model)
    if dtype is not None:
        model = model.to(dtype)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    finally:
        hf_logging.enable_progress_bar()
    for name in TOKENIZER_FILES:
        if like is not None and (Path(like) / name).is_file():
            shutil.copyfile(Path(like) / name, directory / name)
    return directory
