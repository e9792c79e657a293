"""Which backend serves ``model.base``: llama.cpp for a GGUF, transformers for a Hugging Face
directory (``serve.backend`` auto), or the one configured."""

from __future__ import annotations

from milton.core.config import Settings
from milton.core.errors import ConfigError
from milton.models.refs import BaseModelRef, resolve_base


def serve_backend(settings: Settings, ref: BaseModelRef) -> str:
    """'llama' or 'transformers': ``serve.backend``, where auto means llama for a GGUF base and
    transformers for a Hugging Face directory."""
    backend = settings.serve.backend
    if backend == "auto":
        return "transformers" if ref.kind == "hf" else "llama"
    return backend


def resolve_serve_base(settings: Settings, backend: str | None = None) -> BaseModelRef:
    """``model.base`` as a :class:`~milton.models.refs.BaseModelRef` (sha256 included) for
    ``backend`` (default: :func:`serve_backend`).

    Empty = the packaged Gemma 3 270M (assembled into ``data/models`` where the home cache is
    read-only). A Hugging Face directory for the llama backend is a one-line ConfigError:
    llama.cpp needs a GGUF. The transformers backend takes either (a GGUF is dequantised, as
    train-lora does).
    """
    ref = resolve_base(settings)
    if ref.kind != "gguf" and (backend or serve_backend(settings, ref)) == "llama":
        raise ConfigError(f"model.base: serve needs a GGUF file for serve.backend llama, and "
                          f"{ref.path} is a Hugging Face model directory; set serve.backend to "
                          "transformers (or auto), or convert it (llama.cpp's convert_hf_to_gguf.py) "
                          "and point model.base at the .gguf")
    return ref
