"""A tiny ntfy stand-in: a real HTTP server on 127.0.0.1 that records what it is sent.

The outside notification server is the one thing the tests replace; everything on the
Milton side (config, urllib, the CLI, systemd's OnFailure command, the scheduler) is real.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def title(self) -> str:
        """The Title header, RFC 2047 encoded-words decoded as ntfy does."""
        return str(make_header(decode_header(self.headers.get("Title", ""))))

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class NtfyServer:
    host: str = "127.0.0.1"
    status: int = 200
    delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                owner.received.append(Received(self.path, dict(self.headers.items()), body))
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                payload = b'{"id":"x","event":"message"}' if owner.status < 400 else b'{"error":"nope"}'
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}"

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
