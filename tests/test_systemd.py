"""systemd units: rendering, `systemd-analyze verify`/`calendar`, and `milton systemd ...`."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import systemd_analyze
from typer.testing import CliRunner

import milton.cli
from milton.core.config import load_settings
from milton.core.errors import InputError
from milton.ops import systemd

UNIT_NAMES = set(systemd.UNITS)
JOBS = {"milton-ingest": "ingest processes", "milton-train-anomaly": "train-anomaly",
        "milton-ingest-documents": "ingest documents", "milton-compress-memory": "compress-memory",
        "milton-backup": "backup", "milton-check": "status --check",
        "milton-train-lora": "train-lora", "milton-evolve": "evolve", "milton-agent": "agent",
        "milton-briefing": "briefing"}
CALENDARS = {"milton-ingest.timer": "*:0/5", "milton-train-anomaly.timer": "hourly",
             "milton-ingest-documents.timer": "*-*-* 00/6:00:00",
             "milton-compress-memory.timer": "Sun *-*-* 02:00:00",
             "milton-backup.timer": "Sun *-*-* 03:00:00", "milton-check.timer": "*-*-* 09:00:00",
             "milton-train-lora.timer": "*-*-* 02:00:00", "milton-evolve.timer": "*-*-01 03:00:00",
             "milton-agent.timer": "*:2/5", "milton-briefing.timer": ["*-*-* 08:00:00", "*-*-* 20:00:00"]}


@pytest.fixture(scope="module", autouse=True)
def _register_cli() -> None:
    milton.cli._register_optional()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "milton-home"
    h.mkdir()
    for var in list(os.environ):
        if var.startswith("MILTON_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("MILTON_HOME", str(h))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(h)
    milton.cli.State.loaded = None
    milton.cli.State.config_path = None
    return h


@pytest.fixture
def exe(tmp_path) -> str:
    """A real executable for ExecStart= (verify checks it exists and is executable)."""
    candidate = Path(sys.executable).parent / "milton"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    fake = tmp_path / "bin" / "milton"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(fake)


def _settings():
    return load_settings(None).settings


def _write(units: dict[str, str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in units.items():
        (dest / name).write_text(text)
        paths.append(dest / name)
    return paths


def _keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


# -- rendering ----------------------------------------------------------------------------
def test_template_dir_has_every_unit():
    tdir = systemd.template_dir()
    assert {p.name for p in tdir.iterdir()} >= UNIT_NAMES


def test_units_are_read_from_the_template_folder():
    """Every shipped job is a .service/.timer pair; the constants follow the folder."""
    assert set(systemd.TIMERS) == set(CALENDARS)
    assert UNIT_NAMES == {*(f"{j}.service" for j in JOBS), *(f"{j}.timer" for j in JOBS),
                          systemd.SERVE, systemd.NOTIFY_TEMPLATE}
    assert set(systemd.job_services()) == {f"{j}.service" for j in JOBS}


def test_dropping_in_a_template_pair_adds_a_job(tmp_path):
    tdir = tmp_path / "templates"
    shutil.copytree(systemd.template_dir(), tdir)
    (tdir / "milton-evolve.service").write_text(
        (tdir / "milton-backup.service").read_text().replace(" backup", " evolve"))
    (tdir / "milton-evolve.timer").write_text(
        (tdir / "milton-backup.timer").read_text().replace("Sun *-*-* 03:00:00", "*-*-01 03:00:00")
        .replace("milton-backup.service", "milton-evolve.service"))
    units, timers = systemd.template_names(tdir)
    assert "milton-evolve.timer" in timers and "milton-evolve.service" in units
    assert "milton-evolve.service" in systemd.job_services(tdir)


def test_render_contents(home, exe):
    units = systemd.render_units(_settings(), exe=exe)
    assert set(units) == UNIT_NAMES
    for name, text in units.items():
        assert "{" not in text and "}" not in text, name
    for name in (*(f"{job}.service" for job in JOBS), systemd.NOTIFY_TEMPLATE):
        k = _keys(units[name])
        assert k["Type"] == ["oneshot"]
        assert k["NoNewPrivileges"] == ["yes"]
        assert k["ProtectSystem"] == ["strict"]
        assert k["PrivateTmp"] == ["yes"]
        assert k["WorkingDirectory"] == [str(home.resolve())]
        assert k["Environment"] == [f'"MILTON_HOME={home.resolve()}"']
        rw = k["ReadWritePaths"][0]
        for sub in ("data", "checkpoints"):
            assert str(home.resolve() / sub) in rw
        assert k["ExecStart"][0].startswith(exe + " ")
    for name in (f"{job}.service" for job in JOBS):
        k = _keys(units[name])
        assert k["SuccessExitStatus"] == ["75"]
        assert k["Nice"] == ["10"]
        assert k["IOSchedulingClass"] == ["idle"]
        assert k["CPUSchedulingPolicy"] == ["batch"]
    # Every job and serve report their failure; the notifier itself must not (no loop).
    for name in (*(f"{job}.service" for job in JOBS if job != "milton-check"), systemd.SERVE):
        assert _keys(units[name])["OnFailure"] == ["milton-notify@%n.service"], name
    # The check notifies about what it found itself; a second "check failed" would be noise.
    assert "OnFailure" not in _keys(units["milton-check.service"])
    notify = _keys(units[systemd.NOTIFY_TEMPLATE])
    assert "OnFailure" not in notify
    assert notify["ExecStart"] == [f"{exe} notify unit-failed %i"]
    for job, command in JOBS.items():
        assert _keys(units[f"{job}.service"])["ExecStart"] == [f"{exe} {command}"]
    for timer, service in ((f"{job}.timer", f"{job}.service") for job in JOBS):
        k = _keys(units[timer])
        assert k["Persistent"] == ["true"]
        assert k["Unit"] == [service]
        assert k["WantedBy"] == ["timers.target"]
        assert k["RandomizedDelaySec"]
    for timer, calendar in CALENDARS.items():
        assert _keys(units[timer])["OnCalendar"] == (calendar if isinstance(calendar, list) else [calendar])
    serve = _keys(units["milton-serve.service"])
    assert serve["Type"] == ["simple"]
    assert serve["Restart"] == ["on-failure"]
    assert serve["RestartSec"] == ["5"]
    assert serve["LimitNOFILE"] == ["4096"]  # room for serve.max_connections (issue 19)
    assert serve["WantedBy"] == ["default.target"]
    system = systemd.render_units(_settings(), mode="system", exe=exe)
    assert _keys(system["milton-serve.service"])["WantedBy"] == ["multi-user.target"]


def test_backup_dir_outside_home_is_writable(home, exe, tmp_path, monkeypatch):
    """ProtectSystem=strict would make an archive folder on another disk read-only."""
    if "backup" not in type(_settings()).model_fields:
        pytest.skip("no backup section in this tree")
    elsewhere = tmp_path / "other-disk" / "milton-backups"
    monkeypatch.setenv("MILTON_BACKUP__DIR", str(elsewhere))
    units = systemd.render_units(_settings(), exe=exe)
    assert str(elsewhere) in _keys(units["milton-backup.service"])["ReadWritePaths"][0]


def test_every_exec_start_is_a_real_command(cli):
    """Each template's ExecStart runs a milton command that exists (``--help`` exits 0)."""
    tdir = systemd.template_dir()
    seen = []
    for name in systemd.UNITS:
        if not name.endswith(".service"):
            continue
        (line,) = _keys((tdir / name).read_text())["ExecStart"]
        assert line.startswith("{exe}{config} "), name
        args = line.removeprefix("{exe}{config} ").replace("%i", "milton-ingest.service").split()
        code, out, err = cli(*args, "--help")
        assert code == 0, f"{name}: milton {' '.join(args)} --help: {err}"
        assert "Usage:" in out, name
        seen.append(args[0])
    assert {"ingest", "train-anomaly", "compress-memory", "backup", "status", "notify", "serve"} <= set(seen)
    code, _, err = cli("no-such-command", "--help")  # the check above can fail
    assert code != 0


