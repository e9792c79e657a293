"""Hot reload: watch an artifact kind's ``current`` and swap in new versions off the request path.

Readers call :meth:`HotModel.get` once per request and keep what it returned, so a request
always finishes on the model it started with. A version that fails to verify or load is
remembered as bad, counted, and the last good model keeps serving. With nothing loaded yet (at
start-up) a bad ``current`` falls back to the newest version that verifies, and
:attr:`HotModel.degraded` says so until a good new version is published.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from milton.core.artifacts import ArtifactStore
from milton.core.log import log_event
from milton.core.timeutil import iso, utcnow

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
