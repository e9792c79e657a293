"""Who may use the dashboard, and proof that a form came from it.

Without ``serve.api_key`` serve binds loopback only (:func:`milton.serve.api.auth.check_bind`)
and the dashboard needs no login. With a key, a login form exchanges it for a session cookie
(HttpOnly, SameSite=Strict, HMAC-signed with a key derived from the API key, so a changed key
ends every session). A request that carries ``Authorization: Bearer <key>`` is let in too
(scripts, the benchmark). Every state-changing request must carry the CSRF token of its
session (an HMAC of the session's nonce); loopback without a key included, since any web page
the user visits could otherwise post to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "milton_ui"
SESSION_HOURS = 12


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int
    authenticated: bool


class Sessions:
    """Issues and checks signed session cookies and their CSRF tokens."""

    def __init__(self, api_key: str) -> None:
        self.login_required = bool(api_key)
        self._key = api_key.encode("utf-8")
        # A key derived from the API key (sessions survive a restart, die with a new key), or
        # a per-process random one when there is no key to derive from.
        self._secret = (hmac.new(self._key, b"milton-ui-session-v1", hashlib.sha256).digest()
                        if api_key else secrets.token_bytes(32))

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def issue(self, *, authenticated: bool, now: float | None = None) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(secrets.token_urlsafe(18), int((now or time.time()) + SESSION_HOURS * 3600),
                          authenticated)
        payload = f"{session.nonce}.{session.expires}.{int(authenticated)}"
        return session, f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session a cookie stands for, or None (missing, forged, tampered or expired)."""
        if not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        nonce, expires, authed, signature = parts
        if not hmac.compare_digest(signature, self._sign(f"{nonce}.{expires}.{authed}")):
            return None
        try:
            expiry = int(expires)
        except ValueError:
            return None
        if expiry < (now or time.time()):
            return None
        return Session(nonce, expiry, authed == "1")

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.nonce}")

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        return bool(session and token) and hmac.compare_digest(
            self.csrf_token(session), token or "")  # type: ignore[arg-type]

    def key_ok(self, key: str | None) -> bool:
        return bool(self._key) and hmac.compare_digest((key or "").encode("utf-8"), self._key)

    def bearer_ok(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.key_ok(token.strip())