def test_render_config_and_awkward_paths(tmp_path, monkeypatch, exe):
    odd = tmp_path / "my 100% home"
    odd.mkdir()
    monkeypatch.setenv("MILTON_HOME", str(odd))
    monkeypatch.chdir(odd)
    cfg = odd / "config.toml"
    cfg.write_text("")
    units = systemd.render_units(_settings(), exe=exe, config_file=cfg)
    k = _keys(units["milton-ingest.service"])
    assert k["ExecStart"] == [f'{exe} --config "{str(cfg.resolve()).replace("%", "%%")}" ingest processes']
    assert "100%% home" in k["WorkingDirectory"][0]


# -- systemd-analyze ----------------------------------------------------------------------
def _verify(analyze: str, paths: list[Path], mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "LC_ALL": "C"}
    cmd = [analyze, "verify"]
    if mode == "user":
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # a --user manager needs one; containers lack it
        cmd.append("--user")
    return subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("mode", ["user", "system"])
def test_systemd_analyze_verify(home, exe, tmp_path, mode):
    analyze = systemd_analyze()
    units = systemd.render_units(_settings(), mode=mode, exe=exe)
    dest = tmp_path / f"units-{mode}"
    paths = _write(units, dest)
    for path in paths:  # one at a time: an error names its file
        proc = _verify(analyze, [path], mode, tmp_path)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
        noisy = [line for line in proc.stderr.splitlines() if "milton" in line]
        assert not noisy, f"{path.name}: {proc.stderr}"
    # The whole set at once, and the notify template as OnFailure= instantiates it.
    instance = dest / "milton-notify@milton-ingest.service.service"
    assert not instance.exists()
    proc = _verify(analyze, [*paths, instance], mode, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if "milton" in line], proc.stderr


