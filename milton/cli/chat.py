"""``milton chat``: a thin wrapper over :mod:`milton.serve.chat`."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Optional

import typer

from milton.cli.common import State
from milton.core.config import Settings
from milton.core.errors import MiltonError


@contextlib.contextmanager
def in_process_server(settings: Settings, timeout_s: float = 300.0) -> Iterator[str]:
    """`milton serve`'s app on a free loopback port in this process, for the length of a chat."""
    import uvicorn

    from milton.serve.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="in-process-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MiltonError("the in-process server did not start (see the log above)")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    llm = app.state.llm
    if not llm.settled.wait(timeout_s) or llm.error:
        server.should_exit = True
        thread.join(timeout=15)
        raise MiltonError(f"the language model did not load: {llm.error or 'timed out'}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def chat_cmd(
    url: Annotated[Optional[str], typer.Option(
        "--url", help="A running server (default: http://serve.host:serve.port).")] = None,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="Run the model in this process instead of talking to `milton serve`.")] = False,
    user: Annotated[Optional[str], typer.Option(
        "--user", help="Session key (default: a new one per chat).")] = None,
    no_memory: Annotated[bool, typer.Option(
        "--no-memory", help="Don't inject memories into the prompt.")] = False,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Longest reply.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0.0, help="Sampling temperature.")] = None,
) -> None:
    """Chat with the local assistant in the terminal (streaming; /remember, /forget, /good, /bad, /end)."""
    from milton.serve.chat import ChatSession, console_io, default_user, run_chat

    settings = State.settings()
    read, write, confirm = console_io()
    chat = ChatSession(url="", user=user or default_user(),
                       api_key=settings.serve.api_key.get_secret_value()
                       if hasattr(settings.serve, "api_key") else "",
                       memory=not no_memory, max_tokens=max_tokens, temperature=temperature)
    if in_process:
        with in_process_server(settings) as base:
            chat.url = base
            run_chat(settings, chat, read=read, write=write, confirm=confirm)
        return
    chat.url = (url or f"http://{settings.serve.host}:{settings.serve.port}").rstrip("/")
    run_chat(settings, chat, read=read, write=write, confirm=confirm)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_cmd)
