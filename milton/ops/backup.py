"""Backups: one versioned archive of the store, the current and pinned models and the config.

``backups/milton-<UTC timestamp>[.<n>][-<label>].tar[.gz]`` holds, in this order:

* ``manifest.json`` (first, so listing archives reads only their first block): format and
  Milton versions, creation time, label, schema version and migrations, row counts per table,
  sha256 and size of every other member, and per model kind which version was current and
  which were pinned;
* ``data/<store file>``: a copy of the SQLite store made with SQLite's online backup API in
  one step (one read transaction over a WAL database: a consistent snapshot that never blocks
  the writers, who keep going while it runs), switched to rollback-journal mode so the file
  stands alone, and passed ``PRAGMA integrity_check`` before anything is archived;
* ``config.toml`` when a config file is in use;
* ``checkpoints/<kind>/<version>/...`` for every kind's current and pinned versions.

An archive is built in a hidden staging directory in the backup directory
(``.milton-backup-<id>.partial/``, which also holds the database copy, so a full backup disk
never fills the data disk), fsynced, read back and re-hashed, and only then renamed into
place (and the directory fsynced). A crash or ``kill -9`` leaves only the staging directory,
which listing and verification ignore and the next backup removes. Retention runs only after
the new archive is in place and never deletes it.

Restore (:mod:`milton.ops.restore`) verifies an archive and swaps it in.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from milton import __version__
from milton.core.artifacts import ArtifactStore, known_kinds, sha256_file
from milton.core.config import BackupConfig, Settings, default_config_path
from milton.core.errors import ArtifactError, InputError, MiltonError
from milton.core.fsio import atomic_write_json, fsync_dir, fsync_file
from milton.core.timeutil import iso, utcnow

FORMAT = 1
MANIFEST = "manifest.json"
CONFIG_MEMBER = "config.toml"
PRE_RESTORE = "pre-restore"
STATE_FILE = ".verify-state.json"
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
MAX_CONFIG_BYTES = 4 << 20

_NAME_RE = re.compile(
    r"^milton-(?P<ts>\d{8}T\d{6}Z)(?:\.(?P<seq>\d+))?(?:-(?P<label>[a-z0-9][a-z0-9-]*))?"
    r"\.(?P<ext>tar|tar\.gz)$"
)
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_STAGING_RE = re.compile(r"^\.milton-[a-z]+-[0-9a-f]{32}\.partial$")
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

#: progress(phase, done, total): called as work advances (bytes; total None = unknown).
Progress = Callable[[str, int, "int | None"], None]


class BackupError(MiltonError):
    """A backup or restore could not be completed; nothing was half-written."""


class ArchiveError(BackupError):
    """An archive is unreadable, incomplete, or does not match its manifest."""


# -- names and listing ---------------------------------------------------------------------
@dataclass
class BackupInfo:
    name: str
    path: Path
    created: datetime  # tz-aware UTC, from the name (the manifest says the same)
    size_bytes: int
    label: str | None
    manifest: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    verified: str | None = None  # "ok", "failed" or None (not verified since last change)
    error: str | None = None  # why the manifest could not be read

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": str(self.path), "created": iso(self.created),
            "size_bytes": self.size_bytes, "label": self.label,
            "schema_version": self.manifest.get("schema_version"),
            "milton_version": self.manifest.get("milton_version"),
            "rows_total": sum((self.manifest.get("rows") or {}).values()),
            "verified": self.verified, "error": self.error,
        }


def parse_name(name: str) -> tuple[datetime, int, str | None] | None:
    match = _NAME_RE.match(name)
    if not match:
        return None
    created = datetime.strptime(match["ts"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return created, int(match["seq"] or 0), match["label"]


def archive_name(created: datetime, label: str | None, compression: str, seq: int = 0) -> str:
    stamp = created.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    ext = "tar.gz" if compression == "gz" else "tar"
    return f"milton-{stamp}{f'.{seq}' if seq else ''}{f'-{label}' if label else ''}.{ext}"


def check_label(label: str | None) -> str | None:
    if label is None:
        return None
    if not _LABEL_RE.match(label):
        raise InputError(f"--label: {label!r}: use 1-40 lowercase letters, digits and '-'")
    return label


def _open_stream(raw) -> Any:
    """The decompressed byte stream of an archive (gzip detected by magic, not by name)."""
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an archive, reading only its first member."""
    try:
        with open(path, "rb") as raw, _open_stream(raw) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:
            first = tar.next()
            return _load_manifest(tar, first, path.name)
    except ArchiveError:
        raise
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or exc.filename:
            raise ArchiveError(f"{path}: cannot read: {exc.strerror}") from None
        raise ArchiveError(f"{path.name}: not a readable archive ({_why(exc)})") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{path.name}: not a readable archive ({_why(exc)})") from None


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line


