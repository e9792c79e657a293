"""Render, install and remove Milton's systemd units and timers.

Templates live in the repo-root ``systemd/`` folder (shipped in the wheel as
``milton/_systemd``) and use ``str.format`` placeholders: ``{exe}``, ``{config}``,
``{home}``, ``{env_home}``, ``{rw_paths}``, ``{data_dir}``, ``{checkpoints_dir}``,
``{wanted_by}``, ``{train_memory_max}``, ``{evolve_memory_max}``. Units contain no literal braces.

Every function here is plain and importable; ``milton systemd ...`` is a thin wrapper.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import milton
from milton.core.config import Settings
from milton.core.errors import InputError, MiltonError
from milton.core.fsio import atomic_write_bytes

MODES = ("user", "system")
SERVE = "milton-serve.service"
NOTIFY_TEMPLATE = "milton-notify@.service"
LINGER_NOTE = (
    "note: user timers only run while you are logged in unless lingering is on: "
    "loginctl enable-linger $USER"
)

Printer = Callable[[str], None]


def template_dir() -> Path:
    """``milton/_systemd`` in an installed wheel, else the source checkout's ``systemd/``."""
    packaged = Path(milton.__file__).parent / "_systemd"
    if packaged.is_dir():
        return packaged
    return Path(milton.__file__).parents[1] / "systemd"


