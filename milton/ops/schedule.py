"""``milton schedule``: the systemd timers' calendar, run in the foreground where there is no systemd.

Containers and macOS have no systemd, but the jobs still need to run on time. The calendar is
read from the shipped ``.timer``/``.service`` templates themselves (``OnCalendar=``,
``Unit=``, and the arguments after ``{exe}{config}`` in ``ExecStart=``), so there is one
source of truth and a dropped-in template pair is picked up here as it is by
``milton systemd install``.

Each job runs as its own ``python -m milton ...`` child, so a crash or a leak cannot take
the scheduler down, and under the same per-job locks as under systemd (the runner takes them;
exit 75 = busy = fine). Like ``Persistent=true``, a job whose time passed while nothing was
running (the newest ``job_runs`` row, or the scheduler's own stamp in
``data/schedule.json``, is older than its most recent elapse) runs once at start.
``RandomizedDelaySec=`` is not applied: one scheduler has no herd to spread.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from milton.core.config import Settings
from milton.core.errors import EXIT_BUSY, InputError, MiltonError
from milton.core.fsio import atomic_write_json
from milton.core.log import get_logger, log_event
from milton.core.store import connect_readonly
from milton.core.timeutil import iso, parse_timestamp, utcnow
from milton.ops.calendar import CalendarError, parse_calendar

STATE_FILE = "schedule.json"
EXEC_PREFIX = "{exe}{config}"

logger = get_logger("schedule")


# -- the calendar, from the templates --------------------------------------------------------
@dataclass
class ScheduledJob:
    """One timer: ``name`` is the unit name without ``milton-`` and equals the job_runs name."""

    name: str
    unit: str
    calendar: str
    args: list[str]
    calendars: tuple[str, ...] = ()  # every OnCalendar= line (usually one; ``calendar`` joins them)
    notify_on_failure: bool = True  # the service has OnFailure=, as under systemd

    def __post_init__(self) -> None:
        if not self.calendars:
            self.calendars = (self.calendar,)
        for expr in self.calendars:
            parse_calendar(expr)  # fail early, with the expression named

    def next_after(self, dt: datetime) -> datetime | None:
        """The first elapse strictly after ``dt`` (aware, local time); None if it never elapses."""
        times = [t for t in (parse_calendar(c).next_elapse(dt) for c in self.calendars) if t]
        return min(times) if times else None


def _unit_keys(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values of a unit file (continuation lines joined, comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MiltonError(f"{path}: cannot read unit template: {exc.strerror}") from None
    keys: dict[tuple[str, str], list[str]] = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line:
            key, value = line.split("=", 1)
            keys.setdefault((section, key.strip()), []).append(value.strip())
    return keys


def _exec_args(path: Path, exec_start: str) -> list[str]:
    import shlex

    if not exec_start.startswith(EXEC_PREFIX):
        raise MiltonError(f"{path}: ExecStart= must start with {EXEC_PREFIX} (got {exec_start!r})")
    try:
        args = shlex.split(exec_start[len(EXEC_PREFIX):])
    except ValueError as exc:
        raise MiltonError(f"{path}: ExecStart=: {exc}") from None
    if not args:
        raise MiltonError(f"{path}: ExecStart= runs no milton command")
    return args


def scheduled_jobs(tdir: Path | None = None) -> list[ScheduledJob]:
    """Every timer in the unit templates, with its calendar and milton arguments."""
    from milton.ops.systemd import template_dir, template_names

    tdir = tdir or template_dir()
    jobs = []
    for timer in template_names(tdir)[1]:
        tpath = tdir / timer
        keys = _unit_keys(tpath)
        calendars = tuple(keys.get(("Timer", "OnCalendar"), []))
        if not calendars:
            raise MiltonError(f"{tpath}: no OnCalendar= in [Timer]")
        service = (keys.get(("Timer", "Unit")) or [timer.removesuffix(".timer") + ".service"])[-1]
        spath = tdir / service
        if not spath.is_file():
            raise MiltonError(f"{tpath}: Unit={service} has no template {spath}")
        service_keys = _unit_keys(spath)
        exec_start = service_keys.get(("Service", "ExecStart"))
        if not exec_start:
            raise MiltonError(f"{spath}: no ExecStart= in [Service]")
        name = timer.removesuffix(".timer").removeprefix("milton-")
        try:
            jobs.append(ScheduledJob(name=name, unit=timer, calendar="; ".join(calendars),
                                     args=_exec_args(spath, exec_start[-1]), calendars=calendars,
                                     notify_on_failure=bool(service_keys.get(("Unit", "OnFailure")))))
        except CalendarError as exc:
            raise CalendarError(f"{tpath}: {exc}") from None
    return sorted(jobs, key=lambda j: j.name)


def select(jobs: list[ScheduledJob], only: Sequence[str] = ()) -> list[ScheduledJob]:
    """The jobs named in ``only`` (all when empty); unknown names are an input error."""
    if not only:
        return jobs
    known = {j.name for j in jobs}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise InputError(f"--only: unknown job {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return [j for j in jobs if j.name in only]


# -- when did each job last run --------------------------------------------------------------
def last_runs(settings: Settings) -> dict[str, datetime]:
    """Newest ``job_runs.started`` per job. Read-only: the scheduler never creates the store."""
    path = settings.db_path
    if not path.exists():
        return {}
    try:
        conn = connect_readonly(path, timeout_s=10)
        try:
            rows = conn.execute("select job, max(started) from job_runs group by job").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log_event(logger, f"cannot read job history from {path}: {exc}", level=30)
        return {}
    out = {}
    for job, started in rows:
        try:
            out[job] = parse_timestamp(started, field="job_runs.started")
        except MiltonError:
            continue
    return out


def _state_path(settings: Settings) -> Path:
    return settings.paths.data_dir / STATE_FILE


def load_stamps(settings: Settings) -> dict[str, datetime]:
    """unit -> when the scheduler last triggered (or armed) it: systemd's timer stamp files."""
    try:
        raw = json.loads(_state_path(settings).read_text(encoding="utf-8"))
        return {unit: parse_timestamp(value) for unit, value in raw.get("last_trigger", {}).items()}
    except (OSError, ValueError, AttributeError, MiltonError):
        return {}


