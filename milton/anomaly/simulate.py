"""A simulated workstation, for tests, benchmarks and `milton demo`-style replays.

It produces realistic-looking process snapshots: always-on system and desktop processes,
working-hours applications, a common and a long tail of short-lived commands, a weekly
backup, plus whatever tools or odd processes a scenario adds at chosen times.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Proc:
    name: str
    exe: str | None = None
    user: str = "alice"
    rss_mb: float = 50.0
    cpu: float = 0.5
    # Names of possible parents: the first one present in the snapshot is used (when several
    # are given, a deterministic pick by time spreads the sightings); None means init.
    parent: tuple[str, ...] | str | None = None


SYSTEM = [Proc(n, f"/usr/lib/systemd/{n}" if n.startswith("systemd") else f"/usr/sbin/{n}",
               "root", rss, cpu) for n, rss, cpu in [
    ("systemd", 12, 0.1), ("systemd-journald", 40, 0.2), ("systemd-udevd", 8, 0.05),
    ("systemd-logind", 7, 0.02), ("systemd-resolved", 12, 0.05), ("dbus-daemon", 6, 0.1),
    ("NetworkManager", 20, 0.2), ("sshd", 8, 0.01), ("cron", 3, 0.01), ("rsyslogd", 5, 0.02),
    ("polkitd", 9, 0.01), ("udisksd", 12, 0.02), ("accounts-daemon", 7, 0.01),
    ("cupsd", 10, 0.01), ("containerd", 45, 0.3), ("dockerd", 80, 0.4), ("thermald", 6, 0.02),
    ("irqbalance", 4, 0.02), ("ModemManager", 11, 0.01), ("avahi-daemon", 4, 0.01),
]]
DESKTOP = [Proc(n, f"/usr/bin/{n}", "alice", rss, cpu) for n, rss, cpu in [
    ("gnome-shell", 350, 3.0), ("Xwayland", 90, 1.0), ("pipewire", 18, 0.5),
    ("wireplumber", 14, 0.1), ("gnome-terminal-server", 60, 0.4), ("bash", 5, 0.0),
    ("tracker-miner-fs-3", 40, 0.3), ("evolution-data-server", 30, 0.05),
]]
WORK_APPS = [Proc(n, f"/usr/bin/{n}", "alice", rss, cpu) for n, rss, cpu in [
    ("firefox", 900, 8.0), ("code", 700, 5.0), ("slack", 400, 2.0), ("thunderbird", 300, 1.0),
]]
# Short-lived commands, most used first: usage follows a Zipf law, as shell histories do.
# Started from the shell, some from the editor's terminal or tasks as well.
_EDITOR_TOO = {"git", "python3", "node", "npm", "pytest", "rg", "make", "cargo"}
COMMANDS = [Proc(n, f"/usr/bin/{n}", "alice", 10, 15.0,
                 ("bash", "code") if n in _EDITOR_TOO else "bash") for n in [
    "git", "python3", "make", "gcc", "cc1", "ld", "grep", "ls", "less", "vim", "ssh", "curl",
    "node", "npm", "pytest", "rg", "find", "sed", "awk", "tar",
    "gdb", "strace", "valgrind", "rsync", "scp", "htop", "top", "dig", "nmap", "ping",
    "traceroute", "tcpdump", "lsof", "iotop", "perf", "cargo", "rustc", "go", "javac", "java",
    "mvn", "gradle", "docker", "kubectl", "helm", "terraform", "ansible", "psql", "sqlite3",
    "redis-cli", "ffmpeg", "convert", "gimp", "inkscape", "libreoffice", "evince", "eog",
    "zip", "unzip", "7z", "gpg", "openssl", "keepassxc", "zoom", "vlc", "obs", "blender-old",
    "pandoc", "latexmk", "pdflatex", "dot", "jq", "yq", "watch", "tmux", "screen", "man",
    "apt", "dpkg", "snap", "flatpak",
]]
BACKUP = Proc("restic", "/usr/bin/restic", "root", 200, 60.0)


@dataclass
class Workstation:
    host: str = "ws1"
    seed: int = 0
    top_p: float = 0.25  # chance the most used command shows in a working-hours snapshot
    zipf_s: float = 1.1
    tools: list[tuple[Proc, float, float]] = field(default_factory=list)  # (proc, start, end)
    injected: dict[float, list[Proc]] = field(default_factory=dict)  # ts -> procs
    extra_working: list[Proc] = field(default_factory=list)  # more working-hours applications
    extra_commands: list[tuple[Proc, float]] = field(default_factory=list)  # (proc, chance)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        ranks = np.arange(1, len(COMMANDS) + 1)
        self.command_p = self.top_p / ranks**self.zipf_s

    def use_tool(self, proc: Proc, start: float, end: float) -> None:
        """Run ``proc`` during working hours between ``start`` and ``end`` (epoch seconds)."""
        self.tools.append((proc, start, end))

    def inject(self, ts: float, proc: Proc) -> None:
        self.injected.setdefault(ts, []).append(proc)

    def processes_at(self, ts: float) -> list[Proc]:
        hour = int(ts // 3600) % 24
        weekday = int(ts // 86400 + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
        working = weekday < 5 and 8 <= hour < 19
        procs = list(SYSTEM) + list(DESKTOP)
        if working:
            procs += WORK_APPS
        rng = self.rng
        scale = 1.0 if working else 0.1
        draws = rng.random(len(COMMANDS))
        procs += [p for p, r, q in zip(COMMANDS, draws, self.command_p) if r < q * scale]
        if working:
            procs += self.extra_working
        if self.extra_commands:
            extra = rng.random(len(self.extra_commands))
            procs += [p for (p, q), r in zip(self.extra_commands, extra) if r < q * scale]
        if weekday == 6 and hour == 2:
            procs.append(BACKUP)
        for proc, start, end in self.tools:
            if start <= ts < end and 9 <= hour < 18:
                procs.append(proc)
        procs += self.injected.get(ts, [])
        return procs

    def snapshot(self, ts: float) -> list[tuple]:
        """Rows in ``milton.ingest.processes.COLUMNS`` order for one snapshot at ``ts``."""
        sid = str(uuid.UUID(int=int(self.rng.integers(0, 2**63)) << 64 | int(ts)))
        rows = []
        procs = self.processes_at(ts)
        noise = self.rng.lognormal(0.0, 0.15, size=(len(procs), 2))
        pids: dict[str, int] = {}
        for pid, proc in enumerate(procs, start=100):
            pids.setdefault(proc.name, pid)
        for pid, (proc, (a, b)) in enumerate(zip(procs, noise.tolist()), start=100):
            rows.append((sid, self.host, float(ts), pid, _ppid(proc, pids, ts), proc.name,
                         proc.exe, proc.user, round(proc.cpu * b, 3),
                         int(proc.rss_mb * a * 1048576), ts - 3600.0))
        return rows


def _ppid(proc: Proc, pids: dict[str, int], ts: float) -> int:
    """The pid of the process's parent in this snapshot (1, init, when none is running)."""
    if proc.parent is None:
        return 1
    if isinstance(proc.parent, str):
        return pids.get(proc.parent, 1)
    present = [pids[p] for p in proc.parent if p in pids]
    if not present:
        return 1
    return present[(int(ts // 3600) * 7 + len(proc.name)) % len(present)]


# -- a small fleet: a workstation with an office suite and a web/database server -------------
OFFICE = Proc("soffice.bin", "/usr/lib/libreoffice/program/soffice.bin", "alice", 250, 2.0,
              "gnome-shell")
SH = Proc("sh", "/usr/bin/sh", "alice", 2, 0.1, "bash")
SERVER_SYSTEM = [p for p in SYSTEM if p.name in {
    "systemd", "systemd-journald", "systemd-udevd", "systemd-logind", "systemd-resolved",
    "dbus-daemon", "sshd", "cron", "rsyslogd", "polkitd", "containerd", "irqbalance"}]
SERVER_ALWAYS = [
    Proc("nginx", "/usr/sbin/nginx", "root", 12, 0.05, "systemd"),
    *[Proc("nginx", "/usr/sbin/nginx", "www-data", 30, 1.5, "nginx")] * 2,
    Proc("php-fpm8.2", "/usr/sbin/php-fpm8.2", "root", 25, 0.05, "systemd"),
    *[Proc("php-fpm8.2", "/usr/sbin/php-fpm8.2", "www-data", 60, 4.0, "php-fpm8.2")] * 3,
    Proc("postgres", "/usr/lib/postgresql/16/bin/postgres", "postgres", 120, 0.5, "systemd"),
    *[Proc("postgres", "/usr/lib/postgresql/16/bin/postgres", "postgres", 40, 1.0, "postgres")] * 4,
    Proc("redis-server", "/usr/bin/redis-server", "redis", 30, 0.3, "systemd"),
]
# (process, chance per snapshot): cron jobs run shells as root and as www-data; an admin
# logs in now and then.
SERVER_COMMANDS = [
    (Proc("sh", "/usr/bin/sh", "root", 2, 0.1, "cron"), 0.5),
    (Proc("sh", "/usr/bin/sh", "www-data", 2, 0.1, "cron"), 0.4),
    (Proc("php", "/usr/bin/php8.2", "www-data", 40, 20.0, "sh"), 0.3),
    (Proc("logrotate", "/usr/sbin/logrotate", "root", 5, 1.0, "sh"), 0.05),
    (Proc("bash", "/usr/bin/bash", "admin", 5, 0.0, "sshd"), 0.15),
    (Proc("psql", "/usr/bin/psql", "postgres", 10, 0.5, "bash"), 0.05),
    (Proc("vim", "/usr/bin/vim", "admin", 10, 0.2, "bash"), 0.05),
    (Proc("htop", "/usr/bin/htop", "admin", 5, 1.0, "bash"), 0.05),
]


@dataclass
class Server(Workstation):
    """A web and database server: daemons always on, cron shells, an occasional admin login."""

    host: str = "srv1"

    def processes_at(self, ts: float) -> list[Proc]:
        hour = int(ts // 3600) % 24
        procs = list(SERVER_SYSTEM) + list(SERVER_ALWAYS)
        draws = self.rng.random(len(SERVER_COMMANDS))
        busy = 1.0 if 7 <= hour < 20 else 0.5
        procs += [p for (p, q), r in zip(SERVER_COMMANDS, draws) if r < q * busy]
        procs += self.injected.get(ts, [])
        return procs


def fleet(seed: int = 0) -> list[Workstation]:
    """Two hosts: ``ws1`` (a desktop with an office suite) and ``srv1`` (nginx, PHP, Postgres)."""
    ws = Workstation(host="ws1", seed=seed, extra_working=[OFFICE], extra_commands=[(SH, 0.3)])
    return [ws, Server(host="srv1", seed=seed + 1)]
