"""The backup archive format: names, manifest, writing, verifying, and the staging directories.

``backups/milton-<UTC timestamp>[.<n>][-<label>].tar[.gz]`` holds, in this order:

* ``manifest.json`` (first, so listing archives reads only their first block): format and
  Milton versions, creation time, label, schema version and migrations, row counts per table,
  sha256 and size of every other member, and per model kind which version was current and
  which were pinned;
* ``data/<store file>``: a copy of the SQLite store, in rollback-journal mode so the file
  stands alone, that passed ``PRAGMA integrity_check``;
* ``config.toml`` when a config file is in use;
* ``checkpoints/<kind>/<version>/...`` for every kind's current and pinned versions.

Work happens in hidden staging directories (``.milton-<purpose>-<id>.partial/``, holding a
flock while in use: :func:`staging`), which listing and verification ignore and
:func:`clean_stale` removes once their owner is gone.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import sqlite3
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from milton.core.config import BackupConfig
from milton.core.errors import InputError, MiltonError, is_disk_full
from milton.core.fsio import atomic_write_json
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

#: progress(phase, done, total): called as work advances (bytes; total None = unknown).
Progress = Callable[[str, int, "int | None"], None]


class BackupError(MiltonError):
    """A backup or restore could not be completed; nothing was half-written."""


class ArchiveError(BackupError):
    """An archive is unreadable, incomplete, or does not match its manifest."""


# -- names and manifest ----------------------------------------------------------------------
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


def open_stream(raw) -> Any:
    """The decompressed byte stream of an archive (gzip detected by magic, not by name)."""
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an archive, reading only its first member."""
    try:
        with open(path, "rb") as raw, open_stream(raw) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:
            first = tar.next()
            return load_manifest(tar, first, path.name)
    except ArchiveError:
        raise
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or exc.filename:
            raise ArchiveError(f"{path}: cannot read: {exc.strerror}") from None
        raise ArchiveError(f"{path.name}: not a readable archive ({why(exc)})") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"{path.name}: not a readable archive ({why(exc)})") from None


def why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line


