"""`milton notify test|unit-failed`: thin wrappers over milton.core.notify."""

from __future__ import annotations

from typing import Annotated

import typer

from milton.cli.common import State, err, out

notify_app = typer.Typer(help="Send push notifications (ntfy) about failures and model changes.",
                         no_args_is_help=True)


@notify_app.command("test")
def test_cmd(
    message: Annotated[str, typer.Option("--message", "-m", help="Text to send.")] =
        "Notifications from milton work.",
) -> None:
    """Send a test notification; exit 1 with the reason if the server did not accept it."""
    from milton.core.notify import send, topic_url

    settings = State.settings()
    send(settings.notify, "milton: test notification", message, tags=("wave",))
    out.print(f"sent to {topic_url(settings.notify)}", markup=False, highlight=False)


@notify_app.command("unit-failed")
def unit_failed_cmd(
    unit: Annotated[str, typer.Argument(help="The failed unit, e.g. milton-ingest.service (systemd's %i).")],
) -> None:
    """Report a failed systemd unit (what OnFailure=milton-notify@%n.service runs).

    Sends "milton: JOB failed" with the newest failed job_runs entry and a journalctl hint.
    Works without a readable store. Exit 1 only if the notification could not be delivered.
    """
    from milton.core.notify import enabled, send, unit_failure_report

    settings = State.settings()
    title, message = unit_failure_report(settings, unit)
    err.print(f"{title}: {message}", markup=False, highlight=False)  # to the journal as well
    if not enabled(settings, "failure"):
        out.print("notifications are off (notify.url empty or notify.on_failure false); nothing sent",
                  markup=False, highlight=False)
        return
    send(settings.notify, title, message, tags=("rotating_light",))


def register(app: typer.Typer) -> None:
    app.add_typer(notify_app, name="notify")
