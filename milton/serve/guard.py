"""Serve against hostile clients, before any route or auth runs.

- :class:`BodyLimitMiddleware`: every request body is limited while it streams in (a declared
  ``Content-Length`` over the limit is refused before a byte of the body is read), so no
  endpoint ever buffers or parses more than its limit; a body that stalls gets 408.
- :class:`ConnectionGuard` (mixed into uvicorn's HTTP protocol by :func:`uvicorn_config`):
  a connection must send its request headers within ``serve.header_timeout_s`` of opening (or
  of its last response) and within ``serve.max_header_bytes``; past ``serve.max_connections``
  open connections (kept below the open-file limit) the longest-idle one is closed, so idle or
  slow clients can never take the file descriptors ``/healthz`` and real clients need.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from fastapi.responses import JSONResponse

from milton.core.config import ServeConfig, Settings
from milton.serve.api.errors import ApiError

#: Open files serve keeps for itself (store, logs, models, event loop) below RLIMIT_NOFILE.
FD_RESERVE = 64

_REJECT_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
               b"connection: close\r\ncontent-length: 32\r\n\r\nrequest headers are too large\r\n\r\n")


def body_limit(serve: ServeConfig, path: str) -> tuple[int, str]:
    """The largest body a request to ``path`` may send, and the setting that says so."""
    if path == "/ingest/processes":
        return serve.max_push_bytes, "serve.max_push_bytes"
    if path == "/anomaly/score":
        return serve.max_score_bytes, "serve.max_score_bytes"
    return serve.max_body_bytes, "serve.max_body_bytes"


class BodyRejected(ApiError):
    """Raised from ``receive`` when a body passes its limit or stalls; an ApiError, so the
    endpoints' own error handling stays quiet about it (the middleware answers)."""


class BodyLimitMiddleware:
    """Pure ASGI: counts the body bytes coming from ``receive`` and answers 413 the moment
    the route's limit is passed (408 when the body stops arriving), whatever the endpoint
    does with its body. What the app tries to send after that is dropped."""

    def __init__(self, app: Any, serve: ServeConfig) -> None:
        self.app = app
        self.serve = serve

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = body_limit(self.serve, scope["path"])
        too_large = BodyRejected(413, f"request body is larger than {setting} ({limit} bytes)",
                                 code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.strip().isdigit() and int(value) > limit:
                await too_large.response()(scope, receive, send)
                return
        stall = self.serve.body_timeout_s
        size = 0
        body_done = False
        failed: BodyRejected | None = None
        started = False

        async def limited_receive() -> Any:
            nonlocal size, body_done, failed
            if failed is not None:
                raise failed
            if body_done:  # only disconnect detection waits here (streaming): no timeout
                return await receive()
            try:
                async with asyncio.timeout(stall):
                    message = await receive()
            except TimeoutError:
                failed = BodyRejected(408, f"request body stalled for more than serve.body_timeout_s "
                                      f"({stall:g} s)", code="request_timeout")
                raise failed from None
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if size > limit:
                    failed = too_large
                    raise failed
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if failed is not None:
                return  # the app answering our error its own way: ours goes out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if failed is None:
                raise
        if failed is not None and not started:
            headers = {"Connection": "close"} if failed.status == 408 else None
            await JSONResponse(failed.body(), status_code=failed.status, headers=headers)(scope, receive, send)


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to leave :data:`FD_RESERVE` of the open-file limit free."""
    try:
        import resource
    except ImportError:  # not POSIX
        return max_connections
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(8, min(max_connections, soft - FD_RESERVE))


class ConnectionGuard:
    """Mixed in front of uvicorn's HTTP protocol (httptools or h11): a header-read deadline
    (uvicorn has none: its keep-alive timer stops at the first byte, and a new connection
    has no timer at all), a header size bound, and a bound on open connections."""

    header_timeout_s: ClassVar[float] = 10.0
    max_header_bytes: ClassVar[int] = 65536
    max_connections: ClassVar[int] = 512

    transport: Any
    connections: set[Any]
    loop: asyncio.AbstractEventLoop
    _cycle: Any = None
    _idle_since: float | None = None  # set while waiting for a request's headers
    _header_bytes = 0
    _header_timer: asyncio.TimerHandle | None = None
    _request_done = True  # the last request's body has all arrived (httptools tells; h11 bounds itself)

    # uvicorn sets ``self.cycle`` when a request's headers are complete (both parsers).
    @property
    def cycle(self) -> Any:
        return self._cycle

    @cycle.setter
    def cycle(self, value: Any) -> None:
        self._cycle = value
        if value is not None:
            self._request_done = False
            self._headers_done()

    def _await_headers(self) -> None:
        self._headers_done()
        self._idle_since = self.loop.time()
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _headers_done(self) -> None:
        self._idle_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._idle_since is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._await_headers()
        if len(self.connections) > connection_cap(self.max_connections):
            idle = [c for c in self.connections if getattr(c, "_idle_since", None) is not None]
            victim = min(idle, key=lambda c: c._idle_since) if idle else self
            victim.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_message_complete(self) -> None:  # httptools only
        super().on_message_complete()  # type: ignore[misc]
        self._request_done = True

    def data_received(self, data: bytes) -> None:
        # Not the rest of a body answered early (a 413 before it was read): uvicorn drops that.
        if self._idle_since is not None and self._request_done:
            self._header_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self._idle_since is not None and self._header_bytes > self.max_header_bytes \
                and not self.transport.is_closing():
            self._headers_done()
            self.transport.write(_REJECT_431)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and (self._cycle is None or self._cycle.response_complete):
            self._await_headers()


def guarded_protocol(serve: ServeConfig) -> type:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with
    :class:`ConnectionGuard` and serve's limits."""
    base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        base = HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol
        base = H11Protocol
    return type(f"Guarded{base.__name__}", (ConnectionGuard, base), {
        "header_timeout_s": serve.header_timeout_s, "max_header_bytes": serve.max_header_bytes,
        "max_connections": serve.max_connections})


def uvicorn_config(app: Any, settings: Settings, *, host: str | None = None,
                   port: int | None = None) -> Any:
    """The uvicorn configuration serve runs with (``milton serve`` and the tests alike)."""
    import uvicorn

    serve = settings.serve
    return uvicorn.Config(
        app, host=host or serve.host, port=serve.port if port is None else port,
        log_config=None, access_log=False, timeout_graceful_shutdown=serve.shutdown_grace_s,
        http=guarded_protocol(serve), timeout_keep_alive=serve.keep_alive_s,
        limit_concurrency=max(serve.limit_concurrency, serve.max_connections + 1),
        h11_max_incomplete_event_size=serve.max_header_bytes)
