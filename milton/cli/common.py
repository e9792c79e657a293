"""What every command module shares: the consoles, the loaded settings, common options, and
running a command as a job.

A command module (one per command group) imports what it needs from here and from the pillar
it wraps, defines its commands, and has a ``register(app)`` that :mod:`milton.cli` calls; no
command module imports :mod:`milton.cli` itself, and nothing outside the package imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from milton.core.config import LoadedSettings, Settings, load_settings
from milton.core.log import setup_logging

# Markup off: names, paths and memories from outside are printed as they are (milton.core.text).
out = Console(markup=False, highlight=False)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # one error, one line


class State:
    """The global options of this invocation (set by the root callback) and the settings they
    load, once."""

    config_path: Optional[Path] = None
    loaded: Optional[LoadedSettings] = None

    @classmethod
    def settings(cls) -> Settings:
        if cls.loaded is None:
            cls.loaded = load_settings(cls.config_path)
        return cls.loaded.settings


NowOpt = Annotated[
    Optional[str],
    typer.Option("--now", help="Pretend it is this time (ISO-8601, epoch, or e.g. -2h) to replay history."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def parse_now(value: Optional[str]) -> datetime:
    """``--now`` as a time (now when not given)."""
    from milton.core.timeutil import parse_timestamp

    return parse_timestamp(value)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@contextlib.contextmanager
def open_cli_store() -> Iterator[Any]:
    """The configured store for a command that reads or writes outside the job runner.

    Holds ``store.lock`` shared like every job, so a restore never swaps the file under it.
    """
    from milton.core.jobs import STORE_LOCK, job_lock
    from milton.core.store import open_store

    settings = State.settings()
    with job_lock(settings.locks_dir, STORE_LOCK, shared=True):
        db = open_store(settings.db_path, settings.store.busy_timeout_ms)
        try:
            yield db
        finally:
            db.close()


def run_as_job(name: str, fn: Any, now: Optional[str], *, json_output: bool = False) -> dict[str, Any]:
    """Run ``fn`` through the job runner (:func:`milton.core.jobs.run_job`); its metrics."""
    from milton.core.jobs import run_job

    settings = State.settings()
    # Jobs log to stdout (journald), unless stdout carries --json output.
    setup_logging(logging_level(), stream=sys.stderr if json_output else sys.stdout)
    result = run_job(name, fn, settings, now=parse_now(now))
    return {"status": result.status, "run_id": result.run_id, **result.metrics}


def logging_level() -> str:
    return logging.getLevelName(logging.getLogger("milton").level)
