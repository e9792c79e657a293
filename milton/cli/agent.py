"""``milton agent``: a thin wrapper over :mod:`milton.ingest.agent`."""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

from milton.cli.common import State
from milton.core.errors import InputError


def parse_duration(value: str, field: str = "--every") -> float:
    """'300', '30s', '5m', '1h', '1.5h' -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value or "")
    if not match:
        raise InputError(f"{field}: expected a duration like 30s, 5m or 1h, got {value!r}")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if seconds <= 0:
        raise InputError(f"{field}: must be more than 0, got {value!r}")
    return seconds


def agent_cmd(
    push: Annotated[Optional[str], typer.Option(
        "--push", help="The hub's serve URL (default: agent.push_url), e.g. http://hub:8000.")] = None,
    every: Annotated[Optional[str], typer.Option(
        "--every", help="Keep running: a snapshot every DURATION (30s, 5m, 1h). Without it: "
        "one run (the agent timer's way).")] = None,
    runs: Annotated[Optional[int], typer.Option(
        "--runs", min=1, help="With --every: stop after this many runs.")] = None,
    now: Annotated[Optional[str], typer.Option(
        "--now", help="Pretend it is this time (ISO-8601, epoch, or e.g. -2h).")] = None,
) -> None:
    """Snapshot this host and push it to a hub's `milton serve` (POST /ingest/processes).

    Snapshots are spooled to data/agent/ first, so nothing is lost while the hub is down; the
    backlog is sent in order when it is back."""
    from milton.core.config import AgentConfig
    from milton.core.jobs import run_job
    from milton.core.log import setup_logging
    from milton.core.timeutil import parse_timestamp
    from milton.ingest.agent import agent_job

    settings = State.settings()
    interval = parse_duration(every) if every is not None else None
    if push is not None:
        try:
            push = AgentConfig(push_url=push).push_url
        except ValueError:
            raise InputError(f"--push: expected an http:// or https:// URL, got {push!r}") from None
    setup_logging(logging.getLevelName(logging.getLogger("milton").level), stream=sys.stdout)
    stop = threading.Event()
    if interval is not None:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    done = 0
    while True:
        when = parse_timestamp(now) if now is not None else None
        run_job("agent", agent_job(push), settings, now=when)
        done += 1
        if interval is None or (runs is not None and done >= runs) or stop.wait(interval):
            return


def register(app: typer.Typer) -> None:
    app.command("agent")(agent_cmd)
