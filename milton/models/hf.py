"""Loading a base model with transformers: device and dtype, offline, GGUF dequantised.

A GGUF is loaded through transformers' GGUF support and dequantised, so LoRA trains (and the
transformers backend serves) exactly the weights llama.cpp serves. Nothing is ever fetched from
a hub (``HF_HUB_OFFLINE`` and ``local_files_only``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from milton.core.errors import ConfigError
from milton.core.fsio import atomic_write_json
from milton.models.refs import BaseModelRef


def offline() -> None:
    """Before transformers/huggingface_hub are imported: never reach for a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def select_device(device: str = "auto", threads: int = 0) -> tuple[Any, Any]:
    """(torch.device, dtype): CUDA with bf16 when present and allowed, else CPU with fp32.

    On the CPU this also sets torch's thread count (``threads`` or every usable core).
    """
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"model.device: expected auto, cpu or cuda (got {device!r})")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    if device == "cuda":
        raise ConfigError("model.device: 'cuda' but no CUDA device is available")
    torch.set_num_threads(threads or usable_cpus())
    return torch.device("cpu"), torch.float32


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Share one ``gguf.GGUFReader`` per file while loading, and keep the load quiet.

    transformers parses the GGUF metadata separately for the tokenizer's config, the
    tokenizer, the model's config and the weights; for a 262k-token vocabulary each parse
    takes ~10 s on a slow CPU. Readers are read-only (a memmap), so sharing one is safe. If a
    transformers version stops importing ``GGUFReader`` from ``gguf``, this is simply a no-op.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared  # type: ignore[assignment,misc]
    # Its dequantising loop draws a tqdm bar straight to stderr, which would litter JSON logs.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda iterable=None, *a, **k: iterable  # type: ignore[union-attr]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]
        if bar is not None:
            gguf_utils.tqdm = bar  # type: ignore[union-attr]
        readers.clear()


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (a loader's error, for a one-line message)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_base(ref: BaseModelRef, device: str = "auto", threads: int = 0,
              dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a resolved base, in eval mode, on the selected device.

    A GGUF is dequantised into plain ``nn.Linear`` weights (no quantizer left attached), so
    PEFT sees an ordinary model. The tokenizer always has a pad token.
    """
    offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_device, auto_dtype = select_device(device, threads)
    dtype = dtype or auto_dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "Converting and de-quantizing..." bars and warnings
    hf_logging.disable_progress_bar()
    try:
        if ref.kind == "gguf":
            kwargs: dict[str, Any] = {"gguf_file": ref.path.name, "local_files_only": True}
            with _one_gguf_parse():
                tokenizer = AutoTokenizer.from_pretrained(ref.path.parent, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(
                    ref.path.parent, dtype=dtype, quantization_config=_dequantize_config(),
                    **kwargs)
            strip_quantizer(model)
        else:
            tokenizer = AutoTokenizer.from_pretrained(ref.path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype,
                                                         local_files_only=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a config problem to the user
        raise ConfigError(f"model.base: cannot load {ref.path}: {error_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(torch_device)
    model.eval()
    return model, tokenizer


def _dequantize_config() -> Any:
    """Ask transformers to unpack every GGUF block into dense weights (never keep them packed)."""
    try:
        from transformers import GgufConfig

        return GgufConfig(dequantize=True)
    except ImportError:  # older transformers: GGUF loading always dequantises
        return None


def strip_quantizer(model: Any) -> None:
    """A dequantised GGUF model is a plain model: drop the quantizer marks PEFT would see."""
    for attr in ("hf_quantizer",):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]


def is_dequantised(model: Any) -> bool:
    """True when every weight is a plain floating-point tensor (no packed GGUF blocks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (all(p.dtype.is_floating_point for p in base.parameters())
            and not any("gguf" in type(m).__name__.lower() for m in base.modules())
            and getattr(base, "hf_quantizer", None) is None)


def base_config_dict(model: Any) -> dict[str, Any]:
    """The HF config of a loaded base as llama.cpp's converters need it.

    A config saved from a GGUF-loaded model has no ``architectures`` and carries a
    ``quantization_config`` (``quant_method: gguf``); both break ``convert_lora_to_gguf.py``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    if not data.get("architectures"):
        data["architectures"] = [type(base).__name__]
    return data


def save_base_config(ref: BaseModelRef, model: Any, directory: Path) -> Path:
    """Write the base's ``config.json`` (see :func:`base_config_dict`) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = base_config_dict(model)
    target = directory / "config.json"
    atomic_write_json(target, data)
    return target
