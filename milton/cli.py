"""The ``milton`` command. Each command is a thin wrapper over an importable function."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from milton import __version__
from milton.core.config import LoadedSettings, Settings, load_settings
from milton.core.errors import EXIT_USAGE, InputError, MiltonError
from milton.core.log import setup_logging

app = typer.Typer(
    name="milton",
    help="A self-improving local AI toolkit: ingest, detect, learn, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
ingest_app = typer.Typer(help="Bring data into the store.", no_args_is_help=True)
models_app = typer.Typer(help="List, inspect and switch model versions.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

# Markup off: names, paths and memories from outside are printed as they are (milton.core.text).
out = Console(markup=False, highlight=False)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # one error, one line


class State:
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


def _now(value: Optional[str]):
    from milton.core.timeutil import parse_timestamp

    return parse_timestamp(value)


def _print_json(payload: Any) -> None:
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


def _job(name: str, fn, now: Optional[str], *, json_output: bool = False) -> dict[str, Any]:
    from milton.core.jobs import run_job

    settings = State.settings()
    # Jobs log to stdout (journald), unless stdout carries --json output.
    setup_logging(logging_level(), stream=sys.stderr if json_output else sys.stdout)
    result = run_job(name, fn, settings, now=_now(now))
    return {"status": result.status, "run_id": result.run_id, **result.metrics}


def logging_level() -> str:
    import logging

    return logging.getLevelName(logging.getLogger("milton").level)


# -- ingest -------------------------------------------------------------------------------
@ingest_app.command("processes")
def ingest_processes_cmd(
    from_file: Annotated[
        Optional[str],
        typer.Option("--from", help="JSONL or CSV snapshot file from another host's agent; - for stdin."),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Reject the whole file if any row is bad.")] = False,
    fmt: Annotated[Optional[str], typer.Option("--format", help="jsonl or csv (default: by extension/content).")] = None,
    now: NowOpt = None,
) -> None:
    """Snapshot this host's processes (or ingest a file), then apply retention."""
    from milton.ingest.jobs import ingest_processes_job

    if fmt not in (None, "jsonl", "csv"):
        raise InputError("--format: expected jsonl or csv")
    metrics = _job("ingest", ingest_processes_job(from_file, strict=strict, fmt=fmt), now)
    from milton.core.text import safe

    rejected = metrics.get("rejected_rows") or []
    for line, reason in rejected:
        err.print(safe(f"{metrics.get('source')}:{line}: {reason}"), markup=False, highlight=False)
    total = metrics.get("rejected", len(rejected))
    if total > len(rejected):
        err.print(f"... and {total - len(rejected)} more rejected rows")


# -- anomaly ------------------------------------------------------------------------------
@app.command("train-anomaly")
def train_anomaly_cmd(now: NowOpt = None) -> None:
    """Retrain the rare-process detector on the sliding window (hourly job)."""
    from milton.anomaly.train import train_anomaly

    _job("train-anomaly", train_anomaly, now)


@app.command("detect")
def detect_cmd(
    from_file: Annotated[Optional[str], typer.Option("--from", help="Score this JSONL/CSV file instead of the latest snapshot.")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="Show every process, not only flagged ones.")] = False,
    as_json: JsonOpt = False,
    now: NowOpt = None,
) -> None:
    """Score the latest snapshot (or a file) and print flagged processes with reasons."""
    from milton.anomaly.detect import detect

    result = detect(State.settings(), from_file=from_file, now=_now(now))
    shown = result["rows"] if all_rows else [r for r in result["rows"] if r["flagged"]]
    if as_json:
        _print_json({**result, "rows": shown})
        return
    table = Table(title=f"{result['flagged']} of {result['scored']} processes flagged "
                        f"(model {result['model_version']}, threshold {result['threshold']:.3f})")
    for col in ("host", "pid", "name", "user", "score", "reasons"):
        table.add_column(col, overflow="fold")
    from milton.core.text import literal

    for row in shown:
        table.add_row(literal(row["host"]), str(row["pid"]), literal(row["name"]),
                      literal(row["username"]), f"{row['score']:.3f}", literal("; ".join(row["reasons"])))
    out.print(table)


