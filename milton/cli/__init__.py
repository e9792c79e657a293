"""The ``milton`` command. Each command is a thin wrapper over an importable function.

The root :data:`app` holds the global options (``--config``, ``--log-level``, ``--version``);
every command group lives in a module of its own here (``ingest``, ``anomaly``, ``serve``,
``doctor``, ``models``, ``config``, ``systemd``, ``memory``, ``sessions``, ``backup``,
``status``, ``notify``, ``schedule``, ``train``, ``evolve``, ``chat``, ``alerts``, ``agent``,
``briefing``), built on :mod:`milton.cli.common`, and is attached by :func:`_register_optional` in help order.
:mod:`milton.cli.docs` renders the CLI reference from the result. The CLI sits on top of the
layers: it may import anything, and nothing imports it (``milton.__main__`` and the
``milton`` console script call :func:`main`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from milton import __version__
from milton.cli import (
    agent,
    alerts,
    anomaly,
    backup,
    briefing,
    chat,
    config,
    doctor,
    evolve,
    ingest,
    memory,
    models,
    notify,
    schedule,
    serve,
    sessions,
    status,
    systemd,
    train,
)
from milton.cli.common import State, err, out
from milton.core.errors import EXIT_USAGE, MiltonError
from milton.core.log import setup_logging
from milton.core.text import safe

__all__ = ["State", "app", "command", "main"]

app = typer.Typer(
    name="milton",
    help="A self-improving local AI toolkit: ingest, detect, learn, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_registered = False


def _version(value: bool) -> None:
    if value:
        out.print(f"milton {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="Config file (default: $MILTON_CONFIG or ./config.toml).",
                     envvar="MILTON_CONFIG", dir_okay=False),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    State.config_path = config
    State.loaded = None
    setup_logging(log_level.upper(), stream=sys.stderr)


def _register_optional() -> None:
    """Attach every command group to :data:`app`, once, in the order ``--help`` lists them
    (commands first, then groups, each in registration order)."""
    global _registered
    if _registered:
        return
    _registered = True
    ingest.register(app)
    models.register(app)
    config.register(app)
    anomaly.register(app)
    serve.register(app)
    doctor.register(app)
    systemd.register(app)
    memory.register(app)
    sessions.register(app, ingest.ingest_app)
    backup.register(app)
    status.register(app)
    notify.register(app)
    schedule.register(app)
    train.register(app)
    evolve.register(app)
    chat.register(app)
    alerts.register(app)
    agent.register(app)
    briefing.register(app)


def command() -> Any:
    """The whole command tree as a click command (for the generated CLI reference)."""
    import typer.main

    _register_optional()
    return typer.main.get_command(app)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, UsageError) classes: newer typer vendors click as ``typer._click``,
    whose exceptions are not subclasses of the standalone ``click`` package's."""
    click_errors: list[type] = []
    usage_errors: list[type] = []
    for module_name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = __import__(module_name, fromlist=["ClickException"])
        except ImportError:
            continue
        click_errors.append(module.ClickException)
        usage_errors.append(module.UsageError)
    return tuple(click_errors), tuple(usage_errors)


def main() -> None:
    """Console entry point: one-line errors, documented exit codes."""
    _register_optional()
    try:
        # Without standalone mode click returns a typer.Exit's code instead of raising it.
        code = app(standalone_mode=False)
    except MiltonError as exc:
        err.print(safe(f"milton: error: {exc}"), markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("milton: aborted")
        sys.exit(1)
    except Exception as exc:  # click usage errors and anything unexpected
        click_errors, usage_errors = _click_exception_types()
        if isinstance(exc, click_errors):
            exc.show()
            sys.exit(EXIT_USAGE if isinstance(exc, usage_errors) else exc.exit_code)
        raise
    sys.exit(code if type(code) is int else 0)  # only an Exit code, never a stray return value
