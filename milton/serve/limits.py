"""Guards in front of the chat API: loopback-or-key binding, bearer auth, OpenAI-shaped errors,
body size limits, and the bounded queue in front of the single model context."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from milton.core.errors import ConfigError

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz"})
DRAIN_LIMIT = 64 << 20  # read (and drop) at most this much of an oversized body before answering


# -- binding -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(host: str, api_key: str) -> None:
    """Refuse to serve a non-loopback address without an API key (a one-line ConfigError)."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"serve.host: {host} is not a loopback address; set serve.api_key "
            "(MILTON_SERVE__API_KEY) to serve the network, or bind 127.0.0.1")


# -- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- auth --------------------------------------------------------------------------------------
class ApiKeyMiddleware:
    """Every HTTP request but those to ``OPEN_PATHS`` needs ``Authorization: Bearer <key>``.

    Pure ASGI (no response buffering), so streaming and disconnect detection are untouched.
    """

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._key or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided" if header else
                   "No API key provided: send 'Authorization: Bearer <serve.api_key>'")
        response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


# -- bodies ------------------------------------------------------------------------------------
async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body; 413 above ``max_bytes``, 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > max_bytes
    chunks: list[bytes] = []
    size = 0
    if not too_big:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                too_big = True
                break
            chunks.append(chunk)
    if too_big:
        # Read the rest (up to a bound) so the client gets the 413 rather than a reset connection.
        drained = size
        try:
            async for chunk in request.stream():
                drained += len(chunk)
                if drained > DRAIN_LIMIT:
                    break
        except Exception:  # noqa: BLE001 - already consumed or the client went away
            pass
        raise ApiError(413, f"request body is larger than serve.max_body_bytes ({max_bytes} bytes)",
                       param=None, code="request_too_large")
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8: {exc.reason} at byte {exc.start}",
                       code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, "
                       f"column {exc.colno})", code="invalid_json") from None


# -- the queue ---------------------------------------------------------------------------------
class QueueFull(Exception):
    pass


class EngineGate:
    """One generation at a time on the model context, at most ``max_queue`` requests waiting.

    Lives on the event loop: admit, acquire and release are called from it (worker threads hand
    their release back with ``loop.call_soon_threadsafe``).
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.admitted = 0  # generating + waiting (memory lookup included)
        self.active = 0
        self.rejected = 0
        self._lock = asyncio.Lock()

    @property
    def waiting(self) -> int:
        return self.admitted - self.active

    def admit(self) -> Ticket:
        if self.admitted >= self.max_queue + 1:
            self.rejected += 1
            raise QueueFull()
        self.admitted += 1
        return Ticket(self)


class Ticket:
    def __init__(self, gate: EngineGate) -> None:
        self.gate = gate
        self.holding = False
        self.done = False

    async def acquire(self) -> None:
        await self.gate._lock.acquire()
        self.holding = True
        self.gate.active += 1

    def release(self) -> None:
        """Idempotent: leave the model slot (if held) and the queue."""
        if self.holding:
            self.holding = False
            self.gate.active -= 1
            self.gate._lock.release()
        if not self.done:
            self.done = True
            self.gate.admitted -= 1
