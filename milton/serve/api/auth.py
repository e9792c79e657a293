"""Who may talk to serve: a non-loopback bind needs an API key, and with a key every request
but /healthz needs ``Authorization: Bearer <serve.api_key>``."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from milton.core.errors import ConfigError
from milton.serve.api.errors import error_body

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz"})


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


class ApiKeyMiddleware:
    """Every HTTP request but those to ``OPEN_PATHS`` needs ``Authorization: Bearer <key>``.

    Pure ASGI (no response buffering), so streaming and disconnect detection are untouched.
    """

    def __init__(self, app: ASGIApp, key: str, own_auth: tuple[str, ...] = ()) -> None:
        self.app = app
        self._key = key.encode("utf-8")
        # Path prefixes whose routes check the key themselves (the dashboard's login session).
        self._own_auth = tuple(p.rstrip("/") for p in own_auth)
        self._own_auth_dirs = tuple(p + "/" for p in self._own_auth)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._key or scope["path"] in OPEN_PATHS or (
                scope["path"] in self._own_auth or scope["path"].startswith(self._own_auth_dirs)):
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
