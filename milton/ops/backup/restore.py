"""Restore: put an archive's store, models and (optionally) config back, atomically.

The archive is verified while it is extracted to temp files beside their targets, and the
whole plan (store, every model version, config) is checked before anything live changes; then
the store is taken exclusively (:func:`milton.core.jobs.exclusive_store_access`), a
``pre-restore`` backup of the current state is made, and each piece is swapped in with
rename(2), so a crash at any point leaves one valid store. A failure after the first swap
undoes the swaps already made (:class:`Undo`) and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from milton.core.artifacts import PINS, ArtifactStore, known_kinds, sha256_file
from milton.core.config import Settings, default_config_path
from milton.core.errors import ArtifactError, ConfigError
from milton.core.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_file,
)
from milton.core.timeutil import iso, utcnow
from milton.ops.backup.archive import (
    CONFIG_MEMBER,
    MANIFEST,
    MAX_CONFIG_BYTES,
    PRE_RESTORE,
    ArchiveError,
    BackupError,
    Progress,
    clean_stale,
    known_schema,
    rows_total,
    staging,
    verify_archive,
    why,
)
from milton.ops.backup.create import create_backup


def restore_backup(
    settings: Settings,
    archive: Path,
    *,
    force: bool = False,
    with_config: bool = False,
    config_file: Path | None = None,
    pre_backup: bool = True,
    confirm: Callable[[dict[str, Any]], bool] | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Verify ``archive``, take the store exclusively, back up the current state, swap in.

    Raises :class:`ArchiveError` (nothing touched) for a bad archive, :class:`BusyError`
    when serve or a job holds the store (unless ``force``), :class:`BackupError` otherwise.
    """
    from milton.core.jobs import Skip, append_master_log, exclusive_store_access

    t0 = time.monotonic()
    started = utcnow()
    name = archive.name
    data_dir = settings.paths.data_dir
    root = settings.paths.checkpoints_dir
    target_config = config_file or default_config_path() or settings.paths.home / "config.toml"
    for directory in (data_dir, root):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackupError(f"{directory}: cannot create: {exc.strerror}") from None
    clean_stale(data_dir)
    clean_stale(root)
    with exclusive_store_access(settings, force=force):
        pass  # refuse a busy store now, not after verifying a big archive; taken for real below

    with staging(data_dir, "restore") as db_stage, staging(root, "restore") as art_stage:
        staged_db = db_stage / settings.store.filename
        staged_config = db_stage / "config.toml"

        def sink(member: str, manifest: dict[str, Any]) -> Path | None:
            parts = PurePosixPath(member).parts
            if member == manifest.get("db"):
                return staged_db
            if member == CONFIG_MEMBER:
                return staged_config if with_config else None
            if len(parts) >= 4 and parts[0] == "checkpoints":
                return art_stage.joinpath(*parts[1:])
            return None

        report = verify_archive(archive, integrity=True, extract=sink, progress=progress,
                                record=archive.parent == settings.backup.dir)
        manifest = report["manifest"]
        # The whole plan is checked before anything live is touched: store, every model
        # version the archive makes current, and the config.
        _check_artifact_plan(name, manifest)
        if not staged_db.is_file():
            raise ArchiveError(f"{name}: holds no database to restore")
        known = known_schema()
        if int(manifest.get("schema_version") or 0) > known:
            raise BackupError(f"{name}: made by a newer Milton (schema {manifest['schema_version']} "
                              f"> {known}); upgrade Milton to restore it")
        _check_staged_models(name, manifest, art_stage, root)
        if with_config:
            if not staged_config.is_file():
                raise BackupError(f"{name}: holds no config file; restore without --with-config")
            if staged_config.stat().st_size > MAX_CONFIG_BYTES:
                raise ArchiveError(f"{name}: {CONFIG_MEMBER} is implausibly large")
            try:
                from milton.core.config import load_settings

                load_settings(staged_config, environ={})
            except ConfigError as exc:
                raise BackupError(f"{name}: its config file is not valid here: {exc}") from None
        try:
            _prepare_restored_db(staged_db, name, manifest, started)
        except (OSError, sqlite3.Error) as exc:
            raise BackupError(f"{name}: cannot prepare its store for restoring: {why(exc)}; "
                              "nothing was changed") from None

        summary = {"archive": name, "created": manifest.get("created"),
                   "label": manifest.get("label"), "schema_version": manifest.get("schema_version"),
                   "rows": manifest.get("rows", {}), "artifacts": manifest.get("artifacts", {}),
                   "with_config": with_config, "db": str(settings.db_path)}
        if confirm is not None and not confirm(summary):
            raise BackupError("restore cancelled; nothing was changed")

        with exclusive_store_access(settings, force=force) as busy:
            pre_name = None
            if pre_backup:
                try:
                    pre = create_backup(settings, now=now, label=PRE_RESTORE,
                                        config_file=config_file, progress=progress)
                    pre_name = pre["archive"]
                except Skip:
                    pre_name = None  # no store yet: nothing to keep
                except BackupError as exc:
                    raise BackupError(f"pre-restore backup failed, nothing was restored "
                                      f"(--no-pre-backup skips it): {exc}") from None

            undo = Undo()
            step = "the store"
            try:
                _swap_db(settings, staged_db, undo, db_stage / "previous.db")
                step = "the models"
                artifacts = _restore_artifacts(settings, manifest, art_stage, undo)
                restored_config = None
                if with_config:
                    step = "the config file"
                    _write_config(target_config, staged_config.read_bytes(), undo)
                    restored_config = str(target_config)
            except BaseException as exc:
                failures = undo.roll_back()
                if failures:
                    where = (f"`milton restore {pre_name} --no-pre-backup` puts back the state "
                             "before it" if pre_name else "no pre-restore backup was taken")
                    state = (f"rolling back failed too ({failures[0]}); the store and models "
                             f"may be half-restored: {where}")
                else:
                    also = f" (also kept in {pre_name})" if pre_name else ""
                    state = ("rolled back: the store, models and config are as they were "
                             f"before the restore{also}")
                if not isinstance(exc, Exception):
                    raise
                raise BackupError(f"restore from {name} failed while restoring {step}: "
                                  f"{why(exc)}; {state}") from None
            undo.commit()

    result = {
        "archive": name,
        "created": manifest.get("created"),
        "schema_version": manifest.get("schema_version"),
        "rows": manifest.get("rows", {}),
        "rows_total": rows_total(manifest),
        "db": str(settings.db_path),
        "artifacts": artifacts,
        "models_not_in_archive": sorted(set(known_kinds(root)) - set(artifacts)),
        "config": restored_config,
        "pre_restore_backup": pre_name,
        "forced_past": busy,
        "seconds": round(time.monotonic() - t0, 3),
    }
    append_master_log(settings.logs_dir, {
        "job": "restore", "run_id": None, "status": "ok", "started": iso(started),
        "finished": iso(utcnow()), "duration_s": result["seconds"], "now": iso(started),
        "metrics": {k: v for k, v in result.items() if k not in ("rows", "artifacts")},
        "error": None, "host": socket.gethostname(), "pid": os.getpid(),
    })
    return result


