"""Start `milton serve` as a child process on loopback and wait until it answers.

Used by the tests, the benchmarks and anything else that needs a real server to talk to.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    base: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def live_server(home: Path, env_extra: dict[str, str] | None = None,
                timeout: float = 60.0) -> Iterator[ServerProcess]:
    """`python -m milton serve` with MILTON_HOME=home on a free loopback port; stopped after."""
    import httpx

    port = free_port()
    env = {**os.environ, "MILTON_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("MILTON_CONFIG", None)
    log = home / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "milton", "serve", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"milton serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield ServerProcess(base, proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