# -- serve --------------------------------------------------------------------------------
@app.command("serve")
def serve_cmd(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default from config: 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default from config: 8000).")] = None,
) -> None:
    """Run the long-lived server: scoring API, live snapshots, telemetry, hot reload."""
    from milton.serve.app import run_server

    setup_logging(logging_level(), stream=sys.stdout)
    run_server(State.settings(), host=host, port=port)


# -- doctor -------------------------------------------------------------------------------
@app.command("doctor")
def doctor_cmd(as_json: JsonOpt = False) -> None:
    """Check this machine: Python and libraries, the llama.cpp build (AMX off), a generation in
    a child process, the embedding model, model.base, converters, systemd, the store (read-only),
    disk and memory, GPU, serve. Exits 1 if any check failed."""
    from rich.text import Text

    from milton.doctor import FAILED, exit_code, run_checks

    settings = State.settings()
    if as_json:
        checks = run_checks(settings)
        _print_json({"ok": exit_code(checks) == 0, "checks": [c.as_dict() for c in checks]})
        raise typer.Exit(exit_code(checks))
    with err.status("checking ...") as spinner:
        checks = run_checks(settings, progress=lambda name: spinner.update(f"checking {name} ..."))
    table = Table(title="milton doctor", title_justify="left")
    for col in ("check", "", "detail", "fix"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "warning": "yellow", FAILED: "bold red"}
    for c in checks:
        table.add_row(c.name, Text(c.status, style=style[c.status]), Text(c.detail), Text(c.fix))
    out.print(table)
    failed = [c.name for c in checks if c.status == FAILED]
    out.print(Text(f"{len(failed)} failed: {', '.join(failed)}" if failed else
                   "No failures.", style="bold red" if failed else "green"))
    raise typer.Exit(exit_code(checks))


# -- models -------------------------------------------------------------------------------
def _artifacts(kind: str):
    from milton.core.artifacts import ArtifactStore

    settings = State.settings()
    keep = {"anomaly": settings.anomaly.keep_versions,
            "adapter": settings.train.keep_versions}.get(kind, settings.artifacts.keep)
    return ArtifactStore(settings.paths.checkpoints_dir, kind, keep=keep)


@models_app.command("list")
def models_list_cmd(
    kind: Annotated[Optional[str], typer.Argument(help="Only this kind (anomaly, adapter, ...).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every version of every model kind, newest last; * marks current."""
    from milton.core.artifacts import known_kinds

    settings = State.settings()
    kinds = [kind] if kind else known_kinds(settings.paths.checkpoints_dir)
    rows = []
    for k in kinds:
        store = _artifacts(k)
        current, pins = store.current_name(), store.pins()
        for v in store.versions():
            rows.append({"kind": k, "version": v.name, "created": v.created,
                         "current": v.name == current, "pinned": v.name in pins,
                         "metrics": v.metrics})
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("No model versions yet. Run `milton train-anomaly` after some `milton ingest processes`.")
        return
    table = Table()
    for col in ("kind", "version", "created", "", "key metrics"):
        table.add_column(col)
    for r in rows:
        mark = ("*" if r["current"] else "") + ("P" if r["pinned"] else "")
        m = r["metrics"]
        key = ", ".join(f"{k}={m[k]:.3f}" if isinstance(m[k], float) else f"{k}={m[k]}"
                        for k in ("records", "train_rows", "contamination", "decision", "eval_ppl",
                                  "regression_ppl", "rouge_l") if m.get(k) is not None)
        table.add_row(r["kind"], r["version"], r["created"], mark, key)
    out.print(table)


@models_app.command("show")
def models_show_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind, e.g. anomaly.")],
    version: Annotated[str, typer.Argument(help="Version, 'current' or 'latest'.")] = "current",
) -> None:
    """A version's manifest (files, checksums, metrics, data window, libraries)."""
    store = _artifacts(kind)
    v = store.get(version)
    _print_json({**v.manifest, "current": v.name == store.current_name(),
                 "pinned": v.name in store.pins()})


@models_app.command("rollback")
def models_rollback_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind, e.g. anomaly.")],
    to: Annotated[Optional[str], typer.Option("--to", help="Version to switch to (default: the previous one).")] = None,
    none: Annotated[bool, typer.Option(
        "--none", help="Use no version of this kind at all: the bare base for 'adapter', "
        "model.base for 'base' (serve follows within serve.reload_poll_s).")] = False,
) -> None:
    """Point `current` back at an earlier version (checksums verified first)."""
    if none:
        previous = _artifacts(kind).clear_current(reason="rollback")
        out.print(f"{kind}: no current version (was {previous or 'none'})")
        return
    v = _artifacts(kind).rollback(to)
    out.print(f"{kind}: current is now {v.name}")


@models_app.command("promote")
def models_promote_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind.")],
    version: Annotated[str, typer.Argument(help="Version to make current.")],
) -> None:
    """Make a specific version current (checksums verified first)."""
    v = _artifacts(kind).set_current(version, reason="promote")
    out.print(f"{kind}: current is now {v.name}")