def _check_artifact_plan(name: str, manifest: dict[str, Any]) -> None:
    plan = manifest.get("artifacts") or {}
    if not isinstance(plan, dict):
        raise ArchiveError(f"{name}: {MANIFEST}: 'artifacts' is not an object")
    for kind, info in plan.items():
        versions = info.get("versions") if isinstance(info, dict) else None
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(kind)) or not isinstance(versions, list) \
                or not all(re.fullmatch(r"v\d{6}", str(v)) for v in versions) \
                or (info.get("current") and info["current"] not in versions):
            raise ArchiveError(f"{name}: {MANIFEST}: bad entry for model kind {kind!r}")


def _prepare_restored_db(path: Path, archive: str, manifest: dict[str, Any],
                         started: datetime) -> None:
    """Runs that were in flight when the backup was taken are over; record the restore.

    The one backup run among them made this very archive, so it is recorded as ok (it would
    otherwise count as a failure in ``milton status``); the others were cut off.
    """
    conn = sqlite3.connect(path)
    try:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
        if "job_runs" in tables:
            with conn:
                conn.execute(
                    "update job_runs set status = 'ok', finished = coalesce(finished, ?), "
                    "metrics = ? where status = 'running' and job = 'backup'",
                    (manifest.get("created") or iso(started), json.dumps({"archive": archive})))
                conn.execute(
                    "update job_runs set status = 'failed', finished = coalesce(finished, ?), "
                    "error = ? where status = 'running'",
                    (iso(started), "interrupted: the backup it was restored from was taken while it ran"))
                conn.execute(
                    "insert into job_runs (job, started, finished, status, metrics, host, pid, now) "
                    "values ('restore', ?, ?, 'ok', ?, ?, ?, ?)",
                    (iso(started), iso(utcnow()), json.dumps({"archive": archive}),
                     socket.gethostname(), os.getpid(), iso(started)))
    finally:
        conn.close()
    fsync_file(path)