def template_names(tdir: Path | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every unit file name, the timers), read from the template folder.

    Adding a scheduled job is dropping a ``milton-NAME.service``/``.timer`` pair in
    ``systemd/``: install, uninstall, status and ``milton schedule`` all pick it up.
    """
    tdir = tdir or template_dir()
    try:
        names = sorted(p.name for p in tdir.iterdir()
                       if p.name.startswith("milton-") and p.suffix in (".service", ".timer"))
    except OSError as exc:
        raise MiltonError(f"{tdir}: cannot list unit templates: {exc.strerror}") from None
    timers = tuple(n for n in names if n.endswith(".timer"))
    return tuple(names), timers


#: Every unit file and the timers, as shipped (read once from the template folder).
UNITS, TIMERS = template_names()


def job_services(tdir: Path | None = None) -> tuple[str, ...]:
    """Services started by a timer (oneshot jobs), in template order."""
    return tuple(t.removesuffix(".timer") + ".service" for t in template_names(tdir)[1])


def unit_dir(mode: str) -> Path:
    _check_mode(mode)
    if mode == "system":
        return Path("/etc/systemd/system")
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "systemd" / "user"


def default_exe() -> str:
    """Absolute path of the ``milton`` executable that systemd should run."""
    beside = Path(sys.executable).parent / "milton"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("milton")
    if found:
        return str(Path(found).absolute())
    return str(beside.absolute())


# -- quoting ------------------------------------------------------------------------------
def _escape(value: str) -> str:
    """Escape for a systemd unit value: % starts a specifier, so double it."""
    if "\n" in value:
        raise InputError(f"path contains a newline, cannot put it in a unit file: {value!r}")
    return value.replace("%", "%%")


def _quote(value: str) -> str:
    """One word, double-quoted (C-style escapes), with % doubled."""
    inner = _escape(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{inner}"'


def _word(value: str) -> str:
    """Quote only if needed, so the common case reads naturally."""
    plain = all(c not in value for c in ' \t"\'\\;$')
    return _escape(value) if plain and value else _quote(value)


def _backup_dir(settings: Settings) -> Path | None:
    """Where ``milton backup`` writes: writable for the units even when outside home."""
    backup = getattr(settings, "backup", None)
    directory = getattr(backup, "dir", None)
    if directory is None:
        return None
    directory = Path(directory).expanduser()
    return directory if directory.is_absolute() else (settings.paths.home / directory).resolve()


def render_units(
    settings: Settings,
    *,
    mode: str = "user",
    exe: str | None = None,
    config_file: Path | None = None,
) -> dict[str, str]:
    """Unit file name -> rendered text, for ``mode`` ("user" or "system")."""
    _check_mode(mode)
    exe_path = str(Path(exe).absolute()) if exe else default_exe()
    home = settings.paths.home
    rw = []
    for p in (settings.paths.data_dir, settings.paths.checkpoints_dir, home, _backup_dir(settings)):
        if p is not None and str(p) not in rw:
            rw.append(str(p))
    values = {
        "exe": _word(exe_path),
        "config": f" --config {_word(str(Path(config_file).expanduser().absolute()))}" if config_file else "",
        "home": _escape(str(home)),
        "env_home": _quote(f"MILTON_HOME={home}"),
        # "-" prefix: a missing directory is not an error (install creates them anyway).
        "rw_paths": " ".join(_quote(f"-{p}") for p in rw),
        "data_dir": _escape(str(settings.paths.data_dir)),
        "checkpoints_dir": _escape(str(settings.paths.checkpoints_dir)),
        "wanted_by": "default.target" if mode == "user" else "multi-user.target",
        "train_memory_max": settings.train.memory_max,
        "evolve_memory_max": settings.evolve.memory_max,
    }
    tdir = template_dir()
    rendered: dict[str, str] = {}
    for name in template_names(tdir)[0]:
        path = tdir / name
        try:
            template = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise MiltonError(f"{path}: cannot read unit template: {exc.strerror}") from None
        rendered[name] = template.format(**values)
    return rendered


# -- systemctl ----------------------------------------------------------------------------
@dataclass
class Outcome:
    """What an install/uninstall did, for the CLI and for tests."""

    unit_dir: Path
    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    failed: list[tuple[list[str], str]] = field(default_factory=list)  # (command, reason)

    @property
    def systemctl_ok(self) -> bool:
        return not self.failed


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"mode must be 'user' or 'system', not {mode!r}")


def _require_root(mode: str) -> None:
    if mode == "system" and hasattr(os, "geteuid") and os.geteuid() != 0:
        raise InputError("--system installs into /etc/systemd/system and needs root; "
                         "rerun with sudo, or use --user")


def _systemctl(mode: str, *args: str) -> list[str]:
    return ["systemctl", *(["--user"] if mode == "user" else []), *args]


def _run(cmd: list[str], timeout: float = 30.0) -> tuple[bool, str]:
    """Run a command; (ok, combined output or the reason it could not run)."""
    if shutil.which(cmd[0]) is None:
        return False, f"{cmd[0]} not found"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return False, text.splitlines()[-1] if text else f"exit status {proc.returncode}"
    return True, text


def _run_all(outcome: Outcome, cmds: list[list[str]]) -> None:
    outcome.commands = cmds
    for i, cmd in enumerate(cmds):
        ok, why = _run(cmd)
        if not ok:
            # Stop at the first failure: later commands depend on it (daemon-reload first).
            outcome.failed = [(c, why if c is cmd else "not run") for c in cmds[i:]]
            return


def _noop(_: str) -> None:
    pass


def install(
    settings: Settings,
    mode: str = "user",
    dry_run: bool = False,
    *,
    serve: bool = True,
    exe: str | None = None,
    config_file: Path | None = None,
    target_dir: Path | None = None,
    run_systemctl: bool = True,
    echo: Printer = _noop,
) -> Outcome:
    """Write the units (atomically), daemon-reload and enable --now the timers and, unless
    ``serve=False``, milton-serve.service: live scoring and alert delivery need it running.

    systemctl trouble (missing, no systemd running) is reported in ``Outcome.failed``,
    never raised: the files are written and the caller prints the commands to run.
    """
    _check_mode(mode)
    if not dry_run:
        _require_root(mode)
    units = render_units(settings, mode=mode, exe=exe, config_file=config_file)
    dest = Path(target_dir) if target_dir else unit_dir(mode)
    outcome = Outcome(unit_dir=dest)
    enable = [*template_names()[1], *([SERVE] if serve else [])]
    cmds = [_systemctl(mode, "daemon-reload"), _systemctl(mode, "enable", "--now", *enable)]
    if dry_run:
        for name, text in units.items():
            echo(f"# --- {dest / name}\n{text}")
        outcome.commands = cmds
        return outcome
    for d in (settings.paths.home, settings.paths.data_dir, settings.paths.checkpoints_dir):
        d.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        path = dest / name
        atomic_write_bytes(path, text.encode("utf-8"))
        path.chmod(0o644)
        outcome.written.append(path)
    if run_systemctl:
        _run_all(outcome, cmds)
    else:
        outcome.commands = cmds
    return outcome


def uninstall(
    settings: Settings | None = None,
    mode: str = "user",
    dry_run: bool = False,
    *,
    target_dir: Path | None = None,
    run_systemctl: bool = True,
) -> Outcome:
    """disable --now every milton unit, remove the files, daemon-reload."""
    _check_mode(mode)
    if not dry_run:
        _require_root(mode)
    dest = Path(target_dir) if target_dir else unit_dir(mode)
    outcome = Outcome(unit_dir=dest)
    units, timers = template_names()
    present = [name for name in units if (dest / name).exists()]
    disable = [n for n in (*timers, SERVE) if n in present] or [*timers, SERVE]
    cmds = [_systemctl(mode, "disable", "--now", *disable)]
    if dry_run:
        outcome.removed = [dest / n for n in present]
        outcome.commands = [*cmds, _systemctl(mode, "daemon-reload")]
        return outcome
    if run_systemctl and present:
        _run_all(outcome, cmds)
    for name in present:
        (dest / name).unlink(missing_ok=True)
        outcome.removed.append(dest / name)
    reload_cmd = _systemctl(mode, "daemon-reload")
    if run_systemctl and present:
        outcome.commands.append(reload_cmd)
        if outcome.systemctl_ok:
            ok, why = _run(reload_cmd)
            if not ok:
                outcome.failed.append((reload_cmd, why))
        else:
            outcome.failed.append((reload_cmd, "not run"))
    elif present:
        outcome.commands = [*cmds, reload_cmd]
    return outcome


@dataclass
class Status:
    unit_dir: Path
    installed: dict[str, bool]
    systemctl: str | None  # list-timers / is-active output, None when unavailable
    reason: str | None = None


def status(mode: str = "user", *, target_dir: Path | None = None) -> Status:
    """Which unit files exist, and ``systemctl list-timers`` for milton units if possible."""
    _check_mode(mode)
    dest = Path(target_dir) if target_dir else unit_dir(mode)
    installed = {name: (dest / name).exists() for name in template_names()[0]}
    ok, text = _run(_systemctl(mode, "list-timers", "--all", "--no-pager", "milton-*"))
    if not ok:
        return Status(dest, installed, None, text)
    ok2, serve_state = _run(_systemctl(mode, "is-active", SERVE))
    # is-active exits non-zero for inactive units; the word is still what we want to show.
    serve_line = f"{SERVE}: {serve_state.strip() or 'unknown'}"
    return Status(dest, installed, f"{text}\n\n{serve_line}", None)


def shell_line(cmd: list[str]) -> str:
    import shlex

    return shlex.join(cmd)
