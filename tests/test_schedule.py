"""`milton schedule`: the timers' calendar without systemd, checked against systemd's own tool."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from helpers import systemd_analyze
from ntfy_server import NtfyServer

from milton.core.config import load_settings
from milton.core.errors import MiltonError
from milton.core.store import open_store
from milton.core.timeutil import iso, utcnow
from milton.ops import systemd
from milton.ops.calendar import CalendarError, iterate, next_elapse, parse_calendar
from milton.ops.schedule import (
    ScheduledJob,
    Scheduler,
    load_stamps,
    missed,
    scheduled_jobs,
)

REPO = Path(__file__).resolve().parents[1]

SHIPPED = sorted({c for job in scheduled_jobs() for c in job.calendars})
EXTRA = [
    # the future jobs' calendars (train-lora, evolve) and the shorthands
    "*-*-* 02:00:00", "*-*-01 03:00:00", "minutely", "hourly", "daily", "weekly", "monthly",
    "yearly", "quarterly", "semiannually",
    # weekdays, lists, ranges, repetitions, time-only forms
    "Mon..Fri 09:30", "Sat,Sun *-*-* 10..14/2:30", "Mon,Wed..Fri 1..3:00", "*:0,30", "8/15:00",
    "1..3/2:00", "02:00", "*:5", "*-*-* *:*:*", "*:0/20:0/30", "monday 02:00",
    # dates: month-day, years (two-digit too), repetitions, impossible and leap days
    "12-25", "*-1/2-01", "*-*-1/10", "2027-*-* 12:00", "25-12-25 10:00", "*-2-29 00:00", "*-02-30",
    # last days of the month
    "*-02~1", "*-02~03", "*-05~07/1", "Mon *-05~07/1 12:00", "*-*~1..3", "*-01..03~1",
    # explicit zones
    "10:00 UTC", "10:00 Europe/Berlin", "*-*-* 23:59:59 America/New_York",
    # times that DST skips or repeats in Europe/Berlin
    "*-*-* 02:30", "*-*-* 01:30", "*-03-29 02:00", "*-10-25 02:30",
]
BASES = [
    datetime(2026, 1, 15, 10, 7, 13, tzinfo=timezone.utc),
    datetime(2026, 2, 28, 23, 59, 59, tzinfo=timezone.utc),
    datetime(2026, 3, 29, 0, 30, tzinfo=timezone.utc),  # Berlin springs forward at 01:00 UTC
    datetime(2026, 10, 25, 0, 10, tzinfo=timezone.utc),  # Berlin falls back at 01:00 UTC
    datetime(2026, 10, 25, 1, 10, tzinfo=timezone.utc),  # ... inside the repeated hour
    datetime(2027, 12, 31, 23, 59, 59, tzinfo=timezone.utc),
]


def systemd_elapses(expr: str, base: datetime, tz: str, iterations: int = 5) -> list[datetime] | None:
    """systemd's own answer, in UTC; None if systemd rejects the expression."""
    env = {**os.environ, "TZ": tz, "LC_ALL": "C"}
    proc = subprocess.run([systemd_analyze(), "calendar", f"--iterations={iterations}",
                           f"--base-time=@{int(base.timestamp())}", expr],
                          capture_output=True, text=True, env=env, timeout=30)
    if proc.returncode != 0:
        return None
    out = []
    for line in proc.stdout.splitlines():
        # In UTC, systemd prints the times in UTC; elsewhere it adds "(in UTC): ..." lines.
        pattern = (r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC" if tz == "UTC"
                   else r"\(in UTC\): \w+ (\S+ \S+) UTC")
        m = re.search(pattern, line)
        if m:
            out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc))
    assert out or "never" in proc.stdout, proc.stdout
    return out


def _utc(times: list[datetime]) -> list[datetime]:
    return [t.astimezone(timezone.utc) for t in times]


# -- the calendar parser against systemd-analyze -----------------------------------------------
@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin"])
@pytest.mark.parametrize("expr", SHIPPED + EXTRA)
def test_next_elapse_matches_systemd(expr, tz):
    zone = timezone.utc if tz == "UTC" else ZoneInfo(tz)
    for base in BASES:
        want = systemd_elapses(expr, base, tz)
        assert want is not None, f"systemd rejects {expr!r}"
        got = _utc(iterate(expr, base, 5, tz=zone))
        assert got == want, f"{expr!r} after {base} in {tz}"


def test_shipped_timers_are_checked():
    assert set(SHIPPED) >= {"*:0/5", "hourly", "*-*-* 00/6:00:00", "Sun *-*-* 02:00:00",
                            "Sun *-*-* 03:00:00", "*-*-* 09:00:00"}