def test_systemd_analyze_verify_catches_broken_notify_template(home, tmp_path):
    """The instance check above can fail: a template with a missing binary is reported."""
    analyze = systemd_analyze()
    units = systemd.render_units(_settings(), mode="system", exe=str(tmp_path / "no" / "milton"))
    dest = tmp_path / "bad"
    _write({systemd.NOTIFY_TEMPLATE: units[systemd.NOTIFY_TEMPLATE]}, dest)
    proc = _verify(analyze, [dest / "milton-notify@milton-ingest.service.service"], "system", tmp_path)
    assert proc.returncode != 0
    assert "milton" in proc.stderr


def test_systemd_analyze_verify_catches_breakage(home, tmp_path):
    """The verify test above can fail: a missing ExecStart binary is reported."""
    analyze = systemd_analyze()
    units = systemd.render_units(_settings(), mode="system", exe=str(tmp_path / "no" / "milton"))
    (path,) = _write({"milton-ingest.service": units["milton-ingest.service"]}, tmp_path / "bad")
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "milton" in proc.stderr


def test_systemd_analyze_calendar(home, exe):
    analyze = systemd_analyze()
    units = systemd.render_units(_settings(), exe=exe)
    values = {name: v for name, text in units.items() for v in _keys(text).get("OnCalendar", [])}
    limits = {"milton-ingest.timer": 300, "milton-train-anomaly.timer": 3600,
              "milton-ingest-documents.timer": 6 * 3600, "milton-compress-memory.timer": 7 * 86400,
              "milton-backup.timer": 7 * 86400, "milton-check.timer": 86400,
              "milton-train-lora.timer": 86400, "milton-evolve.timer": 31 * 86400,
              "milton-agent.timer": 300, "milton-briefing.timer": 86400}
    assert set(values) == set(limits)
    env = {**os.environ, "TZ": "UTC", "LC_ALL": "C"}
    for name, value in values.items():
        before = datetime.now(timezone.utc).replace(microsecond=0)
        proc = subprocess.run([analyze, "calendar", value], capture_output=True, text=True,
                              env=env, timeout=30)
        assert proc.returncode == 0, f"{name}: {value}: {proc.stderr}"
        m = re.search(r"Next elapse:\s+\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", proc.stdout)
        assert m, proc.stdout
        nxt = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        delta = (nxt - before).total_seconds()
        limit = limits[name]
        assert 0 < delta <= limit, f"{name}: next elapse {nxt} is {delta}s away"
        if name == "milton-compress-memory.timer":
            assert nxt.weekday() == 6 and (nxt.hour, nxt.minute) == (2, 0), nxt
        if name == "milton-backup.timer":
            assert nxt.weekday() == 6 and (nxt.hour, nxt.minute) == (3, 0), nxt
        if name == "milton-check.timer":
            assert (nxt.hour, nxt.minute, nxt.second) == (9, 0, 0), nxt
        if name == "milton-train-lora.timer":
            assert (nxt.hour, nxt.minute, nxt.second) == (2, 0, 0), nxt
        if name == "milton-evolve.timer":
            assert (nxt.day, nxt.hour, nxt.minute, nxt.second) == (1, 3, 0, 0), nxt
        if name == "milton-briefing.timer":  # the last of its two calendars
            assert (nxt.hour, nxt.minute, nxt.second) == (20, 0, 0), nxt
        if name == "milton-agent.timer":  # off the ingest timer's minutes
            assert nxt.minute % 5 == 2 and nxt.second == 0, nxt


