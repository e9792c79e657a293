"""Versioned model artifacts with manifests and an atomically switched ``current``.

Layout: ``checkpoints/<kind>/<version>/`` (files + ``manifest.json``), ``checkpoints/<kind>/current``
(a symlink to a version, replaced with rename(2)), ``pins.json`` and ``history.jsonl``.
A version directory appears only once complete (built in ``.tmp-*``, fsynced, renamed), so a
crash at any moment leaves either the old state or the new one, never a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from milton.core.errors import ArtifactError
from milton.core.fsio import atomic_write_json, fsync_dir, fsync_file
from milton.core.timeutil import iso, utcnow

MANIFEST = "manifest.json"
CURRENT = "current"
PINS = "pins.json"
HISTORY = "history.jsonl"
_VERSION_RE = re.compile(r"^v(\d{6})$")
_DEFAULT_LIBS = ("milton", "numpy", "scikit-learn", "skops", "torch", "transformers", "peft",
                 "llama-cpp-python", "sentence-transformers")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions(names: tuple[str, ...] = _DEFAULT_LIBS) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class Version:
    kind: str
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def created(self) -> str:
        return self.manifest.get("created", "")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


class ArtifactStore:
    """One kind of artifact (``anomaly``, ``adapter``, ``base``...) under ``checkpoints/``.

    ``keep`` matters only to :meth:`publish` (which prunes to it); the kinds' own counts are
    :func:`milton.models.layout.artifact_store`'s.
    """

    def __init__(self, root: Path, kind: str, keep: int = 10) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", kind):
            raise ValueError(f"bad artifact kind {kind!r}")
        self.root = Path(root)
        self.kind = kind
        self.dir = self.root / kind
        self.keep = keep

    # -- reading -----------------------------------------------------------------------
    def version_names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        names = [p.name for p in self.dir.iterdir() if _VERSION_RE.match(p.name) and p.is_dir()]
        return sorted(names)

    def versions(self) -> list[Version]:
        out = []
        for name in self.version_names():
            try:
                manifest = self.read_manifest(name)
            except ArtifactError:
                manifest = {"broken": True}
            out.append(Version(self.kind, name, self.dir / name, manifest))
        return out

    def read_manifest(self, name: str) -> dict[str, Any]:
        path = self.dir / name / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{self.kind}/{name}: no manifest") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: manifest is not valid JSON: {exc}") from None

    def current_name(self) -> str | None:
        link = self.dir / CURRENT
        try:
            target = os.readlink(link)
        except (FileNotFoundError, OSError):
            return None
        name = Path(target).name
        return name if _VERSION_RE.match(name) else None

    def current(self) -> Version | None:
        name = self.current_name()
        if name is None:
            return None
        return self.get(name)

    def get(self, name: str) -> Version:
        if name in ("current", "latest"):
            names = self.version_names()
            resolved = self.current_name() if name == "current" else (names[-1] if names else None)
            if resolved is None:
                raise ArtifactError(f"{self.kind}: no {name} version")
            name = resolved
        if not _VERSION_RE.match(name) or not (self.dir / name).is_dir():
            raise ArtifactError(f"{self.kind}: no version {name!r} (see `milton models list`)")
        return Version(self.kind, name, self.dir / name, self.read_manifest(name))

    def verify(self, name: str) -> Version:
        """Re-hash every file against the manifest; raise naming the first bad file."""
        version = self.get(name)
        files = version.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise ArtifactError(f"{self.kind}/{name}: manifest lists no files")
        for rel, info in files.items():
            path = version.path / rel
            if not path.is_file():
                raise ArtifactError(f"{self.kind}/{name}: missing file {rel}")
            if sha256_file(path) != info.get("sha256"):
                raise ArtifactError(f"{self.kind}/{name}: checksum mismatch in {rel}")
        return version

    def pins(self) -> set[str]:
        try:
            return set(json.loads((self.dir / PINS).read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return set()

    def history(self) -> list[dict[str, Any]]:
        try:
            lines = (self.dir / HISTORY).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash: skip, don't fail
        return out

    # -- writing -----------------------------------------------------------------------
    def _record(self, event: str, **fields: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"ts": iso(utcnow()), "event": event, **fields}, default=str) + "\n"
        fd = os.open(self.dir / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def clean_tmp(self) -> int:
        """Remove build directories left by a crashed publisher (callers hold the job lock)."""
        if not self.dir.is_dir():
            return 0
        stale = [p for p in self.dir.iterdir() if p.name.startswith(".tmp-")]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    def publish(
        self,
        build: Callable[[Path], None],
        *,
        metrics: dict[str, Any] | None = None,
        data_window: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        make_current: bool = True,
        created: datetime | None = None,
    ) -> Version:
        """Build a new version with ``build(tmpdir)``, seal it with a manifest, rename it in."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clean_tmp()
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            build(tmp)
            files: dict[str, dict[str, Any]] = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = path.relative_to(tmp).as_posix()
                fsync_file(path)
                files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            if not files:
                raise ArtifactError(f"{self.kind}: build produced no files")
            manifest = {
                "kind": self.kind,
                "created": iso(created or utcnow()),
                "files": files,
                "metrics": metrics or {},
                "data_window": data_window or {},
                "libraries": library_versions(),
                "parent": self.current_name(),
                **(extra or {}),
            }
            for attempt in range(100):
                existing = self.version_names()
                number = int(existing[-1][1:]) + 1 if existing else 1
                name = f"v{number:06d}"
                manifest["version"] = name
                atomic_write_json(tmp / MANIFEST, manifest)
                for sub in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                    fsync_dir(sub)
                fsync_dir(tmp)
                try:
                    os.rename(tmp, self.dir / name)  # fails if a concurrent publisher took it
                    break
                except OSError:
                    if attempt == 99:
                        raise
            fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._record("publish", version=name)
        if make_current:
            self.set_current(name, reason="publish")
        self.prune()
        return self.get(name)

    def set_current(self, name: str, *, reason: str = "promote", verify: bool = True) -> Version:
        version = self.verify(name) if verify else self.get(name)
        previous = self.current_name()
        link = self.dir / CURRENT
        tmp_link = self.dir / f".current-{uuid.uuid4().hex}"
        os.symlink(version.name, tmp_link)
        try:
            os.replace(tmp_link, link)
        finally:
            if tmp_link.is_symlink():
                tmp_link.unlink()
        fsync_dir(self.dir)
        self._record(reason, version=version.name, previous=previous)
        return version

    def clear_current(self, *, reason: str = "clear") -> str | None:
        """Remove ``current``: nothing of this kind is in use (serve goes back to its
        configured model). Returns the version that was current."""
        previous = self.current_name()
        (self.dir / CURRENT).unlink(missing_ok=True)
        if self.dir.is_dir():
            fsync_dir(self.dir)
        if previous is not None:
            self._record(reason, version=None, previous=previous)
        return previous

    def rollback(self, to: str | None = None) -> Version:
        """Switch ``current`` to ``to``, or to the newest verified version older than current."""
        if to is not None:
            return self.set_current(self.get(to).name, reason="rollback")
        names = self.version_names()
        current = self.current_name()
        older = [n for n in names if current is None or n < current]
        for name in reversed(older):
            try:
                return self.set_current(name, reason="rollback")
            except ArtifactError:
                continue
        raise ArtifactError(f"{self.kind}: no earlier valid version to roll back to")

    def pin(self, name: str, pinned: bool = True) -> None:
        name = self.get(name).name
        pins = self.pins()
        pins = pins | {name} if pinned else pins - {name}
        atomic_write_json(self.dir / PINS, sorted(pins))
        self._record("pin" if pinned else "unpin", version=name)

    def prune(self) -> list[str]:
        """Delete versions beyond the newest ``keep``, never current or pinned ones."""
        names = self.version_names()
        protected = self.pins() | {self.current_name()}
        removable = [n for n in names[: max(0, len(names) - self.keep)] if n not in protected]
        for name in removable:
            # Rename first so a crash mid-delete never leaves a half-deleted "version".
            doomed = self.dir / f".tmp-del-{name}-{uuid.uuid4().hex}"
            os.rename(self.dir / name, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return removable


def known_kinds(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
