"""Push notifications through ntfy's publish API (self-hosted ntfy, ntfy.sh, or anything compatible).

Unattended jobs fail silently unless someone is told: systemd units call
``milton notify unit-failed`` through ``OnFailure=``, ``milton schedule`` calls :func:`notify`
when a job exits non-zero, ``milton status --check`` reports a stale backup, the evaluation
gate reports promotions and rejections. One ``POST {url}/{topic}`` with the message as body and
ntfy's ``Title``/``Priority``/``Tags``/``Authorization`` headers, through the standard library.

A notification is a side channel: :func:`notify` never raises and never blocks longer than
``notify.timeout_s``, so a dead ntfy server cannot fail the job that wanted to report.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from email.header import Header

from milton import __version__
from milton.core.config import NotifyConfig, Settings
from milton.core.errors import MiltonError
from milton.core.log import get_logger, log_event
from milton.core.store import connect_readonly

#: event name -> the NotifyConfig switch that enables it.
EVENTS: dict[str, str] = {
    "failure": "on_failure",
    "promotion": "on_promotion",
    "rejection": "on_rejection",
    "stale_backup": "on_stale_backup",
    "alert": "on_alert",
    "briefing": "on_briefing",
    "test": "",  # `milton notify test`: always sent when notifications are configured
}
#: ntfy shows these tags as emoji in front of the title.
DEFAULT_TAGS: dict[str, tuple[str, ...]] = {
    "failure": ("rotating_light",),
    "promotion": ("white_check_mark",),
    "rejection": ("no_entry",),
    "stale_backup": ("floppy_disk",),
    "alert": ("warning",),
    "briefing": ("sunrise",),
    "test": ("wave",),
}
#: ntfy turns longer messages into attachments; stay below its 4096-byte limit.
MAX_BODY_BYTES = 3900

logger = get_logger("notify")


class NotifyError(MiltonError):
    """The ntfy server could not be reached or refused the message."""


def enabled(settings: Settings, event: str) -> bool:
    """Whether ``event`` would be sent: a URL is configured and its switch is on."""
    cfg = settings.notify
    if not cfg.url:
        return False
    switch = EVENTS.get(event, "on_failure")
    return not switch or bool(getattr(cfg, switch))


def header_value(text: str, *, limit: int = 250) -> str:
    """One header line: no CR/LF (header injection), latin-1 safe.

    http.client sends headers as latin-1; ntfy decodes RFC 2047 encoded-words, so a title
    with characters outside ASCII travels as ``=?utf-8?b?...?=`` instead of failing.
    """
    flat = re.sub(r"[\r\n\t]+", " ", text).strip()[:limit]
    if flat.isascii():
        return flat
    return Header(flat, "utf-8", maxlinelen=10_000).encode().replace("\n", "").replace("\r", "")


def _body(message: str) -> bytes:
    data = message.encode("utf-8")
    if len(data) <= MAX_BODY_BYTES:
        return data
    return data[: MAX_BODY_BYTES - 20].decode("utf-8", "ignore").encode("utf-8") + b"\n... (truncated)"


def topic_url(cfg: NotifyConfig) -> str:
    return f"{cfg.url}/{urllib.parse.quote(cfg.topic, safe='')}"


def send(cfg: NotifyConfig, title: str, message: str, *, priority: str | None = None,
         tags: Iterable[str] = (), markdown: bool = False) -> None:
    """Publish one message; raises :class:`NotifyError` with a one-line reason on any failure."""
    if not cfg.url:
        raise NotifyError("notifications are off: set notify.url (or MILTON_NOTIFY__URL)")
    url = topic_url(cfg)
    headers = {
        "Title": header_value(title),
        "Priority": str(priority or cfg.priority),
        "Content-Type": "text/plain; charset=utf-8",
        "User-Agent": f"milton/{__version__}",
    }
    if markdown:  # ntfy renders the body as Markdown in its web app
        headers["Markdown"] = "yes"
    tag_list = [re.sub(r"[^-_A-Za-z0-9]", "", t) for t in tags]
    if any(tag_list):
        headers["Tags"] = ",".join(t for t in tag_list if t)
    token = cfg.token.get_secret_value()
    if token:
        headers["Authorization"] = f"Bearer {header_value(token, limit=4096)}"
    request = urllib.request.Request(url, data=_body(message), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = exc.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
        except OSError:
            pass
        raise NotifyError(f"{url}: HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")) from None
    except urllib.error.URLError as exc:
        raise NotifyError(f"{url}: cannot reach the ntfy server: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URL
        raise NotifyError(f"{url}: {type(exc).__name__}: {exc or 'failed'}") from None


def notify(settings: Settings, event: str, title: str, message: str, *,
           priority: str | None = None, tags: Iterable[str] = (), markdown: bool = False) -> bool:
    """Send ``event`` if enabled. True when the server accepted it; False otherwise, never raises.

    A failed notification is logged as a warning and otherwise ignored: it must never fail
    the job that sent it.
    """
    if not enabled(settings, event):
        return False
    try:
        send(settings.notify, title, message, priority=priority,
             tags=dict.fromkeys((*tags, *DEFAULT_TAGS.get(event, ()))), markdown=markdown)
    except NotifyError as exc:
        log_event(logger, f"notification not sent: {exc}", level=30, event=event)
        return False
    except Exception as exc:  # noqa: BLE001 - a notification must never take its caller down
        log_event(logger, f"notification not sent: {type(exc).__name__}: {exc}", level=30, event=event)
        return False
    log_event(logger, f"notification sent: {title}", event=event)
    return True


# -- what `milton notify unit-failed UNIT` says (systemd's OnFailure=) ---------------------
def job_for_unit(unit: str) -> str:
    """``milton-ingest.service`` -> ``ingest``: the job name the units and job_runs share."""
    name = unit.strip()
    for suffix in (".service", ".timer"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.removeprefix("milton-")


def recent_runs(settings: Settings, job: str) -> tuple[dict | None, dict | None, str | None]:
    """(newest job_runs row of ``job``, newest failed row, None) or (None, None, why not).

    Read-only and without migrations: the store may be what broke.
    """
    path = settings.db_path
    if not path.exists():
        return None, None, f"the store {path} does not exist"
    query = ("select id, status, started, finished, error from job_runs where job = ? {} "
             "order by id desc limit 1")
    try:
        conn = connect_readonly(path)
        try:
            conn.row_factory = sqlite3.Row
            newest = conn.execute(query.format(""), [job]).fetchone()
            failed = conn.execute(query.format("and status = 'failed'"), [job]).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return None, None, f"the store {path} cannot be read: {exc}"
    return (dict(newest) if newest else None), (dict(failed) if failed else None), None


def unit_failure_report(settings: Settings, unit: str,
                        environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(title, message) for a failed systemd unit, from job_runs and systemd's MONITOR_* vars."""
    environ = dict(os.environ if environ is None else environ)
    job = job_for_unit(unit)
    lines: list[str] = []
    newest, failed, problem = recent_runs(settings, job)
    if problem:
        lines.append(f"job history unavailable: {problem}")
    elif newest is None:
        lines.append(f"no run of {job!r} recorded in job_runs")
    elif newest["status"] == "running":
        lines.append(f"the run started {newest['started']} is still marked running: it was killed "
                     "(timeout? out of memory?) before it could record how it ended")
    elif newest["status"] != "failed":
        lines.append(f"this failure left no job_runs record (bad config? unreadable store?); "
                     f"the newest run is {newest['status']}, started {newest['started']}")
    if failed is not None:
        prefix = "" if newest is not None and newest["id"] == failed["id"] else "last recorded failure: "
        lines.append(prefix + (failed["error"] or "failed without an error message"))
        lines.append(f"started {failed['started']}, finished {failed['finished'] or '-'}")
    result = environ.get("MONITOR_SERVICE_RESULT")
    code, status = environ.get("MONITOR_EXIT_CODE"), environ.get("MONITOR_EXIT_STATUS")
    if result or status:  # set by systemd (v251+) for OnFailure= units
        how = {"exited": f"exit status {status}", "killed": f"killed by signal {status}",
               "dumped": f"dumped core on signal {status}"}.get(code or "", f"{code} {status}")
        lines.append(f"systemd: result {result or '?'}" + (f", {how}" if status else ""))
    user = "--user " if hasattr(os, "geteuid") and os.geteuid() != 0 else ""
    lines.append(f"host {socket.gethostname()}; see: journalctl {user}--unit {unit}")
    return f"milton: {job} failed", "\n".join(lines)
