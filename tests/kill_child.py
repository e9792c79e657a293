"""The ``kill -9`` harness of the resume tests: run a script in a child Python, wait until it has
written what the test needs (a checkpoint), then SIGKILL it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def kill_9_when(script: str, spec: Path, ready: Callable[[], bool], *, what: str, cwd: Path,
                timeout: float = 120, settle: float = 0.0) -> None:
    """Run ``python -c script spec`` (the repo importable) in ``cwd``; once ``ready()`` holds
    (and ``settle`` seconds more), SIGKILL it. Fails the test if it exits first or ``ready()``
    does not hold within ``timeout`` seconds; the child never outlives the call."""
    child = subprocess.Popen([sys.executable, "-c", script, str(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=cwd,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if child.poll() is not None:
                pytest.fail(f"{what} exited early: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint within {timeout:g} s")
            time.sleep(0.02)
        time.sleep(settle)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
