"""Which archives there are, and which to keep: listing (with the last verification's
outcome), resolving ``latest`` or a name, and grandfather-father-son retention (the last N,
one a day, a week and a month)."""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from milton.core.config import BackupConfig, Settings
from milton.core.errors import InputError
from milton.core.fsio import fsync_dir
from milton.core.timeutil import iso
from milton.ops.backup.archive import (
    ArchiveError,
    BackupError,
    load_state,
    parse_name,
    read_manifest,
    rows_total,
)


@dataclass
class BackupInfo:
    name: str
    path: Path
    created: datetime  # tz-aware UTC, from the name (the manifest says the same)
    size_bytes: int
    label: str | None
    manifest: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    #: "failed" when the last verification failed and the file is unchanged since (size and
    #: mtime), else None: a cache of a past read never vouches for the bytes now.
    verified: str | None = None
    #: when the file was last re-read in full and matched (None: never, or changed since).
    last_verified_ok: str | None = None
    error: str | None = None  # why the manifest could not be read

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": str(self.path), "created": iso(self.created),
            "size_bytes": self.size_bytes, "label": self.label,
            "schema_version": self.manifest.get("schema_version"),
            "milton_version": self.manifest.get("milton_version"),
            "rows_total": rows_total(self.manifest),
            "verified": self.verified, "last_verified_ok": self.last_verified_ok,
            "error": self.error,
        }


def list_backups(settings: Settings) -> list[BackupInfo]:
    """Archives in the backup directory, oldest first; temp files and other names are ignored."""
    directory = settings.backup.dir
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise BackupError(f"{directory}: cannot list backups: {exc.strerror}") from None
    state = load_state(directory)
    infos: list[BackupInfo] = []
    for path in entries:
        parsed = parse_name(path.name)
        if parsed is None:
            continue
        created, seq, label = parsed
        try:
            st = path.stat()
        except OSError:  # pruned meanwhile
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        info = BackupInfo(name=path.name, path=path, created=created, size_bytes=st.st_size,
                          label=label, seq=seq)
        try:
            info.manifest = read_manifest(path)
        except ArchiveError as exc:
            info.error = str(exc)
        record = state.get(path.name)
        if isinstance(record, dict) and record.get("size") == st.st_size \
                and record.get("mtime_ns") == st.st_mtime_ns:
            # Size and mtime can be kept while bytes change (bit rot, an in-place edit): the
            # record only says when the data was last read, never that it is ok now.
            if record.get("ok"):
                info.last_verified_ok = str(record.get("at") or "") or None
            else:
                info.verified = "failed"
        infos.append(info)
    infos.sort(key=lambda i: (i.created, i.seq, i.name))
    return infos


def resolve_archive(settings: Settings, spec: str) -> Path:
    """A path, a name in the backup directory, or ``latest``."""
    if spec == "latest":
        infos = [i for i in list_backups(settings) if i.error is None]
        if not infos:
            raise InputError(f"latest: no readable backups in {settings.backup.dir}")
        return infos[-1].path
    candidates = [Path(spec).expanduser()]
    if "/" not in spec:
        candidates.append(settings.backup.dir / spec)
    for path in candidates:
        if path.is_file():
            if path.name.startswith(".") or path.parent.name.endswith(".partial"):
                raise ArchiveError(f"{path}: an unfinished backup (temp file), not an archive")
            return path.resolve()
    raise InputError(f"{spec}: no such backup (see `milton backup list`)")


# -- retention -------------------------------------------------------------------------------
def select_kept(infos: list[BackupInfo], cfg: BackupConfig,
                protect: set[str] | frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """{name: reasons} of the archives to keep. Unreadable archives are left out of the
    count; :func:`prune_backups` never deletes them either (see ``milton backup list``)."""
    readable = sorted((i for i in infos if i.error is None),
                      key=lambda i: (i.created, i.seq, i.name), reverse=True)
    kept: dict[str, list[str]] = {}
    for info in readable[: cfg.keep_last]:
        kept.setdefault(info.name, []).append("last")
    rules: list[tuple[str, int, Callable[[datetime], Any]]] = [
        ("daily", cfg.keep_daily, lambda d: d.date()),
        ("weekly", cfg.keep_weekly, lambda d: tuple(d.isocalendar())[:2]),
        ("monthly", cfg.keep_monthly, lambda d: (d.year, d.month)),
    ]
    for rule, count, period in rules:
        seen: set[Any] = set()
        for info in readable:
            if len(seen) >= count:
                break
            key = period(info.created)
            if key in seen:
                continue
            seen.add(key)
            kept.setdefault(info.name, []).append(rule)
    for name in protect:
        kept.setdefault(name, []).append("new")
    return kept


def prune_backups(settings: Settings, *, protect: set[str] | frozenset[str] = frozenset(),
                  dry_run: bool = False) -> list[str]:
    """Delete readable archives no retention rule keeps; return their names."""
    infos = list_backups(settings)
    kept = select_kept(infos, settings.backup, protect)
    doomed = [i for i in infos if i.error is None and i.name not in kept]
    if dry_run:
        return [i.name for i in doomed]
    removed = []
    for info in doomed:
        try:
            info.path.unlink()
            removed.append(info.name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BackupError(f"{info.path}: cannot delete an old backup: {exc.strerror}") from None
    if removed:
        fsync_dir(settings.backup.dir)
    return removed
