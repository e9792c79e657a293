"""Hot reload: watch an artifact kind's ``current`` and swap new versions in off the request path.

:class:`HotModel` is the mechanism. Readers call :meth:`HotModel.get` once per request and keep
what it returned, so a request always finishes on the model it started with. A version that
fails to verify or load is remembered as bad, counted, and the last good model keeps serving.
With nothing loaded yet (at start-up) a bad ``current`` falls back to the newest version that
verifies, and :attr:`HotModel.degraded` says so until a good new version is published.

Serve uses it three times: for the anomaly model (the loaded model is the "model"), and for the
chat engine's adapter (:class:`AdapterWatcher`, ``checkpoints/adapter`` -> ``set_adapter``) and
base (:class:`BaseWatcher`, ``checkpoints/base`` -> ``swap_base``), where the "model" is the
version the engine serves and loading it is the engine's swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings
from milton.core.errors import ArtifactError
from milton.core.log import log_event
from milton.core.timeutil import iso, utcnow
from milton.models.layout import (
    ADAPTER_GGUF,
    ADAPTER_KIND,
    BASE_GGUF,
    BASE_KIND,
    artifact_store,
)
from milton.models.refs import resolve_base
from milton.serve.engines.base import SwapRecord

logger = logging.getLogger("milton.serve")

T = TypeVar("T")


@dataclass(frozen=True)
class Loaded(Generic[T]):
    model: T
    version: str
    loaded_at: str


class HotModel(Generic[T]):
    def __init__(self, store: ArtifactStore, loader: Callable[[ArtifactStore, str], T],
                 poll_s: float = 1.0, logger: logging.Logger | None = None) -> None:
        self.store = store
        self.loader = loader
        self.poll_s = poll_s
        self.logger = logger or logging.getLogger("milton.serve")
        self._loaded: Loaded[T] | None = None  # replaced whole: one atomic reference swap
        self._bad: set[str] = set()
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        self.failures = 0
        self.fallbacks = 0
        self.last_reload: str | None = None
        self.last_error: str | None = None
        self.last_load_s: float | None = None
        self.last_swap_s: float | None = None
        self.degraded: str | None = None  # why serve runs on a fallback (or nothing), if it does

    def get(self) -> Loaded[T] | None:
        return self._loaded

    def check(self) -> bool:
        """Load and swap if ``current`` moved to a version not yet tried. True if swapped."""
        with self._check_lock:
            name = self.store.current_name()
            loaded = self._loaded
            if loaded is not None and name == loaded.version and self.degraded:
                self.degraded = None  # `current` was pointed back at what serves: healthy again
            if name is None or (loaded is not None and loaded.version == name) or name in self._bad:
                return False
            t0 = time.perf_counter()
            try:
                model = self.loader(self.store, name)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old model serving
                self._bad.add(name)
                self.failures += 1
                if loaded is not None:
                    self.fallbacks += 1
                self.last_error = f"{self.store.kind}/{name}: {exc}"
                log_event(self.logger, f"rejected {self.store.kind}/{name}; still serving "
                          f"{loaded.version if loaded else 'nothing'}", level=logging.ERROR,
                          error=str(exc))
                if loaded is None:
                    return self._fall_back(name, exc)
                return False
            load_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            self._loaded = Loaded(model, name, iso(utcnow()) or "")
            self.last_swap_s = time.perf_counter() - t1
            self.last_load_s = load_s
            self.reloads += 1
            self.degraded = None
            self.last_reload = self._loaded.loaded_at
            log_event(self.logger, f"now serving {self.store.kind}/{name}",
                      previous=loaded.version if loaded else None, load_s=round(load_s, 4))
            return True

    def _fall_back(self, bad: str, exc: Exception) -> bool:
        """``current`` failed with nothing loaded: serve the newest version that verifies."""
        for version in reversed(self.store.versions()):
            if version.name == bad or version.name in self._bad:
                continue
            try:
                model = self.loader(self.store, version.name)
            except Exception:  # noqa: BLE001 - try the next older one
                self._bad.add(version.name)
                continue
            self._loaded = Loaded(model, version.name, iso(utcnow()) or "")
            self.fallbacks += 1
            self.degraded = (f"{self.store.kind}/{bad} (current) failed verification: {exc}; "
                             f"serving {version.name}, the newest that verifies")
            log_event(self.logger, f"fell back to {self.store.kind}/{version.name}",
                      level=logging.ERROR, bad=bad, error=str(exc))
            return True
        self.degraded = (f"{self.store.kind}/{bad} (current) failed verification: {exc}; "
                         "no other version verifies")
        return False

    def _back_to_default(self, swap_s: float, message: str, previous: str | None) -> None:
        """``current`` went away and the consumer went back to what it serves without one:
        counted and logged as a reload (hold ``_check_lock``)."""
        self._loaded = None
        self.reloads += 1
        self.last_swap_s = swap_s
        self.last_reload = iso(utcnow())
        log_event(self.logger, message, previous=previous)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watcher must never die
                log_event(self.logger, f"reload check failed: {exc}", level=logging.ERROR)

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._run, name=f"hot-{self.store.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- checkpoints/adapter -> the engine's adapter --------------------------------------------------
def _promoted_at(store: ArtifactStore, name: str) -> str | None:
    """When ``current`` last switched to ``name`` (promote, publish or rollback)."""
    for entry in reversed(store.history()):
        if entry.get("version") == name and "previous" in entry:
            return entry.get("ts")
    return None


class AdapterTarget(Protocol):
    """What :class:`AdapterWatcher` needs from an engine (LlamaEngine, HFEngine)."""

    adapter_artifact: str  # the file or directory of an adapter version it loads

    @property
    def adapter_version(self) -> str | None: ...

    def set_adapter(self, path: Path | str | None, version: str | None = None, *,
                    base_sha256: str | None = None,
                    promoted_at: str | None = None) -> SwapRecord: ...


class AdapterWatcher(HotModel[str]):
    """Promote / rollback of ``checkpoints/adapter`` -> the engine's ``set_adapter``.

    A :class:`HotModel` whose "model" is the adapter version the engine serves: every
    ``poll_s`` it reads ``current``; a version not yet tried is verified (checksums), its
    manifest's ``base_model.sha256`` checked against the served base, and its
    ``engine.adapter_artifact`` (``adapter.gguf`` for llama.cpp, the PEFT ``adapter/``
    directory for transformers) handed to the engine off the request path. A rejected version
    is remembered (not retried) and the previous adapter keeps serving. ``current`` removed ->
    the bare base.
    """

    def __init__(self, engine: AdapterTarget, store: ArtifactStore, poll_s: float = 1.0,
                 logger_: logging.Logger | None = None) -> None:
        super().__init__(store, self._load, poll_s, logger_ or logger)
        self.engine = engine
        self.artifact: str = getattr(engine, "adapter_artifact", ADAPTER_GGUF)

    @classmethod
    def from_settings(cls, engine: AdapterTarget, settings: Settings) -> AdapterWatcher:
        store = artifact_store(settings, ADAPTER_KIND)
        return cls(engine, store, settings.serve.reload_poll_s)

    def _load(self, store: ArtifactStore, name: str) -> str:
        version = store.verify(name)
        artifact = self.artifact
        files = version.manifest.get("files", {})
        if not any(rel == artifact or rel.startswith(f"{artifact}/") for rel in files):
            raise ArtifactError(f"{store.kind}/{name}: no {artifact} in the manifest")
        file = version.path / artifact
        base = version.manifest.get("base_model")
        sha = base.get("sha256") if isinstance(base, dict) else None
        if not isinstance(sha, str) or not sha:
            raise ArtifactError(f"{store.kind}/{name}: the manifest names no base model sha256")
        record = self.engine.set_adapter(file, name, base_sha256=sha,
                                         promoted_at=_promoted_at(store, name))
        self.last_swap_s = record.locked_ms / 1e3
        return name

    def check(self) -> bool:
        name = self.store.current_name()
        if name is not None:
            return super().check()
        with self._check_lock:  # no current (rolled back past the first version): bare base
            if self._loaded is None and self.engine.adapter_version is None:
                return False
            previous = self._loaded.version if self._loaded else self.engine.adapter_version
            record = self.engine.set_adapter(None)
            self._back_to_default(record.locked_ms / 1e3,
                                  f"no current {self.store.kind}: serving the bare base", previous)
            return True

    def retry(self) -> None:
        """Forget rejected versions and re-read ``current`` (e.g. after a base swap)."""
        with self._check_lock:
            self._bad.clear()
            self._loaded = None
        self.check()


# -- checkpoints/base -> the engine's base -----------------------------------------------------
class BaseWatcher(HotModel[str]):
    """Serve follows the evolved base: ``checkpoints/base/current`` -> ``engine.swap_base``.

    A newly promoted version is verified (checksums) and loaded beside the running model, then
    switched in between two generations; requests in flight finish on the old one. A version
    that fails to verify or load is remembered, and the old base keeps serving. When
    ``current`` goes away (rolled back past the first evolved version), serve goes back to
    ``model.base``. After every switch the adapter watcher re-reads ``checkpoints/adapter``: an
    adapter is applied only to the base it was trained on, so the evolved base serves bare
    until train-lora has made one for it (the old adapter is already merged into it).
    """

    def __init__(self, engine: Any, settings: Settings, adapters: Any = None,
                 poll_s: float | None = None) -> None:
        store = artifact_store(settings, BASE_KIND)
        super().__init__(store, self._load, poll_s or settings.serve.reload_poll_s, logger)
        self.engine = engine
        self.settings = settings
        self.adapters = adapters  # the AdapterWatcher, told to retry after a switch

    def _load(self, store: ArtifactStore, name: str) -> str:
        version = store.verify(name)
        sha = (version.manifest.get("files", {}).get(BASE_GGUF) or {}).get("sha256")
        if not sha:
            raise ArtifactError(f"{store.kind}/{name}: no {BASE_GGUF} in the manifest")
        if self.engine.base_sha256 != sha:  # at start-up the engine already serves it
            record = self.engine.swap_base(version.path / BASE_GGUF, sha256=sha)
            self.last_swap_s = record.locked_ms / 1e3
            self._adapters_retry()
        return name

    def _adapters_retry(self) -> None:
        if self.adapters is not None:
            try:
                self.adapters.retry()
            except Exception as exc:  # noqa: BLE001 - the base switch itself succeeded
                log_event(self.logger, f"adapter re-check after base switch failed: {exc}",
                          level=logging.WARNING)

    def check(self) -> bool:
        if self.store.current_name() is not None:
            return super().check()
        with self._check_lock:  # no evolved base (any more): back to model.base
            configured = resolve_base(self.settings, evolved=False)
            if self.engine.base_sha256 == configured.sha256:
                self._loaded = None
                return False
            previous = self._loaded.version if self._loaded else None
            try:
                record = self.engine.swap_base(configured.path, sha256=configured.sha256)
            except Exception as exc:  # noqa: BLE001 - keep serving what we have
                self.failures += 1
                self.last_error = f"model.base: {exc}"
                return False
            self._back_to_default(record.locked_ms / 1e3,
                                  f"no current {self.store.kind}: serving model.base again", previous)
        self._adapters_retry()
        return True
