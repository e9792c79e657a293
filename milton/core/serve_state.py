"""What the running ``milton serve`` says about itself, for ``status`` and ``doctor``.

Serve writes ``data/serve.json`` (atomically) when it starts, when its language model settles
(loaded, disabled, or degraded with the reason) and when it stops. Readers never talk to the
server: they read the file and check that its pid is alive, so a server killed with SIGKILL
shows as not running rather than as a stale "ok".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from milton.core.fsio import atomic_write_json

FILE = "serve.json"


def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / FILE


def write_serve_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = state_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**state, "pid": os.getpid()})


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_serve_state(data_dir: Path) -> dict[str, Any] | None:
    """The last state serve wrote, with ``running`` (its pid alive and not stopped), or None."""
    try:
        state = json.loads(state_path(data_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    state["running"] = state.get("status") != "stopped" and _alive(state.get("pid"))
    return state
