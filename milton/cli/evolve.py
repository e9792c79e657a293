"""``milton evolve`` and ``milton evolve report``: thin wrappers over :mod:`milton.evolve.jobs`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from milton.cli.common import State, open_cli_store, out, print_json, run_as_job

evolve_app = typer.Typer(
    help="Merge, trim the vocabulary, distil, prune and quantize the serving model into a smaller, "
    "faster GGUF; promote it only if it keeps the quality (monthly job).",
    invoke_without_command=True, no_args_is_help=False,
)


@evolve_app.callback()
def evolve_cmd(
    ctx: typer.Context,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=1, help="Cap distillation at this many optimizer steps (default: evolve.distil_steps).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
    now: Annotated[Optional[str], typer.Option(
        "--now", help="Pretend it is this time (ISO-8601, epoch, or e.g. -2h).")] = None,
) -> None:
    """Run the evolve pipeline (a killed run resumes where it stopped)."""
    if ctx.invoked_subcommand is not None:
        return
    from milton.evolve.jobs import evolve_job

    result = run_as_job("evolve", evolve_job(max_steps=max_steps), now, json_output=as_json)
    if as_json:
        print_json(result)
    elif result.get("status") == "ok":
        out.print(f"evolved base {result['version'] or '(none)'}: {result['status_detail']} "
                  f"({result['reason']})\n"
                  f"report: milton evolve report {result['run_id']}  (plot: {result['report']})",
                  markup=False, highlight=False)
    else:
        out.print(f"evolve: {result['status']}: {result.get('reason', '')}", markup=False,
                  highlight=False)


@evolve_app.command("report")
def report_cmd(
    run: Annotated[Optional[int], typer.Argument(help="Evolve run id (default: the newest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """A table of every stage (quality, size, speed) and a PNG plot of quality against size."""
    from milton.evolve.report import load_report, render_table, write_plot
    from milton.evolve.runs import REPORT_PNG

    with open_cli_store() as db:
        report = load_report(State.settings(), db, run)
    plot = write_plot(report, Path(report["dir"]) / REPORT_PNG)
    report["plot"] = str(plot) if plot else None
    if as_json:
        print_json(report)
        return
    out.print(render_table(report))
    verdict = "promoted" if report.get("promoted") else "not promoted"
    out.print(f"{verdict}: {report.get('reason') or report.get('stage') or ''}", markup=False,
              highlight=False)
    if plot:
        out.print(f"plot: {plot}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(evolve_app, name="evolve")
