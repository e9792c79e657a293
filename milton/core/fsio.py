"""Durable file writes: fsync helpers and atomic replacement, the one place Milton does them.

A file written with :func:`atomic_write_bytes` is built in a temporary sibling, fsynced, renamed
over the target and the directory fsynced, so a reader (or a crash at any moment) sees the old
file or the new one, whole. The ``fsync_*`` helpers are for callers that build a whole directory
and rename it into place (artifact versions, training checkpoints, backups, restores).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or unlink in it is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file written earlier (and closed) by someone else."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(path: Path) -> None:
    """fsync every file directly in ``path``, then ``path`` itself."""
    for file in path.iterdir():
        if file.is_file():
            fsync_file(file)
    fsync_dir(path)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """temp file + fsync + rename + fsync(dir): readers see the old or the new file, whole.
    ``mode``: the new file's permissions (e.g. the replaced file's, for a config with a token)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