def _load_manifest(tar: tarfile.TarFile, first: tarfile.TarInfo | None, name: str) -> dict[str, Any]:
    if first is None or first.name != MANIFEST or not first.isfile():
        raise ArchiveError(f"{name}: not a Milton backup ({MANIFEST} is not its first member)")
    if first.size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{name}: {MANIFEST} is implausibly large ({first.size} bytes)")
    handle = tar.extractfile(first)
    assert handle is not None
    data = handle.read()
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{name}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) \
            or not isinstance(manifest.get("format"), int):
        raise ArchiveError(f"{name}: {MANIFEST} lacks 'format' or 'files'")
    if manifest["format"] > FORMAT:
        raise ArchiveError(f"{name}: archive format {manifest['format']} is newer than this "
                           f"Milton understands ({FORMAT}); upgrade Milton")
    return manifest


def _load_state(directory: Path) -> dict[str, Any]:
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _record_verification(path: Path, ok: bool, error: str | None = None) -> None:
    """Remember the outcome for `backup list`, keyed to the file's size and mtime."""
    try:
        st = path.stat()
        state = _load_state(path.parent)
        state = {k: v for k, v in state.items() if (path.parent / k).exists()}
        state[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ok": ok,
                            "at": iso(utcnow()), "error": error}
        atomic_write_json(path.parent / STATE_FILE, state)
    except OSError:
        pass  # informational only (e.g. a read-only medium)


def list_backups(settings: Settings) -> list[BackupInfo]:
    """Archives in the backup directory, oldest first; temp files and other names are ignored."""
    directory = settings.backup.dir
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise BackupError(f"{directory}: cannot list backups: {exc.strerror}") from None
    state = _load_state(directory)
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
            info.verified = "ok" if record.get("ok") else "failed"
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


# -- staging directories ---------------------------------------------------------------------
@contextmanager
def _staging(parent: Path, purpose: str) -> Iterator[Path]:
    """A hidden work dir holding a flock while in use, removed afterwards (even on error).

    A ``kill -9`` leaves it behind with its lock released; :func:`clean_stale` removes it.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".milton-{purpose}-{uuid.uuid4().hex}.partial"
    path.mkdir()
    fd = -1
    try:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd >= 0:
            os.close(fd)


def clean_stale(parent: Path, min_age_s: float = 60.0) -> list[str]:
    """Remove staging dirs left by killed runs (their lock is free); return their names."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        if not _STAGING_RE.match(path.name) or not path.is_dir():
            continue
        try:
            fd = os.open(path / "lock", os.O_RDWR)
        except FileNotFoundError:
            # Killed before its lock existed, or being created right now: judge by age.
            try:
                if time.time() - path.stat().st_mtime < min_age_s:
                    continue
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use by a live run
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


# -- small helpers --------------------------------------------------------------------------
def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR_WRITE")


def _space_error(directory: Path, exc: BaseException, what: str) -> BackupError:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else _why(exc)
    return BackupError(f"{directory}: out of space while writing {what} ({detail}); "
                       "no archive was written and earlier backups are untouched")


class _Reader(io.RawIOBase):
    """Wraps a file for tarfile: counts bytes for progress."""

    def __init__(self, handle, on_read: Callable[[int], None]) -> None:
        self.handle = handle
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.on_read(len(data))
        return data


