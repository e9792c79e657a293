"""What the OpenAI-compatible API needs from a language-model backend, and what the backends share.

The API layer (:mod:`milton.serve.api.openai`) only talks to :class:`ChatEngine`. Two backends
implement it: llama.cpp (:class:`milton.serve.engines.llama.LlamaEngine`) and transformers +
PEFT (:class:`milton.serve.engines.hf.HFEngine`). Both are an :class:`Engine`: one model context
guarded by a :class:`ContextLock` (generations one at a time; a pending swap goes before queued
generations), a hot-swappable LoRA adapter behind the same swap steps (:meth:`Engine.set_adapter`:
load off the context, switch holding it, free the old one after) and the same bookkeeping of
swaps (counts, :class:`SwapRecord` history, logs), and the same token loop
(:meth:`Engine._stream`: stop strings held back, a cancel taking effect between two tokens, exact
usage). Each backend supplies only how it loads, switches, renders and computes a token.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from milton.core.errors import ConfigError, MiltonError
from milton.core.log import log_event
from milton.core.timeutil import iso, utcnow
from milton.models.prompt import StopScanner

SWAP_HISTORY = 256

logger = logging.getLogger("milton.serve")


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Chunk:
    """A piece of generated text. The last chunk of a generation has ``finish_reason``
    ('stop', 'length' or 'cancelled') and the final ``usage``."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class ServedChunk(Chunk):
    """A :class:`Chunk` that also says which adapter produced it (None = the bare base)."""

    adapter_version: str | None = None


@dataclass
class EngineInfo:
    """For /v1/models, /ml/telemetry and /healthz."""

    model_id: str
    base_path: str
    base_sha256: str | None = None
    adapter_version: str | None = None
    adapter_promoted_at: str | None = None
    swaps: int = 0
    last_swap_ms: float | None = None
    swap_failures: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SwapRecord:
    """One switch of the served adapter or base, successful or not."""

    kind: str                  # 'adapter' | 'base'
    version: str | None        # adapter version (None = removed), or the new base's file name
    ok: bool
    load_ms: float             # adapter/model load, off the context
    wait_ms: float             # waiting for the generation in flight
    locked_ms: float           # the context held for the switch (what requests feel)
    total_ms: float            # all of it, from the call to the return
    error: str | None = None
    at: str = ""


class AdapterError(MiltonError):
    """An adapter was rejected; whatever was serving before keeps serving."""


class PromptError(ValueError):
    """The request cannot be turned into a prompt for this model (too long, template refused)."""


