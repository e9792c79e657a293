"""Serve follows the evolved base: ``checkpoints/base/current`` -> :meth:`LlamaEngine.swap_base`.

A :class:`~milton.serve.hot.HotModel` whose "model" is the evolved-base version the engine
serves. A newly promoted version is verified (checksums) and loaded beside the running model,
then switched in between two generations; requests in flight finish on the old one. A version
that fails to verify or load is remembered, and the old base keeps serving. When ``current``
goes away (rolled back past the first evolved version), serve goes back to ``model.base``.
After every switch the adapter watcher re-reads ``checkpoints/adapter``: an adapter is applied
only to the base it was trained on, so the evolved base serves bare until train-lora has made
one for it (the old adapter is already merged into it).
"""

from __future__ import annotations

import logging
from typing import Any

from milton.core.artifacts import ArtifactStore
from milton.core.config import Settings
from milton.core.errors import ArtifactError
from milton.core.log import log_event
from milton.core.timeutil import iso, utcnow
from milton.serve.hot import HotModel
from milton.models.layout import BASE_GGUF, BASE_KIND, artifact_store

logger = logging.getLogger("milton.serve")


class BaseWatcher(HotModel[str]):
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
        from milton.models.refs import resolve_base

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
            self._loaded = None
            self.reloads += 1
            self.last_swap_s = record.locked_ms / 1e3
            self.last_reload = iso(utcnow())
            log_event(self.logger, f"no current {self.store.kind}: serving model.base again",
                      previous=previous)
        self._adapters_retry()
        return True