def _db_facts(path: Path) -> tuple[str, int, list[str], dict[str, int]]:
    """(integrity_check result, schema version, migration names, rows per table) of a file."""
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?immutable=1", uri=True)
    try:
        rows = conn.execute("pragma integrity_check(20)").fetchall()
        result = "ok" if [r[0] for r in rows] == ["ok"] else "; ".join(str(r[0]) for r in rows)
        if result != "ok":
            return result, 0, [], {}
        tables = [r[0] for r in conn.execute(
            "select name from pragma_table_list where schema = 'main' and type = 'table' "
            "and name not like 'sqlite_%' order by name")]
        counts = {t: conn.execute(f'select count(*) from "{t.replace(chr(34), chr(34) * 2)}"')
                  .fetchone()[0] for t in tables}
        migrations = [r[0] for r in conn.execute("select name from _migrations order by id")] \
            if "_migrations" in tables else []
        return result, len(migrations), migrations, counts
    finally:
        conn.close()


def _known_schema() -> int:
    from milton.core.migrations import MIGRATIONS

    return len(MIGRATIONS)


# -- backup -------------------------------------------------------------------------------
def create_backup(
    settings: Settings,
    *,
    now: datetime | None = None,
    label: str | None = None,
    db: Any = None,
    config_file: Path | None = None,
    progress: Progress | None = None,
    prune: bool = True,
) -> dict[str, Any]:
    """Write one archive; return its metrics (name, path, size, seconds per phase, pruned).

    ``db``: an open connection (sqlite3 or sqlite-utils) to copy from; by default the
    configured store is opened. ``config_file``: the config in use (default: the one
    :func:`default_config_path` finds). Raises :class:`BackupError` with a one-line message.
    """
    from milton.core.jobs import Skip

    now = now or utcnow()
    label = check_label(label)
    cfg = settings.backup
    directory = cfg.dir
    report = progress or (lambda phase, done, total: None)
    t_start = time.monotonic()
    seconds: dict[str, float] = {}
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"{directory}: cannot create the backup directory: {exc.strerror}") from None
    stale = clean_stale(directory)

    own_conn = None
    if db is None:
        if not settings.db_path.is_file():
            raise Skip(f"no store at {settings.db_path} yet")
        try:
            own_conn = sqlite3.connect(f"{settings.db_path.as_uri()}?mode=rw", uri=True,
                                       timeout=settings.store.busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise BackupError(f"{settings.db_path}: cannot open the store: {exc}") from None
        source = own_conn
    else:
        source = getattr(db, "conn", db)

    try:
        with _staging(directory, "backup") as stage:
            # 1. The store: one backup step = one read transaction = a consistent snapshot.
            t0 = time.monotonic()
            copy = stage / settings.store.filename
            report("copy store", 0, None)
            try:
                dst = sqlite3.connect(copy)
                try:
                    source.backup(dst, pages=-1)
                    # Rollback-journal mode: the copy is one self-contained file (a restored
                    # store is switched back to WAL when it is first opened).
                    dst.execute("pragma journal_mode = delete").fetchone()
                finally:
                    dst.close()
                fsync_file(copy)
            except (sqlite3.Error, OSError) as exc:
                if _disk_full(exc):
                    raise _space_error(directory, exc, "the copy of the store") from None
                raise BackupError(f"cannot copy {settings.db_path} into {directory}: {_why(exc)}") from None
            seconds["copy"] = time.monotonic() - t0

            t0 = time.monotonic()
            report("integrity check", 0, None)
            integrity, schema, migrations, rows = _db_facts(copy)
            if integrity != "ok":
                raise BackupError(f"{settings.db_path}: integrity_check failed on the copy: "
                                  f"{integrity[:300]}; no archive was written")
            seconds["integrity"] = time.monotonic() - t0

            # 2. What goes in, hashed before the archive is written (the manifest is first).
            entries: list[tuple[str, Path]] = [(f"data/{settings.store.filename}", copy)]
            config_path = config_file or default_config_path()
            config_info = None
            if config_path is not None and config_path.is_file():
                staged_config = stage / "config"
                try:
                    shutil.copyfile(config_path, staged_config)
                except OSError as exc:
                    if _disk_full(exc):
                        raise _space_error(directory, exc, "the config file") from None
                    raise BackupError(f"{config_path}: cannot read the config file: {exc.strerror}") from None
                entries.append((CONFIG_MEMBER, staged_config))
                config_info = {"member": CONFIG_MEMBER, "source": str(config_path.resolve())}
            artifacts, warnings = _artifact_entries(settings, entries)

            t0 = time.monotonic()
            total = sum(path.stat().st_size for _, path in entries)
            files: dict[str, dict[str, Any]] = {}
            done = 0
            for member, path in entries:
                digest = hashlib.sha256()
                size = 0
                try:
                    with open(path, "rb") as handle:
                        while block := handle.read(CHUNK):
                            digest.update(block)
                            size += len(block)
                            done += len(block)
                            report("hash", done, total)
                except OSError as exc:
                    raise BackupError(f"{path}: cannot read: {exc.strerror}") from None
                files[member] = {"sha256": digest.hexdigest(), "size": size}
            seconds["hash"] = time.monotonic() - t0

            manifest = {
                "format": FORMAT,
                "milton_version": __version__,
                "created": iso(now),
                "label": label,
                "host": socket.gethostname(),
                "db": f"data/{settings.store.filename}",
                "schema_version": schema,
                "migrations": migrations,
                "sqlite_version": sqlite3.sqlite_version,
                "integrity_check": integrity,
                "rows": rows,
                "config": config_info,
                "artifacts": artifacts,
                "files": files,
                "warnings": warnings,
            }

            # 3. The archive, in the staging dir; read back and re-hashed before it is renamed in.
            t0 = time.monotonic()
            staged = stage / ("archive.tar.gz" if cfg.compression == "gz" else "archive.tar")
            try:
                _write_archive(staged, manifest, entries, cfg, now,
                               lambda n, _t=total: report("archive", n, _t))
            except OSError as exc:
                if _disk_full(exc):
                    raise _space_error(directory, exc, "the archive") from None
                raise BackupError(f"{directory}: cannot write the archive: {_why(exc)}") from None
            seconds["archive"] = time.monotonic() - t0

            t0 = time.monotonic()
            try:
                verify_archive(staged, integrity=False, record=False,
                               progress=lambda p, d, t: report("read back", d, t))
            except ArchiveError as exc:
                raise BackupError(f"the archive failed its read-back check, so it was discarded "
                                  f"(did a file change during the backup?): {exc}") from None
            seconds["read_back"] = time.monotonic() - t0

            final = _rename_in(staged, directory, now, label, cfg.compression)
    except OSError as exc:  # the staging dir itself, reading models, the final rename
        if _disk_full(exc):
            raise _space_error(directory, exc, "the backup") from None
        where = exc.filename or directory
        raise BackupError(f"{where}: backup failed: {exc.strerror or _why(exc)}; "
                          "no archive was written") from None
    finally:
        if own_conn is not None:
            own_conn.close()

    _record_verification(final, ok=True)
    pruned = prune_backups(settings, protect={final.name}) if prune else []
    size = final.stat().st_size
    seconds["total"] = time.monotonic() - t_start
    return {
        "archive": final.name,
        "path": str(final),
        "size_bytes": size,
        "db_bytes": files[manifest["db"]]["size"],
        "files": len(files),
        "schema_version": schema,
        "rows_total": sum(rows.values()),
        "model_versions": sum(len(a["versions"]) for a in artifacts.values()),
        "config": bool(config_info),
        "label": label,
        "pruned": pruned,
        "stale_removed": stale,
        "warnings": warnings,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _artifact_entries(settings: Settings, entries: list[tuple[str, Path]]
                      ) -> tuple[dict[str, Any], list[str]]:
    """Add each kind's current and pinned versions to ``entries``; return (summary, warnings)."""
    root = settings.paths.checkpoints_dir
    summary: dict[str, Any] = {}
    warnings: list[str] = []
    for kind in known_kinds(root):
        try:
            store = ArtifactStore(root, kind)
        except ValueError:
            continue  # not an artifact kind (a stray directory)
        current = store.current_name()
        existing = set(store.version_names())
        pins = sorted(store.pins() & existing)
        wanted = sorted(({current} if current in existing else set()) | set(pins))
        if not wanted:
            continue
        for name in wanted:
            version_dir = store.dir / name
            try:
                declared = store.read_manifest(name).get("files") or {}
            except ArtifactError as exc:
                declared = {}
                warnings.append(str(exc))
            for path in sorted(p for p in version_dir.rglob("*") if p.is_file() and not p.is_symlink()):
                rel = path.relative_to(version_dir).as_posix()
                entries.append((f"checkpoints/{kind}/{name}/{rel}", path))
                expected = declared.get(rel, {}).get("sha256") if isinstance(declared, dict) else None
                if expected and sha256_file(path) != expected:
                    warnings.append(f"{kind}/{name}: checksum mismatch in {rel} (backed up as found)")
        summary[kind] = {"current": current if current in existing else None,
                         "pinned": pins, "versions": wanted}
    return summary, warnings


def _write_archive(path: Path, manifest: dict[str, Any], entries: list[tuple[str, Path]],
                   cfg: BackupConfig, now: datetime, on_progress: Callable[[int], None]) -> None:
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        on_progress(done)

    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    with open(path, "wb") as raw:
        stream: Any = raw
        if cfg.compression == "gz":
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                   compresslevel=cfg.compress_level, mtime=int(now.timestamp()))
        try:
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT,
                              bufsize=CHUNK) as tar:
                info = tarfile.TarInfo(MANIFEST)
                info.size = len(manifest_bytes)
                info.mtime = int(now.timestamp())
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(manifest_bytes))
                for member, source in entries:
                    info = tarfile.TarInfo(member)
                    info.size = manifest["files"][member]["size"]
                    info.mtime = int(source.stat().st_mtime)
                    info.mode = 0o644
                    with open(source, "rb") as handle:
                        tar.addfile(info, _Reader(handle, count))
        finally:
            if stream is not raw:
                stream.close()
        raw.flush()
        os.fsync(raw.fileno())


