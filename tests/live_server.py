"""The /v1 API on a real uvicorn server in a thread, with a scripted engine: shared by the
API tests and the end-to-end serve tests."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from milton.core.config import load_settings
from milton.core.store import open_store
from milton.serve.api.openai import GracefulServer
from milton.serve.app import create_app
from milton.serve.engines.base import Chunk, EngineInfo, GenerationParams, Usage
from milton.serve.guard import uvicorn_config
from milton.serve.process import free_port

MODEL = "echo-test"


class EchoEngine:
    """A scripted engine (API-layer tests only). Replies ``echo: <last user message>`` word by
    word; ``count N`` replies with N numbers. Generations are serialised like one llama.cpp
    context; ``delay`` seconds per token; every call's messages and params are recorded, and
    whether it was cancelled."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[list[dict[str, str]], GenerationParams]] = []
        self.cancelled: list[int] = []  # indexes into calls
        self.finished: list[int] = []
        self.started = threading.Event()  # set when a generation produced its first token
        self.threads: list[int] = []  # native id of the thread each generation ran on
        self._lock = threading.Lock()

    def info(self) -> EngineInfo:
        return EngineInfo(model_id=MODEL, base_path="/nonexistent/echo.gguf")

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def chat(self, messages: list[dict[str, str]], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[Chunk]:
        with self._lock:
            self.threads.append(threading.get_native_id())
            index = len(self.calls)
            self.calls.append(([dict(m) for m in messages], params))
            prompt = sum(self.count_tokens(m["content"]) for m in messages)
            last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            match = re.fullmatch(r"count (\d+)", last.strip())
            words = [f"{i} " for i in range(int(match.group(1)))] if match else \
                re.findall(r"\S+\s*", f"echo: {last}")
            text = ""
            for n, word in enumerate(words):
                if cancel is not None and cancel.is_set():
                    self.cancelled.append(index)
                    yield Chunk("", "cancelled", Usage(prompt, n))
                    return
                if n >= params.max_tokens:
                    self.finished.append(index)
                    yield Chunk("", "length", Usage(prompt, n))
                    return
                for stop in params.stop:
                    if stop in text + word:
                        self.finished.append(index)
                        yield Chunk("", "stop", Usage(prompt, n))
                        return
                time.sleep(self.delay)
                text += word
                yield Chunk(word)
                self.started.set()
            self.finished.append(index)
            yield Chunk("", "stop", Usage(prompt, len(words)))


@dataclass
class Live:
    base: str
    app: Any
    server: GracefulServer
    engine: EchoEngine | None
    settings: Any

    @property
    def api(self):
        return self.app.state.openai

    def client(self, key: str = "none", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=30, **kw)

    def db(self):
        return open_store(self.settings.db_path)


@contextlib.contextmanager
def live(home: Path, engine: EchoEngine | None, *, extensions: tuple = (), **env: str) -> Iterator[Live]:
    """create_app + uvicorn on a free 127.0.0.1 port in a thread; stopped (gracefully) after.
    ``extensions``: more routes, as `milton serve` adds the dashboard (milton.web.dashboard())."""
    environ = {"MILTON_HOME": str(home), "MILTON_SERVE__SNAPSHOT_ENABLED": "false",
               **{f"MILTON_{k.upper()}": v for k, v in env.items()}}
    settings = load_settings(environ=environ).settings
    app = create_app(settings, engine=engine, extensions=extensions)
    port = free_port()
    config = uvicorn_config(app, settings, host="127.0.0.1", port=port)
    server = GracefulServer(config, app.state.openai)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, server, engine, settings)
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def wait_until(predicate, timeout: float = 15.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")