def test_local_time_is_the_machine_zone(monkeypatch):
    """Without a zone argument the machine's local zone applies, as for systemd timers."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        base = datetime(2026, 3, 8, 5, 0, tzinfo=timezone.utc)  # New York springs forward at 07:00 UTC
        for expr in ("*-*-* 02:30", "Sun *-*-* 02:00:00", "hourly", "*:0/5"):
            want = systemd_elapses(expr, base, "America/New_York")
            assert _utc(iterate(expr, base, 5)) == want, expr
        # A naive `after` is local time too; the result is aware.
        nxt = next_elapse("*-*-* 09:00:00", datetime(2026, 7, 1, 12, 0))
        assert nxt.utcoffset() == timedelta(hours=-4)
        assert (nxt.month, nxt.day, nxt.hour) == (7, 2, 9)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_strictly_after_and_aware_inputs():
    after = datetime(2026, 1, 1, 10, 0, tzinfo=timezone.utc)
    assert next_elapse("hourly", after, tz=timezone.utc) == after + timedelta(hours=1)
    assert next_elapse("hourly", after - timedelta(microseconds=1), tz=timezone.utc) == after
    tokyo = after.astimezone(ZoneInfo("Asia/Tokyo"))  # the same instant, another zone
    assert next_elapse("*:0/5", tokyo, tz=timezone.utc) == after + timedelta(minutes=5)
    assert next_elapse("2020-01-01", after) is None  # never again


@pytest.mark.parametrize("expr,fragment", [
    ("*:*/5", "*/N"), ("*/2:00", "*/N"), ("*:00:00.5", "fractional"), ("@1700000000", "@EPOCH"),
    ("24:00", "out of range"), ("3..1:00", "forwards"), ("Fri..Mon 10:00", "forwards"),
    ("Sun 2", "H:M"), ("0/0:00", "repetition of 0"), ("10:00 Mars/Olympus", "time zone"),
    ("Funday 10:00", "weekday"), ("", "empty"), ("*-*-* 10:00 11:00", "unexpected"), ("10:00 Nowhere", "time zone"),
])
def test_unsupported_expressions_are_one_line_errors(expr, fragment):
    with pytest.raises(CalendarError) as info:
        parse_calendar(expr)
    assert fragment in str(info.value) and repr(expr) in str(info.value)
    assert "\n" not in str(info.value)


def test_star_slash_is_rejected_by_systemd_too():
    """The one place this parser departs from cron: systemd refuses */N, and so do we."""
    systemd_analyze()
    assert systemd_elapses("*:*/5", BASES[0], "UTC") is None
    assert systemd_elapses("*:0/5", BASES[0], "UTC")


# -- the job list, from the templates ---------------------------------------------------------
def test_scheduled_jobs_come_from_the_templates():
    jobs = {j.name: j for j in scheduled_jobs()}
    assert set(jobs) == {t.removesuffix(".timer").removeprefix("milton-") for t in systemd.TIMERS}
    assert jobs["ingest"].unit == "milton-ingest.timer"
    assert jobs["ingest"].calendar == "*:0/5"
    assert jobs["ingest"].args == ["ingest", "processes"]
    assert jobs["ingest-documents"].args == ["ingest", "documents"]
    assert jobs["train-anomaly"].args == ["train-anomaly"]
    assert jobs["compress-memory"].calendar == "Sun *-*-* 02:00:00"
    assert jobs["backup"].args == ["backup"]
    assert jobs["check"].args == ["status", "--check"]
    # OnFailure= in the service decides, as under systemd: check notifies for itself.
    assert jobs["ingest"].notify_on_failure and not jobs["check"].notify_on_failure
    after = datetime(2026, 1, 15, 10, 7, 13, tzinfo=timezone.utc)
    assert jobs["ingest"].next_after(after) == next_elapse("*:0/5", after)


def _copy_templates(tmp_path: Path) -> Path:
    tdir = tmp_path / "templates"
    shutil.copytree(systemd.template_dir(), tdir)
    return tdir


def test_a_dropped_in_pair_is_scheduled(tmp_path):
    tdir = _copy_templates(tmp_path)
    (tdir / "milton-report.service").write_text(
        (tdir / "milton-backup.service").read_text().replace("} backup", "} evolve report --json"))
    (tdir / "milton-report.timer").write_text(
        (tdir / "milton-backup.timer").read_text().replace("Sun *-*-* 03:00:00", "*-*-15 04:00:00")
        .replace("milton-backup.service", "milton-report.service"))
    jobs = {j.name: j for j in scheduled_jobs(tdir)}
    assert jobs["report"].args == ["evolve", "report", "--json"]
    assert jobs["report"].calendar == "*-*-15 04:00:00"
    assert jobs["evolve"].args == ["evolve"] and jobs["evolve"].calendar == "*-*-01 03:00:00"


def test_bad_calendar_in_a_timer_names_file_and_expression(tmp_path):
    tdir = _copy_templates(tmp_path)
    timer = tdir / "milton-ingest.timer"
    timer.write_text(timer.read_text().replace("OnCalendar=*:0/5", "OnCalendar=*:*/5"))
    with pytest.raises(CalendarError) as info:
        scheduled_jobs(tdir)
    assert str(timer) in str(info.value) and "'*:*/5'" in str(info.value)
    timer.write_text(timer.read_text().replace("Unit=milton-ingest.service", "Unit=milton-nope.service"))
    timer.write_text(timer.read_text().replace("OnCalendar=*:*/5", "OnCalendar=*:0/5"))
    with pytest.raises(MiltonError, match="milton-nope.service"):
        scheduled_jobs(tdir)


def test_missed_is_persistent_true():
    job = ScheduledJob("ingest", "milton-ingest.timer", "*:0/5", ["ingest", "processes"])
    now = datetime(2026, 1, 15, 10, 7, 13, tzinfo=timezone.utc)
    assert missed(job, now - timedelta(minutes=9), now)  # 10:05 passed since 09:58
    assert not missed(job, now - timedelta(minutes=2), now)  # 10:05:13 -> next is 10:10
    assert not missed(job, None, now)  # never ran: wait for the next elapse, like systemd


# -- the scheduler ------------------------------------------------------------------------------
def _history(settings, **started: datetime) -> None:
    db = open_store(settings.db_path)
    try:
        for job, when in started.items():
            db["job_runs"].insert({"job": job.replace("_", "-"), "started": iso(when),
                                   "finished": iso(when), "status": "ok"})
    finally:
        db.close()


def _count(settings, job: str, status: str | None = None) -> int:
    db = open_store(settings.db_path)
    try:
        where = "job = ?" + (" and status = ?" if status else "")
        return db.execute(f"select count(*) from job_runs where {where}",
                          [job, *([status] if status else [])]).fetchone()[0]
    finally:
        db.close()


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_dry_run_lists_every_timer(cli):
    code, out, err = cli("schedule", "--dry-run", env={"COLUMNS": "200"})
    assert code == 0, err
    for job in scheduled_jobs():
        line = next(l for l in out.splitlines() if l.startswith(f"│ {job.name} "))
        assert job.calendar in line and " ".join(job.args) in line
    code, out, err = cli("schedule", "--dry-run", "--only", "ingest", "--only", "backup",
                         env={"COLUMNS": "200"})
    assert code == 0 and "│ backup " in out and "│ ingest " in out and "train-anomaly" not in out
    code, _, err = cli("schedule", "--dry-run", "--only", "nope")
    assert code == 2 and "unknown job 'nope'" in err


def test_once_runs_an_overdue_job_and_nothing_else(cli, settings):
    now = utcnow()
    # ingest last ran an hour ago: at least one */5 elapse was missed. The others "ran" a
    # few minutes in the future, so no elapse can fall between then and now, whatever the
    # clock says. check has no history: it is armed, not run.
    later = now + timedelta(minutes=5)
    _history(settings, ingest=now - timedelta(hours=1), train_anomaly=later,
             ingest_documents=later, compress_memory=later, backup=later)
    before = {j: _count(settings, j) for j in ("ingest", "train-anomaly", "compress-memory",
                                                "ingest-documents", "backup")}
    code, out, err = cli("schedule", "--once", timeout=180)
    assert code == 0, err + out
    assert _count(settings, "ingest") == before["ingest"] + 1
    assert _count(settings, "ingest", "ok") == 2  # the history row and the real run
    for job in ("train-anomaly", "compress-memory", "ingest-documents", "backup"):
        assert _count(settings, job) == before[job], job
    started = [e["job"] for e in _events(out) if e["msg"].endswith(": started")]
    assert started == ["ingest"]
    assert any(e["msg"] == "ingest: ok" for e in _events(out))
    stamps = load_stamps(settings)
    assert stamps["milton-ingest.timer"] >= now.replace(microsecond=0)
    assert "milton-check.timer" in stamps  # armed: its next 09:00 counts from now


def test_failing_job_is_notified(settings, tmp_path):
    server = NtfyServer()
    try:
        cfg = load_settings(notify={"url": server.url, "topic": "ops"}).settings
        _history(cfg, ingest=utcnow() - timedelta(hours=1))
        missing = tmp_path / "missing.jsonl"
        job = ScheduledJob("ingest", "milton-ingest.timer", "*:0/5",
                           ["ingest", "processes", "--from", str(missing)])
        scheduler = Scheduler(cfg, [job], poll_s=0.1)
        assert scheduler.run(once=True) == 1
        assert scheduler.started == ["ingest"] and scheduler.failures == 1
        (got,) = server.wait_for(1)
        assert got.path == "/ops" and got.title == "milton: ingest failed"
        assert "exited with status 2" in got.text
        assert f"{missing}: no such file" in got.text  # the job_runs error of this run
    finally:
        server.close()


def test_a_job_without_on_failure_is_not_notified_twice(settings):
    server = NtfyServer()
    try:
        cfg = load_settings(notify={"url": server.url, "topic": "ops"}).settings
        _history(cfg, check=utcnow() - timedelta(days=2))
        job = ScheduledJob("check", "milton-check.timer", "*-*-* 09:00:00",
                           ["ingest", "processes", "--from", "/nonexistent.jsonl"],
                           notify_on_failure=False)
        scheduler = Scheduler(cfg, [job], poll_s=0.1)
        assert scheduler.run(once=True) == 1 and scheduler.failures == 1
        time.sleep(0.3)
        assert server.received == []
    finally:
        server.close()


def test_once_exits_1_and_notifies_when_a_shipped_job_fails(cli, settings):
    """The real ingest job, made to fail: its lock folder is a file."""
    _history(settings, ingest=utcnow() - timedelta(hours=1))
    settings.locks_dir.write_text("not a folder")
    server = NtfyServer()
    try:
        code, out, err = cli("schedule", "--once", "--only", "ingest",
                             env={"MILTON_NOTIFY__URL": server.url})
        assert code == 1, err + out
        assert any(e["msg"].startswith("ingest: failed (exited with status 1)") for e in _events(out))
        (got,) = server.wait_for(1)
        assert got.title == "milton: ingest failed" and "cannot create lock file" in got.text
    finally:
        server.close()


def test_a_running_job_is_not_started_twice(settings, monkeypatch):
    """A job still running when its next elapse comes is left alone (serve never ends)."""
    monkeypatch.setenv("MILTON_SERVE__SNAPSHOT_ENABLED", "false")
    job = ScheduledJob("long", "milton-long.timer", "*:*:*", ["serve", "--port", "0"])
    scheduler = Scheduler(settings, [job], poll_s=0.1, stop_timeout_s=20)
    stop = threading.Timer(3.0, scheduler.request_stop)
    stop.start()
    try:
        assert scheduler.run() == 0
    finally:
        stop.cancel()
    assert scheduler.started == ["long"]
    assert scheduler.failures == 0
    assert not scheduler.running


def test_clock_set_back_recomputes_next_runs(settings):
    clock = [datetime(2026, 1, 15, 12, 0, tzinfo=timezone.utc)]
    job = ScheduledJob("x", "milton-x.timer", "*-*-* 11:00:00 UTC", ["status"])
    scheduler = Scheduler(settings, [job], poll_s=0.05, clock=lambda: clock[0])

    def set_back() -> None:
        clock[0] = datetime(2026, 1, 15, 9, 0, tzinfo=timezone.utc)

    timers = [threading.Timer(0.3, set_back), threading.Timer(0.8, scheduler.request_stop)]
    for t in timers:
        t.start()
    assert scheduler.run() == 0
    assert scheduler.next_at["x"] == datetime(2026, 1, 15, 11, 0, tzinfo=timezone.utc)
    assert scheduler.started == []


def test_once_and_serve_do_not_mix(cli):
    code, _, err = cli("schedule", "--once", "--serve")
    assert code == 2 and "--once" in err


def test_sigterm_stops_scheduler_and_children(milton_home):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MILTON_SERVE__PORT": "0",
           "MILTON_SERVE__SNAPSHOT_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "milton", "schedule", "--serve", "--only", "check"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=milton_home)
    try:
        serve_pid = None
        deadline = time.monotonic() + 60
        while serve_pid is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                event = json.loads(line)
                if event["msg"] == "serve: started":
                    serve_pid = event["pid"]
        assert serve_pid, proc.stderr.read() if proc.poll() is not None else "no serve start logged"
        os.kill(serve_pid, 0)  # running
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, proc.stderr.read()
        assert time.monotonic() - t0 < 25
        rest = proc.stdout.read()
        assert "scheduler stopped" in rest
        with pytest.raises(ProcessLookupError):
            os.kill(serve_pid, 0)  # the child was stopped and reaped, not orphaned
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