# -- CLI ----------------------------------------------------------------------------------
def test_cli_install_dry_run_writes_nothing(home, tmp_path, exe):
    runner = CliRunner()
    result = runner.invoke(milton.cli.app, ["systemd", "install", "--user", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "OnCalendar=*:0/5" in result.output
    assert "SuccessExitStatus=75" in result.output
    assert "enable --now " + " ".join(systemd.TIMERS) in result.output
    assert len(systemd.TIMERS) == len(CALENDARS)
    assert not (tmp_path / "xdg").exists()
    assert not (home / "data").exists()
    # Printed verbatim (no re-wrapping to the terminal width), so it can be copied.
    for text in systemd.render_units(_settings()).values():
        assert text in result.output


def test_cli_install_and_uninstall_user(home, tmp_path, monkeypatch, exe):
    # Make systemctl fail the way it does without a running systemd, whatever the host has.
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    systemctl = fake_bin / "systemctl"
    systemctl.write_text("#!/bin/sh\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n")
    systemctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    runner = CliRunner()
    result = runner.invoke(milton.cli.app, ["systemd", "install", "--user"])
    assert result.exit_code == 0, result.output
    dest = tmp_path / "xdg" / "systemd" / "user"
    assert {p.name for p in dest.iterdir()} == UNIT_NAMES
    assert "OnCalendar=*:0/5" in (dest / "milton-ingest.timer").read_text()
    assert "warning" in result.output
    assert "systemctl --user daemon-reload" in result.output
    assert "systemctl --user enable --now " + " ".join(systemd.TIMERS) in result.output
    assert "loginctl enable-linger" in result.output
    assert (home / "data").is_dir() and (home / "checkpoints").is_dir()

    status = runner.invoke(milton.cli.app, ["systemd", "status", "--user"])
    assert status.exit_code == 0, status.output
    assert "milton-ingest.timer: installed" in status.output

    result = runner.invoke(milton.cli.app, ["systemd", "uninstall", "--user"])
    assert result.exit_code == 0, result.output
    assert list(dest.iterdir()) == []
    assert "systemctl --user disable --now" in result.output
    assert "systemctl --user daemon-reload" in result.output
    assert "removed anyway" in result.output


def test_real_systemctl_failure_is_a_warning(home, tmp_path, exe):
    """With whatever systemctl this host has (usually none running in a container)."""
    if Path("/run/systemd/system").exists():
        pytest.skip("a live systemd would really enable the timers; covered with a fake systemctl")
    outcome = systemd.install(_settings(), "user", exe=exe)
    assert len(outcome.written) == len(UNIT_NAMES)
    if not outcome.systemctl_ok:
        assert outcome.failed[0][0][:2] == ["systemctl", "--user"]
    systemd.uninstall(None, "user")
    assert not any((tmp_path / "xdg" / "systemd" / "user").iterdir())


def test_system_mode_needs_root(home, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    runner = CliRunner()
    result = runner.invoke(milton.cli.app, ["systemd", "install", "--system"])
    assert isinstance(result.exception, InputError)
    assert result.exception.exit_code == 2
    assert "root" in str(result.exception)
    # A dry run is harmless and allowed.
    result = runner.invoke(milton.cli.app, ["systemd", "install", "--system", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "/etc/systemd/system/milton-serve.service" in result.output
    assert "WantedBy=multi-user.target" in result.output


def test_train_lora_memory_cap_comes_from_config(home, exe, monkeypatch):
    units = systemd.render_units(_settings(), exe=exe)
    assert _keys(units["milton-train-lora.service"])["MemoryMax"] == ["8G"]
    assert "MemoryMax" not in _keys(units["milton-ingest.service"])
    monkeypatch.setenv("MILTON_TRAIN__MEMORY_MAX", "3G")
    units = systemd.render_units(_settings(), exe=exe)
    assert _keys(units["milton-train-lora.service"])["MemoryMax"] == ["3G"]
    assert _keys(units["milton-evolve.service"])["MemoryMax"] == ["12G"]
    monkeypatch.setenv("MILTON_EVOLVE__MEMORY_MAX", "6G")
    units = systemd.render_units(_settings(), exe=exe)
    assert _keys(units["milton-evolve.service"])["MemoryMax"] == ["6G"]


def test_install_enables_serve_unless_told_not_to(home, tmp_path, exe):
    """Live scoring and alert delivery need serve: the installer enables it by default."""
    runner = CliRunner()
    result = runner.invoke(milton.cli.app, ["systemd", "install", "--user", "--dry-run"])
    assert result.exit_code == 0, result.output
    enable = [line for line in result.output.splitlines() if "enable --now" in line]
    assert len(enable) == 1 and enable[0].rstrip().endswith(systemd.SERVE)
    result = runner.invoke(milton.cli.app, ["systemd", "install", "--user", "--dry-run", "--no-serve"])
    assert result.exit_code == 0, result.output
    enable = [line for line in result.output.splitlines() if "enable --now" in line]
    assert len(enable) == 1 and systemd.SERVE not in enable[0]
    assert systemd.install(_settings(), "user", dry_run=True).commands[-1][-1] == systemd.SERVE