def save_stamps(settings: Settings, stamps: dict[str, datetime]) -> None:
    path = _state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"last_trigger": {u: iso(t) for u, t in sorted(stamps.items())}})


def missed(job: ScheduledJob, last: datetime | None, now: datetime) -> bool:
    """Persistent=true: did the calendar elapse after ``last`` and by ``now``?"""
    if last is None:
        return False  # never triggered: like a newly enabled timer, wait for the next elapse
    nxt = job.next_after(last)
    return nxt is not None and nxt <= now


def plan(settings: Settings, jobs: list[ScheduledJob], now: datetime | None = None) -> list[dict[str, Any]]:
    """What ``--dry-run`` shows: each job's calendar, last run and next run."""
    now = now or utcnow()
    history, stamps = last_runs(settings), load_stamps(settings)
    rows = []
    for job in jobs:
        last = _newest(history.get(job.name), stamps.get(job.unit))
        rows.append({"job": job.name, "unit": job.unit, "calendar": job.calendar,
                     "command": ["milton", *job.args], "last_run": iso(last),
                     "next_run": iso(now if missed(job, last, now) else job.next_after(now)),
                     "catch_up": missed(job, last, now)})
    return rows


def _newest(*times: datetime | None) -> datetime | None:
    present = [t for t in times if t is not None]
    return max(present) if present else None


