"""`milton systemd install|uninstall|status`: thin wrappers over milton.ops.systemd."""

from __future__ import annotations

from typing import Annotated

import typer

from milton.cli.common import State, err, out

systemd_app = typer.Typer(help="Render and install systemd units and timers.", no_args_is_help=True)

UserOpt = Annotated[
    bool,
    typer.Option("--user/--system",
                 help="Per-user units in ~/.config/systemd/user (default), or system-wide (root)."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print what would be done; change nothing.")]


def _say(console, text: str) -> None:
    # soft_wrap: never re-wrap unit text or commands to the terminal width.
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _warn_systemctl(outcome, err, files: str) -> None:
    from milton.ops.systemd import shell_line

    cmd, why = outcome.failed[0]
    _say(err, f"milton: warning: {shell_line(cmd)} failed ({why}); {files}. "
              "Run these yourself once systemd is available:")
    for c, _ in outcome.failed:
        _say(err, f"  {shell_line(c)}")


@systemd_app.command("install")
def install_cmd(
    user: UserOpt = True,
    dry_run: DryRunOpt = False,
    serve: Annotated[bool, typer.Option(
        "--serve/--no-serve", help="Enable and start milton-serve.service (live scoring, alerts, "
        "the assistant's API); --no-serve leaves it installed but off.")] = True,
) -> None:
    """Write every unit and timer in systemd/ (jobs, serve, notify@), reload systemd, enable the timers."""
    from milton.ops import systemd

    mode = "user" if user else "system"
    settings = State.settings()
    config_file = State.loaded.config_file if State.loaded else None

    def echo(text: str) -> None:
        _say(out, text)

    outcome = systemd.install(settings, mode, dry_run, serve=serve, config_file=config_file, echo=echo)
    if dry_run:
        _say(out, "# dry run: nothing written. Would then run:")
        for c in outcome.commands:
            _say(out, f"#   {systemd.shell_line(c)}")
    else:
        for path in outcome.written:
            _say(out, f"wrote {path}")
        if outcome.systemctl_ok:
            for c in outcome.commands:
                _say(out, f"ran {systemd.shell_line(c)}")
        else:
            _warn_systemctl(outcome, err, f"the unit files are in place in {outcome.unit_dir}")
    if mode == "user":
        _say(err, systemd.LINGER_NOTE)


@systemd_app.command("uninstall")
def uninstall_cmd(user: UserOpt = True, dry_run: DryRunOpt = False) -> None:
    """Disable and stop Milton's units, remove the files, reload systemd."""
    from milton.ops import systemd

    mode = "user" if user else "system"
    outcome = systemd.uninstall(None, mode, dry_run)
    prefix = "would remove" if dry_run else "removed"
    if not outcome.removed and not dry_run:
        _say(out, f"no milton units in {outcome.unit_dir}")
    for path in outcome.removed:
        _say(out, f"{prefix} {path}")
    if dry_run:
        for c in outcome.commands:
            _say(out, f"would run {systemd.shell_line(c)}")
    elif not outcome.systemctl_ok:
        _warn_systemctl(outcome, err, "the unit files were removed anyway")


@systemd_app.command("status")
def status_cmd(user: UserOpt = True) -> None:
    """Which unit files are installed, and their timers' last/next runs."""
    from milton.ops import systemd

    mode = "user" if user else "system"
    st = systemd.status(mode)
    _say(out, f"unit directory: {st.unit_dir}")
    for name, present in st.installed.items():
        _say(out, f"  {name}: {'installed' if present else 'missing'}")
    if st.systemctl is not None:
        _say(out, st.systemctl)
    else:
        _say(err, f"milton: warning: cannot query systemd ({st.reason})")


def register(app: typer.Typer) -> None:
    app.add_typer(systemd_app, name="systemd")