@models_app.command("pin")
def models_pin_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind.")],
    version: Annotated[str, typer.Argument(help="Version to keep forever.")],
    unpin: Annotated[bool, typer.Option("--unpin", help="Remove the pin instead.")] = False,
) -> None:
    """Protect a version from retention (or --unpin it)."""
    _artifacts(kind).pin(version, pinned=not unpin)
    out.print(f"{kind}/{version}: {'unpinned' if unpin else 'pinned'}")


# -- config -------------------------------------------------------------------------------
@config_app.command("show")
def config_show_cmd(as_json: JsonOpt = False) -> None:
    """The effective settings and where each value came from."""
    State.settings()
    loaded = State.loaded
    assert loaded is not None
    flat: dict[str, Any] = {}
    for section, values in loaded.settings.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    if as_json:
        _print_json({"config_file": str(loaded.config_file) if loaded.config_file else None,
                     "settings": {k: {"value": v, "source": loaded.sources.get(k, "default")}
                                  for k, v in flat.items()}})
        return
    table = Table(title=f"config file: {loaded.config_file or '(none)'}")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for k, v in flat.items():
        table.add_row(k, json.dumps(v), loaded.sources.get(k, "default"))
    out.print(table)


def _register_optional() -> None:
    """Sub-commands living in their own modules register themselves here."""
    from milton.memory import cli as memory_cli
    from milton.ops.systemd_cli import systemd_app

    app.add_typer(systemd_app, name="systemd")
    memory_cli.register(app)
    __import__("milton.memory.sessions_cli", fromlist=["register"]).register(app, ingest_app)
    __import__("milton.ops.backup_cli", fromlist=["register"]).register(app)
    __import__("milton.ops.status_cli", fromlist=["register"]).register(app)
    __import__("milton.ops.notify_cli", fromlist=["register"]).register(app)
    __import__("milton.ops.schedule_cli", fromlist=["register"]).register(app)
    __import__("milton.train.cli", fromlist=["register"]).register(app)
    __import__("milton.evolve.cli", fromlist=["register"]).register(app)
    __import__("milton.serve.chat_cli", fromlist=["register"]).register(app)
    __import__("milton.anomaly.alerts_cli", fromlist=["register"]).register(app, State.settings)
    __import__("milton.ingest.agent_cli", fromlist=["register"]).register(app, State.settings)
    __import__("milton.ops.briefing_cli", fromlist=["register"]).register(app, State.settings)


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
        from milton.core.text import safe

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
