"""`milton chat`: a terminal chat against `milton serve`, streaming, with memory commands.

It speaks the same OpenAI wire format as any other client (so it exercises what users'
tools use), keyed to one session through the ``user`` field. ``/remember``, ``/forget`` and
``/end`` act on this machine's store directly: Milton is local-first, and they work the same
whether the server is this process or a long-running one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from milton.core.config import Settings
from milton.core.errors import InputError, MiltonError

HELP = """Commands:
  /remember TEXT   store TEXT as a long-term memory
  /forget QUERY    delete the memory that best matches QUERY (asks first)
  /good, /bad      rate the last answer (bad ones are never trained on; a correction
                   like "no, it's X" in your next message works too)
  /end             end this session now (it is processed into memory) and start a new one
  /new             forget the conversation on screen (the session goes on)
  /help            this text
  /quit            leave (Ctrl-D works too)"""


@dataclass
class ChatSession:
    """The conversation on screen and the server it talks to."""

    url: str
    user: str
    api_key: str = ""
    memory: bool = True
    max_tokens: int | None = None
    temperature: float | None = None
    model: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    timeout_s: float = 600.0
    last_id: str | None = None  # the completion id of the last answer, for /good and /bad

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if not self.memory:
            headers["X-Milton-Memory"] = "off"
        return headers

    def resolve_model(self, client: httpx.Client) -> str:
        if self.model is None:
            data = _check(client.get(f"{self.url}/v1/models", headers=self._headers())).json()
            models = [m["id"] for m in data.get("data", [])]
            if not models:
                raise MiltonError(f"{self.url}: the server offers no model")
            self.model = models[0]
        return self.model

    def send(self, client: httpx.Client, text: str) -> Iterator[str]:
        """Stream the reply to ``text``; the exchange joins the history once complete."""
        messages = [*self.history, {"role": "user", "content": text}]
        body: dict[str, Any] = {"model": self.resolve_model(client), "messages": messages,
                                "stream": True, "user": self.user}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        reply: list[str] = []
        seen: dict[str, str] = {}
        self.last_id = None
        with client.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                           headers=self._headers(), timeout=self.timeout_s) as response:
            if response.status_code != 200:
                response.read()
                _check(response)
            for piece in _sse_deltas(response.iter_lines(), seen):
                reply.append(piece)
                yield piece
        self.history = [*messages, {"role": "assistant", "content": "".join(reply)}]
        self.last_id = seen.get("id")

    def rate(self, client: httpx.Client, rating: str) -> str:
        """Send ``rating`` (good/bad) for the last answer through ``POST /v1/feedback``."""
        if self.last_id is None:
            raise InputError(f"/{rating}: no answer to rate yet")
        headers = {k: v for k, v in self._headers().items() if k != "Accept"}
        _check(client.post(f"{self.url}/v1/feedback", json={"id": self.last_id, "rating": rating},
                           headers=headers, timeout=60))
        return self.last_id


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    raise MiltonError(f"server answered {response.status_code}: {message}")


def _sse_deltas(lines: Iterator[str], seen: dict[str, str] | None = None) -> Iterator[str]:
    """Content deltas from OpenAI ``chat.completion.chunk`` server-sent events; the completion's
    ``id`` goes into ``seen``."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            continue
        if "error" in chunk:
            raise MiltonError(f"server error mid-stream: {chunk['error'].get('message')}")
        if seen is not None and isinstance(chunk.get("id"), str):
            seen["id"] = chunk["id"]
        for choice in chunk.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content


def default_user() -> str:
    """One session key per chat window: readable, and unique across concurrent chats."""
    return f"chat-{os.environ.get('USER', 'me')}@{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


# -- local memory commands ---------------------------------------------------------------
def remember(settings: Settings, text: str) -> int:
    from milton.core.store import open_store
    from milton.core.timeutil import utcnow
    from milton.memory.embed import embedder_for
    from milton.memory.memories import NewMemory, add_memory

    if not text.strip():
        raise InputError("/remember: nothing to remember")
    db = open_store(settings.db_path, settings.store.busy_timeout_ms)
    try:
        memory_id = add_memory(db, embedder_for(settings.memory),
                               NewMemory(text.strip(), tier="long", category="fact", importance=0.8,
                                         source="chat"), utcnow())
    finally:
        db.close()
    if memory_id is None:
        raise InputError("/remember: already remembered")
    return memory_id


