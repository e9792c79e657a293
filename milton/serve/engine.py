"""What the OpenAI-compatible API needs from a language-model backend, and nothing more.

The llama.cpp backend (:mod:`milton.serve.llm`) implements it; the API layer
(:mod:`milton.serve.openai_api`) only talks to this interface, so a transformers + PEFT
backend for GPU users can slot in beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    """A piece of generated text. The last chunk of a generation has ``finish_reason``
    ('stop', 'length' or 'cancelled') and the final ``usage``."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class EngineInfo:
    """For /v1/models, /ml/telemetry and /healthz."""

    model_id: str
    base_path: str
    base_sha256: str | None = None
    adapter_version: str | None = None
    adapter_promoted_at: str | None = None
    swaps: int = 0
    last_swap_ms: float | None = None
    swap_failures: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ChatEngine(Protocol):
    """One model context: generations are serialised by the engine itself.

    ``chat`` blocks the calling (worker) thread. A generation runs entirely on the adapter
    that was active when it started; an adapter or base swap waits for it to finish and
    applies to the next one. Setting ``cancel`` stops a generation at the next token
    (finish_reason 'cancelled').
    """

    def info(self) -> EngineInfo: ...

    def count_tokens(self, text: str) -> int: ...

    def chat(self, messages: list[dict[str, str]], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[Chunk]: ...

    def close(self) -> None: ...