# -- running --------------------------------------------------------------------------------
def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a preexec hook so a child gets SIGTERM if the scheduler dies (kill -9, OOM)
    instead of lingering as an orphan. Resolved in the parent: the hook only calls prctl."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)

    def hook() -> None:  # pragma: no cover - runs in the forked child
        prctl(1, sigterm)  # PR_SET_PDEATHSIG

    return hook


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    started_wall: datetime = field(default_factory=utcnow)
    stderr_tail: deque = field(default_factory=lambda: deque(maxlen=5))
    tee: threading.Thread | None = None

    def tee_stderr(self) -> None:
        """Pass the child's stderr through, keeping its last lines: a job's one-line error
        ("milton: error: ...") is what a failure notification should say."""
        def pump() -> None:
            assert self.proc.stderr is not None
            for raw in iter(self.proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace")
                sys.stderr.write(line)
                sys.stderr.flush()
                if line.strip():
                    self.stderr_tail.append(line.strip())
            self.proc.stderr.close()

        self.tee = threading.Thread(target=pump, name=f"stderr-{self.name}", daemon=True)
        self.tee.start()

    def last_error(self) -> str | None:
        if self.tee is not None:
            self.tee.join(timeout=5)
        return self.stderr_tail[-1] if self.stderr_tail else None


class Scheduler:
    """Starts due jobs as children, never two of one job, and optionally supervises serve."""

    def __init__(self, settings: Settings, jobs: list[ScheduledJob], *,
                 global_opts: Sequence[str] = (), serve: bool = False, poll_s: float = 0.5,
                 stop_timeout_s: float = 30.0, clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.jobs = jobs
        self.global_opts = list(global_opts)
        self.serve = serve
        self.poll_s = poll_s
        self.stop_timeout_s = stop_timeout_s
        self.clock = clock
        self.running: dict[str, Child] = {}
        self.next_at: dict[str, datetime | None] = {}
        self.stamps: dict[str, datetime] = {}
        self.failures = 0
        self.started: list[str] = []  # names, in start order (for tests and the summary)
        self.stopping = False
        self._serve: Child | None = None
        self._serve_backoff = 1.0
        self._serve_restart_at = 0.0
        self._serve_crashes = 0
        self._preexec = _die_with_parent()

    # -- lifecycle ------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """Signal handler: stop starting jobs; the loop then stops the children and returns."""
        self.stopping = True

    def prepare(self, now: datetime) -> None:
        """Compute each job's next run; catch up missed ones (Persistent=true); arm new ones."""
        history = last_runs(self.settings)
        self.stamps = load_stamps(self.settings)
        armed = False
        for job in self.jobs:
            last = _newest(history.get(job.name), self.stamps.get(job.unit))
            if last is None:
                self.stamps[job.unit] = now
                armed = True
            if missed(job, last, now):
                log_event(logger, f"{job.name}: missed its run at {iso(job.next_after(last))}; "
                          "running it now", job=job.name, last_run=iso(last))
                self.next_at[job.name] = now
            else:
                self.next_at[job.name] = job.next_after(now)
        if armed:
            save_stamps(self.settings, self.stamps)

    def run(self, *, once: bool = False) -> int:
        """Run until stopped (SIGTERM/SIGINT), or with ``once`` run what is due and return.

        Returns 0, or with ``once`` 1 if any job failed.
        """
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.prepare(self.clock())
            log_event(logger, f"scheduler started: {len(self.jobs)} job(s)"
                      + (" and serve" if self.serve else ""), once=once,
                      jobs=",".join(j.name for j in self.jobs))
            if once:
                self._start_due(self.clock())
                while self.running and not self.stopping:
                    self._reap()
                    time.sleep(self.poll_s)
                self._reap()
            else:
                last = self.clock()
                while not self.stopping:
                    now = self.clock()
                    if now < last - timedelta(seconds=60):
                        # The clock was set back: recompute, as systemd does on a clock change.
                        log_event(logger, "clock moved back; recomputing next runs", level=30)
                        self.next_at = {j.name: j.next_after(now) for j in self.jobs}
                    last = now
                    self._reap()
                    self._start_due(now)
                    if self.serve:
                        self._supervise_serve()
                    time.sleep(self._sleep_s())
            return 1 if once and self.failures and not self.stopping else 0
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log_event(logger, "scheduler stopped", failures=self.failures)

    def _sleep_s(self) -> float:
        pending = [t for t in self.next_at.values() if t is not None]
        if not pending:
            return self.poll_s
        wait = (min(pending) - self.clock()).total_seconds()
        return max(0.05, min(self.poll_s, wait))

    # -- jobs -----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], *, tee: bool = True) -> Child:
        cmd = [sys.executable, "-m", "milton", *self.global_opts, *args]
        # Own session: a terminal's Ctrl-C reaches the scheduler only, which forwards SIGTERM.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=self._preexec, stderr=subprocess.PIPE if tee else None)
        child = Child(name, args, proc)
        if tee:
            child.tee_stderr()
        return child

    def _start_due(self, now: datetime) -> None:
        for job in self.jobs:
            at = self.next_at.get(job.name)
            if at is None or at > now or self.stopping:
                continue
            self.next_at[job.name] = job.next_after(now)
            if job.name in self.running:
                log_event(logger, f"{job.name}: still running from {iso(self.running[job.name].started_wall)}; "
                          "not started twice", level=30, job=job.name)
                continue
            try:
                child = self._spawn(job.name, job.args)
            except OSError as exc:
                self._failed(job.name, job.args, f"cannot start: {exc}")
                continue
            self.running[job.name] = child
            self.started.append(job.name)
            self.stamps[job.unit] = now
            save_stamps(self.settings, self.stamps)
            log_event(logger, f"{job.name}: started", job=job.name, pid=child.proc.pid,
                      command=" ".join(["milton", *job.args]),
                      next_run=iso(self.next_at[job.name]))

    def _reap(self) -> None:
        for name, child in list(self.running.items()):
            rc = child.proc.poll()
            if rc is None:
                continue
            del self.running[name]
            took = round(time.monotonic() - child.started, 2)
            if rc == 0:
                log_event(logger, f"{name}: ok", job=name, status="ok", duration_s=took)
            elif rc == EXIT_BUSY:
                log_event(logger, f"{name}: busy, skipped (another copy holds its lock)",
                          level=30, job=name, status="busy", duration_s=took)
            elif self.stopping and rc < 0:
                log_event(logger, f"{name}: stopped", level=30, job=name, status="stopped")
            else:
                self._failed(name, child.args, _describe_exit(rc), started=child.started_wall,
                             stderr=child.last_error())

    def _failed(self, name: str, args: list[str], why: str, *, started: datetime | None = None,
                stderr: str | None = None) -> None:
        from milton.core.notify import notify, recent_runs

        self.failures += 1
        log_event(logger, f"{name}: failed ({why})", level=40, job=name, status="failed",
                  error=stderr)
        lines = [f"`milton {' '.join(args)}` {why}"]
        _, failed, _ = recent_runs(self.settings, name)
        if failed and started and parse_timestamp(failed["started"]) >= started.replace(microsecond=0):
            lines.append(failed["error"] or "failed without an error message")
        elif stderr:  # it failed before the runner could record it (config, locks, store)
            lines.append(stderr)
        lines.append("run by `milton schedule`; see its log output")
        job = next((j for j in self.jobs if j.name == name), None)
        if job is not None and not job.notify_on_failure:
            return  # like systemd without OnFailure=: the job reports for itself (check)
        notify(self.settings, "failure", f"milton: {name} failed", "\n".join(lines))

    # -- serve ----------------------------------------------------------------------------
    def _supervise_serve(self) -> None:
        """Keep ``milton serve`` running; restart a crash with exponential backoff (max 60s)."""
        if self._serve is not None:
            rc = self._serve.proc.poll()
            if rc is None:
                if time.monotonic() - self._serve.started > 60:
                    self._serve_backoff, self._serve_crashes = 1.0, 0  # stable again
                return
            ran = time.monotonic() - self._serve.started
            self._serve = None
            self._serve_crashes += 1
            self._serve_restart_at = time.monotonic() + self._serve_backoff
            log_event(logger, f"serve: exited ({_describe_exit(rc)}) after {ran:.0f}s; restarting in "
                      f"{self._serve_backoff:.0f}s", level=40, job="serve", status="failed")
            if self._serve_crashes == 1:  # once per crash loop, not once per restart
                self._failed_serve(rc)
            self._serve_backoff = min(60.0, self._serve_backoff * 2)
            return
        if time.monotonic() < self._serve_restart_at:
            return
        try:
            self._serve = self._spawn("serve", ["serve"], tee=False)
        except OSError as exc:
            log_event(logger, f"serve: cannot start: {exc}", level=40, job="serve")
            self._serve_restart_at = time.monotonic() + self._serve_backoff
            return
        log_event(logger, "serve: started", job="serve", pid=self._serve.proc.pid)

    def _failed_serve(self, rc: int) -> None:
        from milton.core.notify import notify

        self.failures += 1
        notify(self.settings, "failure", "milton: serve failed",
               f"`milton serve` {_describe_exit(rc)}; `milton schedule --serve` restarts it with backoff")

    # -- stopping -------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """SIGTERM every child (its whole process group), wait ``stop_timeout_s``, then SIGKILL."""
        children = [*self.running.values(), *([self._serve] if self._serve else [])]
        alive = [c for c in children if c.proc.poll() is None]
        for child in alive:
            log_event(logger, f"{child.name}: stopping (SIGTERM)", job=child.name, pid=child.proc.pid)
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in alive:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log_event(logger, f"{child.name}: did not stop in {self.stop_timeout_s:.0f}s; killing",
                          level=30, job=child.name)
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
        if self.stopping:
            self._reap()
        self.running.clear()
        self._serve = None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own group (setsid)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def global_options(config_path: Path | None, log_level: str | None = None) -> list[str]:
    """The options every child gets: the scheduler's --config (absolute), and its log level."""
    opts: list[str] = []
    if config_path is not None:
        opts += ["--config", str(Path(config_path).expanduser().absolute())]
    if log_level:
        opts += ["--log-level", log_level.lower()]
    return opts


def run_schedule(settings: Settings, *, only: Sequence[str] = (), once: bool = False,
                 serve: bool = False, global_opts: Sequence[str] = ()) -> int:
    """``milton schedule``: the exit status (0; with ``once``, 1 if a job failed)."""
    jobs = select(scheduled_jobs(), only)
    return Scheduler(settings, jobs, global_opts=global_opts, serve=serve).run(once=once)


__all__ = ["ScheduledJob", "Scheduler", "global_options", "last_runs", "missed", "plan",
           "run_schedule", "scheduled_jobs", "select"]