def forget(settings: Settings, query: str, confirm: Callable[[str], bool]) -> str | None:
    """Delete the best match for ``query`` if ``confirm(its text)``; its text, or None."""
    from milton.core.store import open_store
    from milton.core.timeutil import utcnow
    from milton.memory.embed import embedder_for
    from milton.memory.memories import delete_memories
    from milton.memory.search import search

    if not query.strip():
        raise InputError("/forget: say what to forget")
    db = open_store(settings.db_path, settings.store.busy_timeout_ms)
    try:
        hits = search(db, embedder_for(settings.memory), query, settings.memory, utcnow(), k=1)
        if not hits:
            return None
        best = hits[0].memory
        if not confirm(best.content):
            return None
        delete_memories(db, [best.id])
        return best.content
    finally:
        db.close()


def end_session(settings: Settings, user: str) -> int:
    """End the chat's open session now and process it (the same job as `milton sessions end`)."""
    from milton.core.jobs import run_job
    from milton.core.store import open_store
    from milton.memory.jobs import end_sessions_job

    db = open_store(settings.db_path, settings.store.busy_timeout_ms)
    try:
        rows = db.execute("select id from sessions where user = ? and status = 'open'", [user]).fetchall()
    finally:
        db.close()
    for (session_id,) in rows:
        run_job("sessions-end", end_sessions_job(session_id), settings)
    return len(rows)


def run_chat(settings: Settings, chat: ChatSession, *, read: Callable[[str], str],
             write: Callable[[str], None], confirm: Callable[[str], bool]) -> int:
    """The loop. Returns the number of exchanges; errors from the server end it with a message."""
    exchanges = 0
    with httpx.Client() as client:
        try:
            model = chat.resolve_model(client)
        except httpx.TransportError as exc:
            raise MiltonError(f"{chat.url}: cannot reach milton serve ({exc}); start it with "
                              "`milton serve` or use `milton chat --in-process`") from None
        write(f"milton chat with {model} at {chat.url} (session {chat.user}); /help for commands\n")
        while True:
            try:
                line = read("> ")
            except EOFError:
                write("\n")
                return exchanges
            text = line.strip()
            if not text:
                continue
            command, _, arg = text.partition(" ")
            try:
                if command in ("/quit", "/exit"):
                    return exchanges
                if command == "/help":
                    write(HELP + "\n")
                elif command == "/remember":
                    write(f"remembered (memory {remember(settings, arg)})\n")
                elif command == "/forget":
                    gone = forget(settings, arg, confirm)
                    write(f"forgot: {gone}\n" if gone else "nothing forgotten\n")
                elif command == "/end":
                    n = end_session(settings, chat.user)
                    chat.history, chat.user = [], default_user()
                    write(f"session ended ({n} processed); a new one starts with your next message\n")
                elif command in ("/good", "/bad"):
                    chat.rate(client, command[1:])
                    write("rated bad: it will not be learned from\n" if command == "/bad"
                          else "rated good: it may be learned from\n")
                elif command == "/new":
                    chat.history = []
                    write("conversation cleared\n")
                elif command.startswith("/"):
                    write(f"unknown command {command}; /help lists them\n")
                else:
                    for piece in chat.send(client, text):
                        write(piece)
                    write("\n")
                    exchanges += 1
            except InputError as exc:
                write(f"{exc}\n")
            except httpx.TransportError as exc:
                raise MiltonError(f"{chat.url}: connection lost: {exc}") from None


def console_io() -> tuple[Callable[[str], str], Callable[[str], None], Callable[[str], bool]]:
    """read/write/confirm on the terminal (plain stdin/stdout when piped)."""
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def read(prompt: str) -> str:
        if sys.stdin.isatty():
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def confirm(text: str) -> bool:
        write(f"forget: {text!r}? [y/N] ")
        try:
            return read("").strip().lower() in ("y", "yes")
        except EOFError:
            return False

    return read, write, confirm