class Undo:
    """What the swaps did, in order, so a failure half-way puts everything back.

    ``roll_back`` runs the undo steps newest first and returns the errors of those that
    failed; ``commit`` runs the clean-ups (e.g. deleting the replaced model versions kept
    aside) once everything is in place.
    """

    def __init__(self) -> None:
        self.steps: list[Callable[[], None]] = []
        self.cleanups: list[Callable[[], None]] = []

    def roll_back(self) -> list[str]:
        failures = []
        for step in reversed(self.steps):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest; report the first failure
                failures.append(why(exc))
        self.steps.clear()
        return failures

    def commit(self) -> None:
        for cleanup in self.cleanups:
            try:
                cleanup()
            except OSError:
                pass
        self.steps.clear()


def _swap_db(settings: Settings, staged: Path, undo: Undo, aside: Path) -> None:
    """Replace the live store with ``staged`` so that no stale WAL can ever be replayed onto it.

    The old file stays reachable as a hard link at ``aside`` (same directory tree, so no
    copy) until the restore is committed, so :class:`Undo` can put it back.
    """
    live = settings.db_path
    if live.exists():
        try:
            conn = sqlite3.connect(live, timeout=settings.store.busy_timeout_ms / 1000)
            try:
                conn.execute("pragma wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            pass  # a damaged store is being replaced anyway
    # The old WAL (empty after the checkpoint) goes first: a WAL left beside the new file
    # would be replayed onto it. A crash in between leaves the old store, still valid.
    # Jobs and serve are kept out by the store lock; commands that open the store without
    # it (memory/sessions CLI) could still recreate a WAL in this window.
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{live}{suffix}").unlink(missing_ok=True)
    had_live = live.exists()
    if had_live:
        try:
            os.link(live, aside)
        except OSError:  # a filesystem without hard links: keep a copy instead
            shutil.copyfile(live, aside)

    def put_back() -> None:
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{live}{suffix}").unlink(missing_ok=True)
        if had_live:
            os.replace(aside, live)
        else:
            live.unlink(missing_ok=True)
        fsync_dir(live.parent)

    os.replace(staged, live)
    undo.steps.append(put_back)
    fsync_dir(live.parent)


def _write_config(target: Path, data: bytes, undo: Undo) -> None:
    try:
        previous: bytes | None = target.read_bytes()
    except FileNotFoundError:
        previous = None

    def put_back() -> None:
        if previous is None:
            target.unlink(missing_ok=True)
        else:
            atomic_write_bytes(target, previous)

    atomic_write_bytes(target, data)
    undo.steps.append(put_back)


def _check_staged_models(name: str, manifest: dict[str, Any], stage: Path, root: Path) -> None:
    """Every version the archive lists is in it (or already here, identical), and the ones it
    makes current pass their own checksums: found now, not after the store was swapped."""
    files = manifest["files"]
    for kind, info in sorted((manifest.get("artifacts") or {}).items()):
        current = info.get("current")
        for version in info.get("versions", []):
            prefix = f"checkpoints/{kind}/{version}/"
            local = root / kind / version
            if local.is_dir() and _same_version(local, files, prefix):
                where = ArtifactStore(root, kind)
            elif (stage / kind / version).is_dir():
                where = ArtifactStore(stage, kind)
            else:
                raise ArchiveError(f"{name}: lists model {kind}/{version} but holds none of "
                                   "its files; nothing was changed")
            try:
                if version == current:
                    where.verify(version)
                else:
                    where.read_manifest(version)
            except ArtifactError as exc:
                raise ArchiveError(f"{name}: model {kind}/{version} cannot be restored: {exc}; "
                                   "nothing was changed") from None


def _same_version(local: Path, files: dict[str, Any], prefix: str) -> bool:
    for member, info in files.items():
        if not member.startswith(prefix):
            continue
        path = local / member[len(prefix):]
        try:
            if path.stat().st_size != info.get("size") or sha256_file(path) != info.get("sha256"):
                return False
        except OSError:
            return False
    return True


def _restore_artifacts(settings: Settings, manifest: dict[str, Any], stage: Path,
                       undo: Undo) -> dict[str, Any]:
    root = settings.paths.checkpoints_dir
    files = manifest["files"]
    out: dict[str, Any] = {}
    for kind, info in sorted((manifest.get("artifacts") or {}).items()):
        store = ArtifactStore(root, kind)  # never publishes, so never prunes: no keep count
        store.dir.mkdir(parents=True, exist_ok=True)
        placed, kept = [], []
        for version in info.get("versions", []):
            prefix = f"checkpoints/{kind}/{version}/"
            local = store.dir / version
            if local.is_dir() and _same_version(local, files, prefix):
                kept.append(version)
                continue
            staged = stage / kind / version
            for sub in sorted((p for p in staged.rglob("*") if p.is_dir()), reverse=True):
                fsync_dir(sub)
            fsync_dir(staged)
            aside = None
            if local.exists():  # a different version under the same name: replaced
                aside = store.dir / f".tmp-del-{version}-{uuid.uuid4().hex}"
                os.rename(local, aside)
            os.rename(staged, local)
            undo.steps.append(_unplace(store.dir, local, aside))
            if aside is not None:
                undo.cleanups.append(lambda aside=aside: shutil.rmtree(aside, ignore_errors=True))
            fsync_dir(store.dir)
            placed.append(version)
        pinned = set(info.get("pinned", []))
        if pinned - store.pins():
            pins_path = store.dir / PINS
            previous_pins = pins_path.read_bytes() if pins_path.exists() else None
            atomic_write_json(pins_path, sorted(store.pins() | pinned))
            undo.steps.append(lambda p=pins_path, b=previous_pins:
                              atomic_write_bytes(p, b) if b is not None else p.unlink(missing_ok=True))
        current = info.get("current")
        before = store.current_name()
        if current and before != current:
            store.set_current(current, reason="restore")
            undo.steps.append(lambda s=store, b=before:
                              s.set_current(b, reason="restore rolled back", verify=False)
                              if b else s.clear_current(reason="restore rolled back"))
        elif current:
            store.verify(current)
        out[kind] = {"current": current, "restored_versions": placed, "kept_versions": kept}
    return out


def _unplace(directory: Path, local: Path, aside: Path | None) -> Callable[[], None]:
    """Undo one version's rename: move the restored one out, the replaced one back."""
    def run() -> None:
        trash = directory / f".tmp-del-{local.name}-{uuid.uuid4().hex}"
        os.rename(local, trash)
        if aside is not None:
            os.rename(aside, local)
        fsync_dir(directory)
        shutil.rmtree(trash, ignore_errors=True)
    return run