def _rename_in(staged: Path, directory: Path, now: datetime, label: str | None,
               compression: str) -> Path:
    """Move the sealed archive to its final name without replacing anything there."""
    for seq in range(1000):
        final = directory / archive_name(now, label, compression, seq)
        if final.exists():
            continue
        try:
            os.link(staged, final)  # fails if the name was taken meanwhile: never clobbers
        except FileExistsError:
            continue
        except OSError:
            if final.exists():
                continue
            os.rename(staged, final)  # a filesystem without hard links
        fsync_dir(directory)
        return final
    raise BackupError(f"{directory}: too many backups named {archive_name(now, label, compression)}")


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


# -- verify ---------------------------------------------------------------------------------
def _safe_member(name: str) -> bool:
    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in name


def verify_archive(
    path: Path,
    *,
    integrity: bool = True,
    extract: Callable[[str, dict[str, Any]], Path | None] | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
    record: bool = False,
) -> dict[str, Any]:
    """Re-hash every member against the manifest, then integrity-check the database.

    ``extract(member, manifest)`` may return a path to write that member to (restore uses this to
    stage files beside their targets while verifying, so an archive is read once); the
    caller owns those files. Raises :class:`ArchiveError` naming the archive and the first
    bad file (and how many more there are). Returns a summary. ``record``: remember the
    outcome for ``milton backup list`` (for archives in the backup directory).
    """
    t0 = time.monotonic()
    name = path.name
    report = progress or (lambda phase, done, total: None)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read: {exc.strerror}") from None

    def fail(message: str) -> ArchiveError:
        if record:
            _record_verification(path, ok=False, error=message)
        return ArchiveError(message)

    manifest: dict[str, Any] = {}
    seen: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    current = "its header"
    scratch_cm = None
    db_copy: Path | None = None
    try:
        with open(path, "rb", buffering=CHUNK) as raw:
            try:
                stream = _open_stream(raw)
                with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
                    manifest = _load_manifest(tar, tar.next(), name)
                    files: dict[str, Any] = manifest["files"]
                    db_member = manifest.get("db")
                    if not isinstance(db_member, str) or db_member not in files:
                        raise fail(f"{name}: {MANIFEST} names no database file")
                    while (member := tar.next()) is not None:
                        current = member.name
                        if not member.isfile() or not _safe_member(member.name):
                            problems.append(f"unexpected member {member.name!r}")
                            continue
                        if member.name not in files:
                            problems.append(f"extra file {member.name}")
                            continue
                        if member.name in seen:
                            problems.append(f"duplicate file {member.name}")
                            continue
                        dest = extract(member.name, manifest) if extract else None
                        if dest is None and integrity and member.name == db_member:
                            if scratch_cm is None:
                                scratch_cm = _scratch(workdir or path.parent)
                                scratch = scratch_cm.__enter__()
                            dest = db_copy = scratch / "db"
                        elif dest is not None and member.name == db_member:
                            db_copy = dest
                        got = seen[member.name] = _hash_member(tar, member, dest, report, size, raw)
                        want = files[member.name]
                        if not isinstance(want, dict) or got["sha256"] != want.get("sha256") \
                                or got["size"] != want.get("size"):
                            problems.append(f"checksum mismatch in {member.name}")
                    current = "its end"
                    # Read to the end so gzip checks its CRC and length trailer.
                    while stream.read(CHUNK):
                        pass
            except ArchiveError:
                raise
            except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
                if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) \
                        and (exc.filename or _disk_full(exc)):
                    raise ArchiveError(f"cannot extract {current} from {name}: {_why(exc)}") from None
                # A damaged member usually shows as a checksum mismatch before the stream
                # breaks; name that file first.
                problems.append(f"archive is truncated or corrupt at {current} ({_why(exc)})")
                raise fail(_problems(name, problems)) from None

        problems += [f"missing file {m}" for m in manifest["files"] if m not in seen]
        if problems:
            raise fail(_problems(name, problems))

        result = None
        if integrity and db_copy is not None:
            report("integrity check", 0, None)
            result, schema, _, _ = _db_facts(db_copy)
            if result != "ok":
                raise fail(f"{name}: {manifest['db']}: integrity_check failed: {result[:300]}")
            if schema != manifest.get("schema_version"):
                raise fail(f"{name}: {manifest['db']}: schema version {schema} does not match "
                           f"the manifest's {manifest.get('schema_version')}")
    finally:
        if scratch_cm is not None:
            scratch_cm.__exit__(None, None, None)
    if record:
        _record_verification(path, ok=True)
    return {
        "archive": name,
        "path": str(path),
        "size_bytes": size,
        "created": manifest.get("created"),
        "label": manifest.get("label"),
        "milton_version": manifest.get("milton_version"),
        "schema_version": manifest.get("schema_version"),
        "files": len(seen),
        "bytes": sum(f["size"] for f in seen.values()),
        "rows_total": sum((manifest.get("rows") or {}).values()),
        "integrity_check": result,
        "seconds": round(time.monotonic() - t0, 3),
        "manifest": manifest,
    }


def _problems(name: str, problems: list[str]) -> str:
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{name}: {problems[0]}{more}"


@contextmanager
def _scratch(preferred: Path) -> Iterator[Path]:
    """A staging dir beside the archive, else in the system temp dir (read-only media)."""
    import tempfile

    try:
        with _staging(preferred, "verify") as path:
            yield path
            return
    except OSError:  # read-only or missing: fall back to the system temp dir
        pass
    with tempfile.TemporaryDirectory(prefix="milton-verify-") as tmp:
        yield Path(tmp)


def _hash_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path | None,
                 report: Callable[[str, int, int | None], None], total: int, raw) -> dict[str, Any]:
    handle = tar.extractfile(member)
    assert handle is not None
    digest = hashlib.sha256()
    size = 0
    out = None
    try:
        if dest is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = open(dest, "wb")
        while block := handle.read(CHUNK):
            digest.update(block)
            size += len(block)
            if out is not None:
                out.write(block)
            report("verify", raw.tell(), total)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return {"sha256": digest.hexdigest(), "size": size}
