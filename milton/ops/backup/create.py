"""Making a backup: one archive of the store, the current and pinned models and the config.

The store is copied with SQLite's online backup API in one step (one read transaction over a
WAL database: a consistent snapshot that never blocks the writers, who keep going while it
runs) and passes ``PRAGMA integrity_check`` before anything is archived. The archive is built
in a staging directory in the backup directory (which also holds the database copy, so a full
backup disk never fills the data disk), fsynced, read back and re-hashed, and only then
renamed into place (and the directory fsynced). A crash or ``kill -9`` leaves only the staging
directory, which the next backup removes. Retention runs only after the new archive is in
place and never deletes it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from milton import __version__
from milton.core.artifacts import ArtifactStore, known_kinds, sha256_file
from milton.core.config import Settings, default_config_path
from milton.core.errors import ArtifactError
from milton.core.fsio import fsync_dir, fsync_file
from milton.core.timeutil import iso, utcnow
from milton.ops.backup.archive import (
    CHUNK,
    CONFIG_MEMBER,
    FORMAT,
    ArchiveError,
    BackupError,
    Progress,
    archive_name,
    check_label,
    clean_stale,
    db_facts,
    disk_full,
    record_verification,
    space_error,
    staging,
    verify_archive,
    why,
    write_archive,
)
from milton.ops.backup.retention import prune_backups


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
        with staging(directory, "backup") as stage:
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
                if disk_full(exc):
                    raise space_error(directory, exc, "the copy of the store") from None
                raise BackupError(f"cannot copy {settings.db_path} into {directory}: {why(exc)}") from None
            seconds["copy"] = time.monotonic() - t0

            t0 = time.monotonic()
            report("integrity check", 0, None)
            integrity, schema, migrations, rows = db_facts(copy)
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
                    if disk_full(exc):
                        raise space_error(directory, exc, "the config file") from None
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
                write_archive(staged, manifest, entries, cfg, now,
                               lambda n, _t=total: report("archive", n, _t))
            except OSError as exc:
                if disk_full(exc):
                    raise space_error(directory, exc, "the archive") from None
                raise BackupError(f"{directory}: cannot write the archive: {why(exc)}") from None
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
        if disk_full(exc):
            raise space_error(directory, exc, "the backup") from None
        where = exc.filename or directory
        raise BackupError(f"{where}: backup failed: {exc.strerror or why(exc)}; "
                          "no archive was written") from None
    finally:
        if own_conn is not None:
            own_conn.close()

    record_verification(final, ok=True)
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
