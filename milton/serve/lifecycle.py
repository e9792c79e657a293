"""The chat model's life in serve: opened in the background, watched, closed on shutdown.

:func:`open_engine` builds the backend ``model.base`` needs and its adapter watcher;
:class:`EngineLifecycle` runs the generation smoke test first (``serve.smoke_check``), opens
the engine off the event loop, starts the adapter and base watchers, hands the engine to the
/v1 API, and reports its state (off, loading, ok, or degraded with the reason) for /healthz,
/ml/telemetry, /metrics and ``data/serve.json``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from milton.core.config import Settings
from milton.core.errors import MiltonError
from milton.core.log import get_logger, log_event
from milton.models.llamacpp import gpu_layers
from milton.models.smoke import failure_line, run_smoke
from milton.serve.api.metrics import percentile
from milton.serve.engines.select import resolve_serve_base, serve_backend
from milton.serve.metrics import Metrics
from milton.serve.watch import AdapterWatcher, BaseWatcher

if TYPE_CHECKING:
    from milton.serve.engines.hf import HFEngine
    from milton.serve.engines.llama import LlamaEngine

logger = get_logger("serve")


def open_engine(settings: Settings) -> tuple[LlamaEngine | HFEngine, AdapterWatcher | None]:
    """The served model from settings, and its adapter watcher (None if serve.adapter_enabled
    is false). The backend is :func:`~milton.serve.engines.select.serve_backend`'s: llama.cpp
    (:class:`~milton.serve.engines.llama.LlamaEngine`) or transformers + PEFT
    (:class:`~milton.serve.engines.hf.HFEngine`). Start the watcher
    (``start()``: one synchronous check, then a thread) once the engine is up; at shutdown
    ``watcher.stop()`` then ``engine.close()``."""
    ref = resolve_serve_base(settings)
    engine: LlamaEngine | HFEngine
    if serve_backend(settings, ref) == "transformers":
        from milton.serve.engines.hf import HFEngine

        engine = HFEngine.from_settings(settings, ref)
    else:
        from milton.serve.engines.llama import LlamaEngine

        engine = LlamaEngine.from_settings(settings, ref)
    watcher = AdapterWatcher.from_settings(engine, settings) if settings.serve.adapter_enabled else None
    return engine, watcher


class EngineLifecycle:
    """The served LLM and its adapter watcher: opened in the background, closed on shutdown.

    A model that cannot load (no GGUF, bad file) is logged and reported in telemetry; serve
    keeps scoring processes and /v1 answers 503 with the reason.
    """

    def __init__(self, settings: Settings, *, enabled: bool) -> None:
        self.settings = settings
        self.enabled = enabled
        self.engine: Any = None
        self.watcher: Any = None
        self.base_watcher: Any = None  # evolved bases (checkpoints/base), llama.cpp engine only
        self.error: str | None = None
        self.smoke: dict[str, Any] | None = None  # the child-process generation check, if run
        self._closed = threading.Event()
        self.settled = threading.Event()  # loaded, failed, or not wanted

    def open(self, api: Any) -> None:
        try:
            self._open(api)
        finally:
            self.settled.set()

    @property
    def status(self) -> str:
        """off, loading, ok or degraded (wanted but not serving: :attr:`error` says why)."""
        if not self.enabled:
            return "off"
        if self.error:
            return "degraded"
        return "ok" if self.engine is not None else "loading"

    def _fail(self, api: Any, error: str) -> None:
        self.error = error
        api.set_unavailable(f"the language model is not available: {error}")
        log_event(logger, "language model not loaded", level=logging.ERROR, error=error)

    def _smoke_check(self) -> str | None:
        """Generate from the llama.cpp base in a child process first (serve.smoke_check): a
        build that crashes this CPU kills the child, not serve. The reason, or None if fine."""
        ref = resolve_serve_base(self.settings)
        if serve_backend(self.settings, ref) != "llama":
            return None
        result = run_smoke(ref.path, gpu_layers=gpu_layers(self.settings.model.device),
                           threads=self.settings.serve.n_threads)
        self.smoke = {"ok": result.ok, "signal": result.signal, "seconds": result.seconds,
                      "error": result.error}
        log_event(logger, "generation smoke test", model=str(ref.path), ok=result.ok,
                  seconds=result.seconds, signal=result.signal)
        return None if result.ok else failure_line(result)

    def _open(self, api: Any) -> None:
        if not self.enabled:
            return
        t0 = time.perf_counter()
        try:
            reason = self._smoke_check() if self.settings.serve.smoke_check else None
            if reason:
                self._fail(api, f"chat disabled: {reason}")
                return
            engine, watcher = open_engine(self.settings)
        except Exception as exc:  # noqa: BLE001 - serve the rest; say why in telemetry
            self._fail(api, str(exc) if isinstance(exc, MiltonError) else f"{type(exc).__name__}: {exc}")
            return
        if self._closed.is_set():  # shut down while loading
            engine.close()
            return
        self.watcher = watcher
        if watcher is not None:
            watcher.start()
        if hasattr(engine, "swap_base"):
            self.base_watcher = BaseWatcher(engine, self.settings, adapters=watcher)
            self.base_watcher.start()
        api.set_engine(engine)
        self.engine = engine  # last: /healthz says "ok" only once chat requests are served
        log_event(logger, "language model loaded", model=engine.info().model_id,
                  adapter=engine.info().adapter_version, load_s=round(time.perf_counter() - t0, 2))

    def close(self, api: Any) -> None:
        self._closed.set()
        api.set_engine(None)
        for watcher in (self.base_watcher, self.watcher):
            if watcher is not None:
                watcher.stop()
        if self.engine is not None:
            self.engine.close()

    def telemetry(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "status": self.status, "load_error": self.error,
                "smoke_check": self.smoke,
                "adapter_watcher": None if self.watcher is None else {
                    "reloads": self.watcher.reloads, "failures": self.watcher.failures,
                    "fallbacks": self.watcher.fallbacks, "last_reload": self.watcher.last_reload,
                    "last_error": self.watcher.last_error},
                "base_watcher": None if self.base_watcher is None else {
                    "evolved_version": (self.base_watcher.get().version
                                        if self.base_watcher.get() else None),
                    "reloads": self.base_watcher.reloads, "failures": self.base_watcher.failures,
                    "last_reload": self.base_watcher.last_reload,
                    "last_error": self.base_watcher.last_error},
                "swap_latency_ms": self.swap_latency()}

    def swap_latency(self) -> dict[str, Any] | None:
        """p50/p95/max of the recent successful adapter swaps: ``locked`` (the context held:
        what requests feel) and ``total`` (load beside + switch + free), from the engine's swap
        history; the last swap alone hides a slow one among many."""
        records = [r for r in list(getattr(self.engine, "swap_history", ())) if r.ok and r.kind == "adapter"]
        if not records:
            return None
        out: dict[str, Any] = {"count": len(records)}
        for name in ("locked", "total"):
            values = [getattr(r, f"{name}_ms") for r in records]
            for label, q in (("p50", .5), ("p95", .95), ("max", 1.0)):
                out[f"{name}_{label}"] = round(percentile(values, q) or 0.0, 3)
        return out

    def export_metrics(self, metrics: Metrics) -> None:
        if self.watcher is not None:  # rejected adapters while another kept serving
            metrics.fallbacks.labels("adapter").set(self.watcher.fallbacks)
        if self.engine is None:
            return
        info = self.engine.info()
        metrics.reloads.labels("adapter").set(info.swaps)
        metrics.failures.labels("adapter").set(info.swap_failures)
        if info.last_swap_ms is not None:
            metrics.swap.labels("adapter").set(info.last_swap_ms / 1000)
