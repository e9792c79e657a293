"""One chat request on its way through the /v1 API: what the queue, the engine, the memory
block and the session log each add to it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from milton.serve.api.schema import ChatRequest


@dataclass
class ChatJob:
    """One chat request on its way through the queue, the engine and the session log."""

    rid: str
    created: int
    model: str
    req: ChatRequest
    key: str | None
    memory: bool
    t0: float  # perf_counter at arrival (as gen_start, first_token, gen_end)
    deadline: float  # monotonic
    cancel: threading.Event = field(default_factory=threading.Event)
    session_id: str | None = None
    memory_items: int = 0
    memory_s: float | None = None  # time spent building the memory block (None = not built)
    lookup: asyncio.Future | None = None  # the session lookup, when it runs beside the generation
    gen_start: float | None = None
    first_token: float | None = None
    gen_end: float | None = None
    streaming: bool = False  # the SSE generator has started (it then owns the clean-up)