def load_manifest(tar: tarfile.TarFile, first: tarfile.TarInfo | None, name: str) -> dict[str, Any]:
    if first is None or first.name != MANIFEST or not first.isfile():
        raise ArchiveError(f"{name}: not a Milton backup ({MANIFEST} is not its first member)")
    if first.size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{name}: {MANIFEST} is implausibly large ({first.size} bytes)")
    handle = tar.extractfile(first)
    assert handle is not None
    data = handle.read()
    try:
        manifest = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArchiveError(f"{name}: {MANIFEST} is not valid JSON ({why(exc)})") from None
    except ValueError as exc:  # a duplicate key: two entries for one member
        raise ArchiveError(f"{name}: {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) \
            or not isinstance(manifest.get("format"), int):
        raise ArchiveError(f"{name}: {MANIFEST} lacks 'format' or 'files'")
    if manifest["format"] > FORMAT:
        raise ArchiveError(f"{name}: archive format {manifest['format']} is newer than this "
                           f"Milton understands ({FORMAT}); upgrade Milton")
    check_manifest_shape(manifest, name)
    return manifest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def check_manifest_shape(manifest: dict[str, Any], name: str) -> None:
    """Every field later code relies on has the type it expects; member names are canonical.

    A hand-edited or crafted manifest is then one clear error here instead of a traceback in
    whatever reads the field first (listing, verify, restore).
    """
    rows = manifest.get("rows", {})
    if not isinstance(rows, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in rows.items()):
        raise ArchiveError(f"{name}: {MANIFEST}: 'rows' is not an object of row counts")
    for key in ("db", "created", "label", "milton_version"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise ArchiveError(f"{name}: {MANIFEST}: '{key}' is not a string")
    schema = manifest.get("schema_version")
    if schema is not None and (not isinstance(schema, int) or isinstance(schema, bool)):
        raise ArchiveError(f"{name}: {MANIFEST}: 'schema_version' is not an integer")
    if not isinstance(manifest.get("artifacts", {}) or {}, dict):
        raise ArchiveError(f"{name}: {MANIFEST}: 'artifacts' is not an object")
    for member, info in manifest["files"].items():
        if not canonical_member(member):
            raise ArchiveError(f"{name}: {MANIFEST}: member name {member!r} is not a plain "
                               "relative path (aliases like './' or '..' are refused)")
        size = info.get("size") if isinstance(info, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
                or not isinstance(info.get("sha256"), str):
            raise ArchiveError(f"{name}: {MANIFEST}: bad size or sha256 for {member}")


def load_state(directory: Path) -> dict[str, Any]:
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def record_verification(path: Path, ok: bool, error: str | None = None) -> None:
    """Remember the outcome for `backup list`, keyed to the file's size and mtime."""
    try:
        st = path.stat()
        state = load_state(path.parent)
        state = {k: v for k, v in state.items() if (path.parent / k).exists()}
        state[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ok": ok,
                            "at": iso(utcnow()), "error": error}
        atomic_write_json(path.parent / STATE_FILE, state)
    except OSError:
        pass  # informational only (e.g. a read-only medium)


# -- staging directories ---------------------------------------------------------------------
@contextmanager
def staging(parent: Path, purpose: str) -> Iterator[Path]:
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
def disk_full(exc: BaseException) -> bool:
    return is_disk_full(exc)


def space_error(directory: Path, exc: BaseException, what: str) -> BackupError:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else why(exc)
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


def db_facts(path: Path) -> tuple[str, int, list[str], dict[str, int]]:
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


def known_schema() -> int:
    from milton.core.migrations import MIGRATIONS

    return len(MIGRATIONS)


# -- writing --------------------------------------------------------------------------------
def write_archive(path: Path, manifest: dict[str, Any], entries: list[tuple[str, Path]],
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


# -- verify ---------------------------------------------------------------------------------
def canonical_member(name: str) -> bool:
    """A relative path in its one normal spelling: no '.', '..', '//', trailing '/' or '\\'.

    Two spellings of one file (``checkpoints/./anomaly/x`` and ``checkpoints/anomaly/x``)
    would otherwise pass as two members and the second would overwrite the first on restore.
    """
    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts \
        and "\\" not in name and "\x00" not in name and posixpath.normpath(name) == name


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
            record_verification(path, ok=False, error=message)
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
                stream = open_stream(raw)
                with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
                    manifest = load_manifest(tar, tar.next(), name)
                    files: dict[str, Any] = manifest["files"]
                    db_member = manifest.get("db")
                    if not isinstance(db_member, str) or db_member not in files:
                        raise fail(f"{name}: {MANIFEST} names no database file")
                    while (member := tar.next()) is not None:
                        current = member.name
                        if not member.isfile() or not canonical_member(member.name):
                            problems.append(f"unexpected member {member.name!r}")
                            continue
                        if member.name not in files:
                            problems.append(f"extra file {member.name}")
                            continue
                        if member.name in seen:
                            problems.append(f"duplicate file {member.name}")
                            continue
                        declared = files[member.name]["size"]
                        if member.size != declared:
                            # Fail before reading it: a crafted header could declare gigabytes.
                            problems.append(f"{member.name} holds {member.size} bytes, the "
                                            f"manifest says {declared}")
                            raise fail(_problems(name, problems))
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
                        and (exc.filename or disk_full(exc)):
                    raise ArchiveError(f"cannot extract {current} from {name}: {why(exc)}") from None
                # A damaged member usually shows as a checksum mismatch before the stream
                # breaks; name that file first.
                problems.append(f"archive is truncated or corrupt at {current} ({why(exc)})")
                raise fail(_problems(name, problems)) from None

        problems += [f"missing file {m}" for m in manifest["files"] if m not in seen]
        if problems:
            raise fail(_problems(name, problems))

        result = None
        if integrity and db_copy is not None:
            report("integrity check", 0, None)
            try:
                result, schema, _, _ = db_facts(db_copy)
            except sqlite3.DatabaseError as exc:
                raise fail(f"{name}: {manifest['db']}: not a readable SQLite database "
                           f"({why(exc)})") from None
            if result != "ok":
                raise fail(f"{name}: {manifest['db']}: integrity_check failed: {result[:300]}")
            if schema != manifest.get("schema_version"):
                raise fail(f"{name}: {manifest['db']}: schema version {schema} does not match "
                           f"the manifest's {manifest.get('schema_version')}")
    finally:
        if scratch_cm is not None:
            scratch_cm.__exit__(None, None, None)
    if record:
        record_verification(path, ok=True)
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
        "rows_total": rows_total(manifest),
        "integrity_check": result,
        "seconds": round(time.monotonic() - t0, 3),
        "manifest": manifest,
    }


def rows_total(manifest: dict[str, Any]) -> int:
    rows = manifest.get("rows")
    return sum(v for v in rows.values() if isinstance(v, int)) if isinstance(rows, dict) else 0


def _problems(name: str, problems: list[str]) -> str:
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{name}: {problems[0]}{more}"


@contextmanager
def _scratch(preferred: Path) -> Iterator[Path]:
    """A staging dir beside the archive, else in the system temp dir (read-only media)."""
    import tempfile

    try:
        with staging(preferred, "verify") as path:
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
        left = member.size  # checked against the manifest's size: never read past it
        while left > 0 and (block := handle.read(min(CHUNK, left))):
            left -= len(block)
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
