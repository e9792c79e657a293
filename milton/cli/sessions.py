"""``milton ingest conversations|documents`` and ``milton sessions ...``: thin wrappers."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from milton.cli.common import (
    JsonOpt,
    NowOpt,
    err,
    open_cli_store,
    out,
    print_json,
    run_as_job,
)
from milton.core.text import literal, safe


def _say(console: Any, text: str) -> None:
    """Literal text (no markup, control characters shown as escapes); newlines kept."""
    console.print(safe(text, keep_newlines=True), markup=False, highlight=False, soft_wrap=True)


def _report_rejected(metrics: dict[str, Any]) -> None:
    """Bad records as ``file:line: reason`` and skipped files as ``path: skipped: why``, on stderr."""
    for source, line, reason in metrics.get("rejected_rows") or []:
        _say(err, f"{source}:{line}: {reason}")
    more = metrics.get("rejected", 0) - len(metrics.get("rejected_rows") or [])
    if more > 0:
        _say(err, f"... and {more} more rejected records")
    for path, reason in metrics.get("skipped_files") or []:
        _say(err, f"{path}: skipped: {reason}")


def _ts(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M")


sessions_app = typer.Typer(help="Conversation sessions: list, show, export, end.", no_args_is_help=True)


def ingest_conversations_cmd(
    path: Annotated[str, typer.Argument(help="A .jsonl/.ndjson/.json file (OpenAI chat, ShareGPT or a "
                                             "Milton export), a directory of them, or - for stdin.")],
    strict: Annotated[bool, typer.Option("--strict", help="Reject a whole file if any record is bad.")] = False,
    now: NowOpt = None,
) -> None:
    """Import conversations as sessions and process them into short-term memory."""
    from milton.memory.conversations import RejectedInput
    from milton.memory.jobs import ingest_conversations_job
    try:
        metrics = run_as_job("ingest-conversations",
                           ingest_conversations_job(path, strict=strict, progress=sys.stderr.isatty()), now)
    except RejectedInput as exc:
        for source, line, reason in exc.rejected[:200]:
            _say(err, f"{source}:{line}: {reason}")
        if len(exc.rejected) > 200:
            _say(err, f"... and {len(exc.rejected) - 200} more rejected records")
        raise
    _report_rejected(metrics)


def ingest_documents_cmd(
    paths: Annotated[Optional[list[str]], typer.Argument(
        help="Text/Markdown files or directories (default: memory.documents).")] = None,
    now: NowOpt = None,
) -> None:
    """Chunk and embed documents into long-term memory; unchanged files are skipped."""
    from milton.memory.jobs import ingest_documents_job
    metrics = run_as_job("ingest-documents", ingest_documents_job(paths or None, progress=sys.stderr.isatty()),
                       now)
    _report_rejected(metrics)


@sessions_app.command("list")
def list_cmd(
    limit: Annotated[int, typer.Option("--limit", help="Most recent sessions shown.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Sessions, most recently active first."""
    from milton.memory.sessions import list_sessions

    with open_cli_store() as db:
        rows = list_sessions(db, limit)
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("No sessions yet. Import some with `milton ingest conversations PATH`.")
        return
    table = Table()
    for col in ("id", "user", "status", "started", "last activity", "messages", "topics"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(literal(r["id"]), literal(r["user"]), r["status"], _ts(r["started"]),
                      _ts(r["last_activity"]), str(r["messages"]), literal(", ".join(r["topics"])))
    out.print(table)


@sessions_app.command("show")
def show_cmd(
    session_id: Annotated[str, typer.Argument(help="Session id (see `milton sessions list`).")],
    as_json: JsonOpt = False,
) -> None:
    """A session and its messages."""
    from milton.core.errors import InputError
    from milton.memory.export import iter_export

    with open_cli_store() as db:
        records = list(iter_export(db, session_ids=[session_id]))
    if not records:
        raise InputError(f"session {session_id}: no such session")
    record = records[0]
    if as_json:
        print_json(record)
        return
    _say(out, f"session {safe(record['id'])}  user={safe(record['user'] or '-')}  "
                  f"status={record['status']}  source={safe(record['source'])}  "
                  f"started={record['started']}  ended={record['ended'] or '-'}")
    if record["topics"]:
        _say(out, "topics: " + ", ".join(record["topics"]))
    for message in record["messages"]:
        _say(out, f"\n[{message['ts']}] {message['role']}:\n{message['content']}")


@sessions_app.command("export")
def export_cmd(
    out_file: Annotated[str, typer.Option("--out", help="Output JSONL file, or - for stdout.")] = "-",
    since: Annotated[Optional[str], typer.Option("--since", help="Only sessions active since (ISO-8601, "
                                                                 "epoch, or e.g. -7d).")] = None,
) -> None:
    """Write sessions as Milton export JSONL (re-ingestible with `milton ingest conversations`)."""
    import os
    from pathlib import Path

    from milton.core.errors import InputError
    from milton.core.timeutil import parse_timestamp
    from milton.memory.export import export_sessions

    cutoff = None if since is None else parse_timestamp(since, field="--since")
    with open_cli_store() as db:
        if out_file == "-":
            count = export_sessions(db, sys.stdout, since=cutoff)
            sys.stdout.flush()
            return
        target = Path(out_file)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                count = export_sessions(db, handle, since=cutoff)
            os.replace(tmp, target)  # a failed export never leaves half a file behind
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise InputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    _say(err, f"exported {count} session(s) to {target}")


@sessions_app.command("end")
def end_cmd(
    session_id: Annotated[Optional[str], typer.Argument(help="Session id (default: every open session).")] = None,
    now: NowOpt = None,
) -> None:
    """End a session now and process it into memory."""
    from milton.memory.jobs import end_sessions_job

    run_as_job("sessions-end", end_sessions_job(session_id), now)


@sessions_app.command("end-idle")
def end_idle_cmd(
    now: NowOpt = None,
) -> None:
    """End sessions idle past memory.session_idle_minutes and process every ended session."""
    from milton.memory.jobs import end_idle_sessions_job

    run_as_job("sessions-end-idle", end_idle_sessions_job, now)


def register(app: typer.Typer, ingest_app: typer.Typer) -> None:
    """Add the commands (idempotent: the docs generator may register twice in one process)."""
    if getattr(ingest_app, "_milton_sessions", False):
        return
    ingest_app.command("conversations")(ingest_conversations_cmd)
    ingest_app.command("documents")(ingest_documents_cmd)
    app.add_typer(sessions_app, name="sessions")
    ingest_app._milton_sessions = True  # type: ignore[attr-defined]
