"""``milton serve``: a thin wrapper over :func:`milton.serve.app.run_server`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from milton.cli.common import State, logging_level
from milton.core.log import setup_logging


def serve_cmd(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default from config: 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default from config: 8000).")] = None,
) -> None:
    """Run the long-lived server: scoring API, live snapshots, telemetry, hot reload, and the
    dashboard at /ui."""
    from milton.serve.app import run_server
    from milton.web import dashboard

    setup_logging(logging_level(), stream=sys.stdout)
    run_server(State.settings(), host=host, port=port, extensions=[dashboard()])


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
