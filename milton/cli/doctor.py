"""``milton doctor``: a thin wrapper over :mod:`milton.doctor`."""

from __future__ import annotations

import typer
from rich.table import Table

from milton.cli.common import JsonOpt, State, err, out, print_json


def doctor_cmd(as_json: JsonOpt = False) -> None:
    """Check this machine: Python and libraries, the llama.cpp build (AMX off), a generation in
    a child process, the embedding model, model.base, converters, systemd, the store (read-only),
    disk and memory, GPU, serve. Exits 1 if any check failed."""
    from rich.text import Text

    from milton.doctor import FAILED, exit_code, run_checks

    settings = State.settings()
    if as_json:
        checks = run_checks(settings)
        print_json({"ok": exit_code(checks) == 0, "checks": [c.as_dict() for c in checks]})
        raise typer.Exit(exit_code(checks))
    with err.status("checking ...") as spinner:
        checks = run_checks(settings, progress=lambda name: spinner.update(f"checking {name} ..."))
    table = Table(title="milton doctor", title_justify="left")
    fixes = any(c.fix for c in checks)  # no empty column on a healthy machine
    for col in ("check", "", "detail", "fix") if fixes else ("check", "", "detail"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "warning": "yellow", FAILED: "bold red"}
    for c in checks:
        cells = [c.name, Text(c.status, style=style[c.status]), Text(c.detail)]
        table.add_row(*cells, *([Text(c.fix)] if fixes else []))
    out.print(table)
    failed = [c.name for c in checks if c.status == FAILED]
    out.print(Text(f"{len(failed)} failed: {', '.join(failed)}" if failed else
                   "No failures.", style="bold red" if failed else "green"))
    raise typer.Exit(exit_code(checks))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_cmd)
