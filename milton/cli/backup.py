"""``milton backup [list|verify]`` and ``milton restore``: thin wrappers over milton.ops.backup."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from milton.cli.common import State, err, out, print_json, run_as_job

backup_app = typer.Typer(
    help="With no sub-command: back up the store (a consistent copy, taken while jobs and "
         "serve keep writing), the current and pinned models and the config into one archive "
         "in backup.dir, then delete archives no backup.keep_* rule keeps (weekly job). "
         "The sub-commands list and verify archives; `milton restore` restores one.",
    invoke_without_command=True,
)



def _config_file():
    State.settings()
    return State.loaded.config_file if State.loaded else None


def _mb(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


class _Bar:
    """Progress callback for milton.ops.backup: one Rich bar per phase, on stderr."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if phase not in self.tasks:
            for task_id in self.tasks.values():
                self.bar.update(task_id, visible=False)
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=done, total=total)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Take the bar off the screen (for a prompt)."""
        self.bar.stop()
        try:
            yield
        finally:
            self.bar.start()


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A Rich progress bar on a terminal (stderr); None otherwise."""
    if not enabled or not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(),
                  DownloadColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        yield _Bar(bar)


@backup_app.callback(invoke_without_command=True)
def backup_cmd(
    ctx: typer.Context,
    label: Annotated[Optional[str], typer.Option("--label", help="Tag the archive name (lowercase letters, digits, '-').")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    now: Annotated[Optional[str], typer.Option("--now", help="Pretend it is this time (names the archive; retention uses it).")] = None,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from milton.ops.backup.archive import check_label
    from milton.ops.backup.create import create_backup
    check_label(label)
    config_file = _config_file()
    with _progress(not as_json) as progress:
        def job(jctx) -> dict[str, Any]:
            return create_backup(jctx.settings, now=jctx.now, label=label, db=jctx.db,
                                 config_file=config_file, progress=progress)

        metrics = run_as_job("backup", job, now, json_output=as_json)
    if as_json:
        print_json(metrics)
        return
    if metrics.get("status") != "ok":
        out.print(f"backup skipped: {metrics.get('reason')}", markup=False)
        return
    out.print(
        f"backup: {metrics['path']} ({_mb(metrics['size_bytes'])}; store {_mb(metrics['db_bytes'])}, "
        f"{metrics['rows_total']:,} rows, schema {metrics['schema_version']}; "
        f"{metrics['model_versions']} model versions; config {'yes' if metrics['config'] else 'none'}) "
        f"in {metrics['seconds']['total']:.1f} s", markup=False, highlight=False, soft_wrap=True)
    for name in metrics["pruned"]:
        out.print(f"pruned {name}", markup=False, highlight=False)
    for warning in metrics["warnings"]:
        err.print(f"milton: warning: {warning}", markup=False, highlight=False)


@backup_app.command("list")
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False) -> None:
    """Archives in backup.dir, oldest first (unfinished temp files are not shown)."""
    from milton.ops.backup.retention import list_backups
    settings = State.settings()
    infos = list_backups(settings)
    if as_json:
        print_json([i.as_dict() for i in infos])
        return
    if not infos:
        out.print(f"No backups in {settings.backup.dir} yet. Run `milton backup`.", markup=False)
        return
    # The name carries the creation time and the label: on a narrow terminal those columns go.
    wide = out.width >= 120
    cols = ["name"] + (["created"] if wide else []) + ["size", "schema", "rows"] \
        + (["label"] if wide else []) + ["verified"]
    table = Table(title=str(settings.backup.dir), box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col in cols:
        table.add_column(col, justify="right" if col in ("size", "rows", "schema") else "left",
                         no_wrap=col != "verified")  # "not re-verified since ..." may wrap
    for i in infos:
        d = i.as_dict()
        status = ("UNREADABLE" if i.error else "FAILED" if i.verified == "failed"
                  else f"not re-verified since {i.last_verified_ok.replace('T', ' ')}"
                  if i.last_verified_ok
                  else "unverified")
        cells = {"name": i.name, "created": d["created"], "size": _mb(i.size_bytes),
                 "schema": str(d["schema_version"] or "-"), "rows": f"{d['rows_total']:,}",
                 "label": i.label or "", "verified": status}
        table.add_row(*(cells[c] for c in cols))
    out.print(table)
    for i in infos:
        if i.error:
            err.print(f"milton: warning: {i.error}", markup=False, highlight=False)


@backup_app.command("verify")
def verify_cmd(
    archive: Annotated[str, typer.Argument(help="Archive path, a name from `milton backup list`, or 'latest'.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Re-hash every file against the manifest and integrity-check the database copy."""
    from milton.ops.backup.archive import verify_archive
    from milton.ops.backup.retention import resolve_archive
    settings = State.settings()
    path = resolve_archive(settings, archive)
    with _progress(not as_json) as progress:
        report = verify_archive(path, workdir=settings.backup.dir, progress=progress,
                                record=path.parent == settings.backup.dir)
    report.pop("manifest")
    if as_json:
        print_json({"ok": True, **report})
        return
    out.print(f"ok: {report['archive']}: {report['files']} files ({_mb(report['bytes'])}) match "
              f"the manifest; integrity_check ok; schema {report['schema_version']}, "
              f"{report['rows_total']:,} rows; made {report['created']} by milton "
              f"{report['milton_version']} ({report['seconds']:.1f} s)",
              markup=False, highlight=False, soft_wrap=True)


def restore_cmd(
    archive: Annotated[str, typer.Argument(help="Archive path, a name from `milton backup list`, or 'latest'.")],
    force: Annotated[bool, typer.Option("--force", help="Restore even while serve or a job uses the store (they keep the old one open: restart them).")] = False,
    with_config: Annotated[bool, typer.Option("--with-config", help="Also restore the archived config file over the active one.")] = False,
    no_pre_backup: Annotated[bool, typer.Option("--no-pre-backup", help="Skip the safety backup of the current state (e.g. when the store is damaged).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (required when stdin is not a terminal).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Replace the store and the current models with an archive's (verified first; a
    pre-restore backup of the current state is taken first)."""
    from milton.core.errors import InputError
    from milton.ops.backup.restore import restore_backup
    from milton.ops.backup.retention import resolve_archive
    settings = State.settings()
    if not yes and not sys.stdin.isatty():
        raise InputError("restore replaces the store and the current models: "
                         "pass --yes to confirm (stdin is not a terminal)")
    path = resolve_archive(settings, archive)

    def confirm(summary: dict[str, Any]) -> bool:
        if yes:
            return True
        models = ", ".join(f"{k} {v.get('current')}" for k, v in summary["artifacts"].items()) or "none"
        with progress.paused() if progress else contextlib.nullcontext():
            err.print(f"{summary['archive']}: made {summary['created']}, schema "
                      f"{summary['schema_version']}, {sum(summary['rows'].values()):,} rows; "
                      f"models: {models}", markup=False, highlight=False)
            return typer.confirm(f"Replace {summary['db']} and the current models with it"
                                 f"{' and the config file' if summary['with_config'] else ''}?",
                                 default=False, err=True)

    with _progress(not as_json) as progress:
        result = restore_backup(settings, path, force=force, with_config=with_config,
                                config_file=_config_file(), pre_backup=not no_pre_backup,
                                confirm=confirm, progress=progress)
    if as_json:
        print_json(result)
        return
    say = lambda text: out.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731 - a one-line alias
    for name in result["forced_past"]:
        err.print(f"milton: warning: --force: {name} still has the old store open; restart it",
                  markup=False, highlight=False)
    say(f"restored {result['db']} from {result['archive']} (made {result['created']}; "
        f"schema {result['schema_version']}, {result['rows_total']:,} rows)")
    for kind, info in result["artifacts"].items():
        extra = f"; versions restored: {', '.join(info['restored_versions'])}" if info["restored_versions"] else ""
        say(f"{kind}: current is {info['current'] or '(none)'}{extra}")
    for kind in result["models_not_in_archive"]:
        say(f"{kind}: not in the archive; left as it is")
    if result["config"]:
        say(f"config: restored {result['config']}")
    if result["pre_restore_backup"]:
        say(f"the previous state is in {result['pre_restore_backup']}")


def register(app: typer.Typer) -> None:
    """Add the commands (idempotent: the docs generator may register twice in one process)."""
    if getattr(backup_app, "_milton_registered", False):
        return
    app.add_typer(backup_app, name="backup")
    app.command("restore")(restore_cmd)
    backup_app._milton_registered = True  # type: ignore[attr-defined]