class ChatEngine(Protocol):
    """One model context: generations are serialised by the engine itself.

    ``chat`` blocks the calling (worker) thread. A generation runs entirely on the adapter
    that was active when it started; an adapter or base swap waits for it to finish and
    applies to the next one. Setting ``cancel`` stops a generation at the next token
    (finish_reason 'cancelled').
    """

    def info(self) -> EngineInfo: ...

    def count_tokens(self, text: str) -> int: ...

    def chat(self, messages: list[dict[str, str]], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[Chunk]: ...

    def close(self) -> None: ...


@dataclass
class LoadedAdapter:
    """What an engine keeps about the adapter it serves (each backend adds its handle)."""

    path: Path
    version: str | None
    base_sha256: str | None     # what its manifest says it was trained on (None = unchecked)
    promoted_at: str | None
    loaded_at: str


class ContextLock:
    """Exclusive use of the model context. Swaps (``urgent``) go before queued generations, so
    a swap never starves behind a busy queue.

    Not bound to a thread: a streaming generation may be resumed by different worker threads.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._busy = False
        self._urgent = 0

    def acquire(self, *, urgent: bool = False, cancel: threading.Event | None = None) -> bool:
        with self._cond:
            if urgent:
                self._urgent += 1
            try:
                while self._busy or (not urgent and self._urgent):
                    if cancel is not None and cancel.is_set():
                        return False
                    self._cond.wait(0.05 if cancel is not None else None)
                self._busy = True
                return True
            finally:
                if urgent:
                    self._urgent -= 1

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        self.acquire(urgent=urgent)
        try:
            yield
        finally:
            self.release()


class Engine:
    """The part of a serve backend that does not depend on the backend; see the module docstring.

    A backend implements :meth:`_prepare_adapter` (off the context), :meth:`_switch_adapter`
    and :meth:`_release` (holding it), :meth:`_drop_adapter` (after it), and
    :meth:`_base_name`; :attr:`_swap_log` adds fields to the "adapter now" log line.
    """

    _swap_log: dict[str, Any] = {}

    def __init__(self, *, seed: int | None = None, logger_: logging.Logger | None = None) -> None:
        self.logger = logger_ or logger
        self._context = ContextLock()
        self._swap_lock = threading.Lock()   # one swap at a time (adapter or base)
        self._rng = random.Random(seed)
        self._closed = False
        self._adapter: Any = None            # the LoadedAdapter served, None = the bare base
        # telemetry
        self.swaps = 0
        self.base_swaps = 0
        self.swap_failures = 0
        self.last_error: str | None = None
        self.last_swap: SwapRecord | None = None
        self.swap_history: deque[SwapRecord] = deque(maxlen=SWAP_HISTORY)
        self.generations = 0
        self.cancelled = 0

    # -- to implement -----------------------------------------------------------------------------
    def _prepare_adapter(self, path: Path, version: str | None, base_sha256: str | None,
                         promoted_at: str | None) -> Any:
        """Off the context: check and load the adapter at ``path``; AdapterError if rejected."""
        raise NotImplementedError

    def _switch_adapter(self, new: Any) -> Any:
        """Holding the context: serve ``new`` (None: the bare base) from the next generation
        on; on AdapterError the previous adapter must still be served. Returns what
        :meth:`_drop_adapter` frees once the context is released."""
        raise NotImplementedError

    def _drop_adapter(self, old: Any) -> None:
        """After the switch: free what :meth:`_switch_adapter` returned."""

    def _release(self) -> None:
        """Holding the context, at close: free the adapter and the model."""

    def _base_name(self) -> str:
        raise NotImplementedError

    # -- adapter ----------------------------------------------------------------------------------
    @property
    def adapter_version(self) -> str | None:
        adapter = self._adapter
        return adapter.version if adapter is not None else None

    def set_adapter(self, path: Path | str | None, version: str | None = None, *,
                    base_sha256: str | None = None, promoted_at: str | None = None) -> SwapRecord:
        """Serve the adapter at ``path`` from the next generation on; None = the bare base.

        ``base_sha256`` (from the adapter's manifest) must equal the served base's, if given.
        Raises :class:`AdapterError` (counted, ``last_error`` set) when the adapter is rejected;
        the previous adapter then keeps serving.
        """
        t0 = time.perf_counter()
        with self._swap_lock:
            self._check_open()
            label = version or (str(path) if path is not None else None)
            new = None
            if path is not None:
                path = Path(path)
                try:
                    new = self._prepare_adapter(path, version, base_sha256, promoted_at)
                except AdapterError as exc:
                    raise self._failed("adapter", label, t0, exc) from None
            t_loaded = time.perf_counter()
            self._context.acquire(urgent=True)
            t_locked = time.perf_counter()
            try:
                try:
                    old = self._switch_adapter(new)
                except AdapterError as exc:
                    raise self._failed("adapter", label, t0, exc) from None
                previous, self._adapter = self._adapter, new
            finally:
                t_switched = time.perf_counter()
                self._context.release()
            self._drop_adapter(old)
            record = self._swapped("adapter", version if path is not None else None,
                                   t0, t_loaded, t_locked, t_switched)
            log_event(self.logger, f"adapter now {version or ('bare base' if path is None else path)}",
                      previous=previous.version if previous else None, **self._swap_log,
                      locked_ms=round(record.locked_ms, 3), total_ms=round(record.total_ms, 3))
            return record

    # -- swap bookkeeping -------------------------------------------------------------------------
    def _swapped(self, kind: str, version: str | None, t0: float, t_loaded: float,
                 t_locked: float, t_switched: float) -> SwapRecord:
        """Count and record a successful swap, timed from the call (``t0``), the load done,
        the context taken and the switch done."""
        record = SwapRecord(kind, version, True, load_ms=(t_loaded - t0) * 1e3,
                            wait_ms=(t_locked - t_loaded) * 1e3,
                            locked_ms=(t_switched - t_locked) * 1e3,
                            total_ms=(time.perf_counter() - t0) * 1e3, at=iso(utcnow()) or "")
        if kind == "adapter":
            self.swaps += 1
        else:
            self.base_swaps += 1
        self._record(record)
        return record

    def _failed(self, kind: str, label: str | None, t0: float, exc: Exception) -> MiltonError:
        """Count and log a rejected swap; the error to raise (the old state keeps serving)."""
        self.swap_failures += 1
        self.last_error = str(exc)
        record = SwapRecord(kind, label, False, load_ms=(time.perf_counter() - t0) * 1e3,
                            wait_ms=0.0, locked_ms=0.0, total_ms=(time.perf_counter() - t0) * 1e3,
                            error=str(exc), at=iso(utcnow()) or "")
        self._record(record)
        current = self.adapter_version if kind == "adapter" else self._base_name()
        log_event(self.logger, f"rejected {kind} {label}; still serving {current or 'the bare base'}",
                  level=logging.ERROR, error=str(exc))
        return AdapterError(str(exc)) if kind == "adapter" else ConfigError(str(exc))

    def _record(self, record: SwapRecord) -> None:
        self.last_swap = record if record.ok else self.last_swap
        self.swap_history.append(record)

    def _info(self, model_id: str, base_path: Path, base_sha256: str | None,
              head: dict[str, Any], tail: dict[str, Any] | None = None) -> EngineInfo:
        """:class:`EngineInfo` with the swap figures; ``head`` and ``tail`` are the backend's
        own ``extra`` fields, before and after the shared ones."""
        adapter, last = self._adapter, self.last_swap
        return EngineInfo(
            model_id=model_id, base_path=str(base_path), base_sha256=base_sha256,
            adapter_version=adapter.version if adapter else None,
            adapter_promoted_at=adapter.promoted_at if adapter else None,
            swaps=self.swaps, last_swap_ms=round(last.locked_ms, 3) if last else None,
            swap_failures=self.swap_failures, last_error=self.last_error,
            extra={
                **head,
                "adapter_path": str(adapter.path) if adapter else None,
                "adapter_loaded_at": adapter.loaded_at if adapter else None,
                "base_swaps": self.base_swaps,
                "last_swap_kind": last.kind if last else None,
                "last_swap_total_ms": round(last.total_ms, 3) if last else None,
                "last_swap_wait_ms": round(last.wait_ms, 3) if last else None,
                "last_swap_load_ms": round(last.load_ms, 3) if last else None,
                "generations": self.generations, "cancelled": self.cancelled,
                **(tail or {}),
            })

    # -- generation -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the language model engine is closed")

    def _check_fits(self, ids: list[int], n_ctx: int) -> None:
        if len(ids) >= n_ctx:
            raise PromptError(f"the prompt is {len(ids)} tokens; the context holds "
                              f"{n_ctx} (serve.n_ctx)")

    def _exclusive(self, ids: list[int], cancel: threading.Event | None,
                   run: Callable[[], Iterator[Chunk]]) -> Iterator[Chunk]:
        """``run()``'s chunks, holding the context; a cancelled wait yields one 'cancelled'
        chunk. Nothing is held until the first next(): an iterator dropped unstarted costs
        nothing."""
        if not self._context.acquire(cancel=cancel):
            self.cancelled += 1
            yield ServedChunk(finish_reason="cancelled", usage=Usage(len(ids), 0),
                              adapter_version=self.adapter_version)
            return
        try:
            yield from run()
        finally:
            self._context.release()

    def _stream(self, n_prompt: int, max_new: int, tokens: Iterator[int | None],
                is_end: Callable[[int], bool], decode: Callable[[int], str],
                flush: Callable[[], str], scanner: StopScanner,
                cancel: threading.Event | None, version: str | None,
                done: Callable[[int], None] | None = None) -> Iterator[ServedChunk]:
        """The token loop: up to ``max_new`` tokens from ``tokens`` (None or ``is_end`` ends
        it), each decoded and passed through ``scanner``; the last chunk has the finish
        reason and the usage. ``done(produced)`` runs when the last token is in, before the
        last chunk (free the token source there)."""
        produced = 0
        finish = "length"
        while produced < max_new:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            token = next(tokens, None)
            if token is None or is_end(token):
                finish = "stop"
                break
            produced += 1
            text = scanner.push(decode(token))
            if scanner.stopped:
                finish = "stop"
                break
            if text:
                yield ServedChunk(text=text, adapter_version=version)
        if done is not None:
            done(produced)
        if finish != "cancelled":
            rest = scanner.finish(flush())
            finish = "stop" if scanner.stopped else finish
        else:
            self.cancelled += 1
            rest = ""
        yield ServedChunk(text=rest, finish_reason=finish, usage=Usage(n_prompt, produced),
                          adapter_version=version)

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the adapter and the model (waits for a generation in flight)."""
        with self._swap_lock:
            if self._closed:
                return
            with self._context.hold(urgent=True):
                self._closed = True
                self._release()
            self._after_close()

    def _after_close(self) -> None:
        """After the context is released at close (e.g. give memory back to the device)."""
