"""The llama.cpp backend of the chat API: one GGUF base, the promoted LoRA adapter, hot swaps.

:class:`LlamaEngine` implements :class:`milton.serve.engine.ChatEngine` with llama-cpp-python
on one model context. Generations are serialised (one context, one KV cache); each runs
entirely on the adapter that was active when it started.

Adapter swap (:meth:`LlamaEngine.set_adapter`), without reloading the base:

1. off the context: ``llama_adapter_lora_init(model, path)`` parses and uploads the adapter
   beside the running one (NULL = unreadable, or made for another architecture or shape:
   rejected, the old adapter keeps serving);
2. waiting for the generation in flight to finish (a pending swap goes before queued
   requests), then, holding the context: ``llama_set_adapters_lora`` switches the context,
   ``llama_memory_clear`` drops the KV cache and ``Llama.reset()`` llama-cpp-python's prompt
   reuse, so no token computed under the old adapter is reused;
3. ``llama_adapter_lora_free`` frees the old adapter.

A base swap (:meth:`LlamaEngine.swap_base`) loads the new GGUF beside the old one, switches
under the same gate, re-applies the adapter only if it was made for the new base (by sha256),
and frees the old model once nothing uses it.

:class:`AdapterWatcher` (a :class:`~milton.serve.hot.HotModel` over ``checkpoints/adapter``)
turns promote and rollback (the ``current`` symlink) into swaps within ``serve.reload_poll_s``,
after verifying checksums and that the adapter's manifest names the served base's sha256. It
hands the engine the part of the artifact that engine reads (``adapter_artifact``:
``adapter.gguf`` here, the PEFT ``adapter/`` directory for
:class:`milton.serve.hf_engine.HFEngine`); :func:`open_engine` picks the backend from
``serve.backend`` and the kind of ``model.base``.

Prompts: ``model.chat_format`` ``plain`` -> ``"User: ...\\nAssistant:"`` (what train-lora
trains base models on); ``template``/``auto`` -> the GGUF's own chat template
(``tokenizer.chat_template``, rendered by llama-cpp-python's ``Jinja2ChatFormatter`` exactly
as its ``create_chat_completion`` does), falling back to ``plain`` for a model without one.
Tokens are sampled by a loop over ``Llama.generate`` so that usage is exact, a cancel takes
effect between two tokens, and stop strings are held back rather than streamed.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from milton.core.artifacts import ArtifactStore, sha256_file
from milton.core.config import Settings
from milton.core.errors import ArtifactError, ConfigError, MiltonError
from milton.core.log import log_event
from milton.core.timeutil import iso, utcnow
from milton.serve.engine import Chunk, EngineInfo, GenerationParams, Usage
from milton.serve.hot import HotModel
from milton.models.hf import usable_cpus

if TYPE_CHECKING:
    from milton.serve.hf_engine import HFEngine
    from milton.models.refs import BaseModelRef

ADAPTER_KIND = "adapter"
ADAPTER_FILE = "adapter.gguf"
PLAIN_USER = "User: "
PLAIN_ASSISTANT = "Assistant:"
PLAIN_STOP = "\nUser:"
_SWAP_HISTORY = 256

logger = logging.getLogger("milton.serve")


class AdapterError(MiltonError):
    """An adapter was rejected; whatever was serving before keeps serving."""


class PromptError(ValueError):
    """The request cannot be turned into a prompt for this model (too long, template refused)."""


@dataclass
class ServedChunk(Chunk):
    """A :class:`Chunk` that also says which adapter produced it (None = the bare base)."""

    adapter_version: str | None = None


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


# -- helpers --------------------------------------------------------------------------------------
def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("serve: llama-cpp-python is not installed (`make install`)") from None
    return llama_cpp


# llama.cpp's own log lines go to the "milton.serve.llama_cpp" logger at DEBUG instead of
# stderr (a swap on a repacked model prints one line per tensor); the warnings and errors of
# an adapter or model load in this thread are kept to say why it was rejected.
_llama_logger = logging.getLogger("milton.serve.llama_cpp")
_log_capture = threading.local()
_log_callback: Any = None
_log_last_level = 0
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT


def _install_log_callback(lc: Any) -> None:
    global _log_callback
    if _log_callback is not None:
        return

    @lc.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        global _log_last_level
        try:
            level = _log_last_level if level == _GGML_CONT else level
            _log_last_level = level
            message = text.decode("utf-8", "replace").strip()
            if not message:
                return
            lines = getattr(_log_capture, "lines", None)
            if lines is not None and level in (_GGML_WARN, _GGML_ERROR):
                lines.append(message)
            _llama_logger.debug(message)
        except Exception:  # noqa: BLE001 - never raise into C
            pass

    _log_callback = callback  # keep a reference: C holds only the pointer
    lc.llama_log_set(callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def _llama_messages() -> Iterator[list[str]]:
    """Warnings and errors llama.cpp logs in this thread inside the block."""
    lines: list[str] = []
    _log_capture.lines = lines
    try:
        yield lines
    finally:
        _log_capture.lines = None


def _reason(lines: list[str]) -> str:
    """The most telling captured line, without llama.cpp's function-name prefix."""
    errors = [line for line in lines if "error" in line.lower() or "fail" in line.lower()]
    line = (errors or lines or [""])[-1]
    head, sep, tail = line.partition(": ")
    return (tail if sep and " " not in head else line).strip()


def serve_backend(settings: Settings, ref: BaseModelRef) -> str:
    """'llama' or 'transformers': ``serve.backend``, where auto means llama for a GGUF base and
    transformers for a Hugging Face directory."""
    backend = settings.serve.backend
    if backend == "auto":
        return "transformers" if ref.kind == "hf" else "llama"
    return backend


def resolve_serve_base(settings: Settings, backend: str | None = None) -> BaseModelRef:
    """``model.base`` as a :class:`~milton.models.refs.BaseModelRef` (sha256 included) for
    ``backend`` (default: :func:`serve_backend`).

    Empty = the packaged Gemma 3 270M (assembled into ``data/models`` where the home cache is
    read-only). A Hugging Face directory for the llama backend is a one-line ConfigError:
    llama.cpp needs a GGUF. The transformers backend takes either (a GGUF is dequantised, as
    train-lora does).
    """
    from milton.models.refs import resolve_base

    ref = resolve_base(settings)
    if ref.kind != "gguf" and (backend or serve_backend(settings, ref)) == "llama":
        raise ConfigError(f"model.base: serve needs a GGUF file for serve.backend llama, and "
                          f"{ref.path} is a Hugging Face model directory; set serve.backend to "
                          "transformers (or auto), or convert it (llama.cpp's convert_hf_to_gguf.py) "
                          "and point model.base at the .gguf")
    return ref


def _promoted_at(store: ArtifactStore, name: str) -> str | None:
    """When ``current`` last switched to ``name`` (promote, publish or rollback)."""
    for entry in reversed(store.history()):
        if entry.get("version") == name and "previous" in entry:
            return entry.get("ts")
    return None


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """``model.chat_format`` plain: system text, then ``User: ...`` / ``Assistant: ...`` turns,
    ending with ``Assistant:`` (the format train-lora trains base models on)."""
    parts: list[str] = []
    system = [m.get("content") or "" for m in messages if m.get("role") == "system"]
    if system:
        parts.append("\n\n".join(system) + "\n\n")
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "user":
            parts.append(f"{PLAIN_USER}{content}\n")
        elif role == "assistant":
            parts.append(f"{PLAIN_ASSISTANT} {content}\n")
    parts.append(PLAIN_ASSISTANT)
    return "".join(parts)


def stop_strings(params: GenerationParams, mode: str) -> list[str]:
    """The request's stop strings, plus ``\\nUser:`` for plain prompts (the next turn)."""
    stops = [s for s in params.stop if s]
    if mode == "plain":
        stops.append(PLAIN_STOP)
    return stops


class StopScanner:
    """Decoded text in, streamable text out: the answer's leading space is dropped, text that
    could be the start of a stop string is held back, and the text is cut at the first stop.

    Shared by the backends so they stream, stop and strip alike.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.started = False
        self.stopped = False   # a stop string was found; ``pending`` is cut before it

    def push(self, text: str) -> str:
        """Add decoded text; return what may be streamed now ('' while held or once stopped)."""
        self.pending += text
        if not self.started and self.pending:
            if self.pending == " ":
                return ""  # SentencePiece's word-start space, not yet followed by text
            self.pending = self.pending[1:] if self.pending.startswith(" ") else self.pending
            self.started = True
        if self._cut():
            return ""
        emit = len(self.pending) - held_back(self.pending, self.stops, self.hold)
        if emit <= 0:
            return ""
        out, self.pending = self.pending[:emit], self.pending[emit:]
        return out

    def finish(self, tail: str = "") -> str:
        """After the last token: what is left (``tail`` = the decoder's flush), cut at a stop."""
        if not self.stopped:  # bytes after a stop string are not part of the answer
            self.pending += tail
        if not self.started:
            self.pending = self.pending.lstrip(" ")
        self._cut()
        out, self.pending = self.pending, ""
        return out

    def _cut(self) -> bool:
        cut = min((self.pending.find(s) for s in self.stops if s in self.pending), default=-1)
        if cut >= 0:
            self.pending = self.pending[:cut]
            self.stopped = True
        return self.stopped


def held_back(text: str, stops: list[str], hold: int) -> int:
    """How many trailing characters could be the start of a stop string (kept back)."""
    for n in range(min(hold, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


class _Gate:
    """Exclusive use of the context. Swaps go before queued generations (no starvation).

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


@dataclass
class _Adapter:
    handle: Any                 # llama_adapter_lora_p
    path: Path
    version: str | None
    base_sha256: str | None     # what its manifest says it was trained on (None = unchecked)
    promoted_at: str | None
    loaded_at: str
    freed: bool = False


@dataclass
class _Base:
    llm: Any                    # llama_cpp.Llama
    path: Path
    sha256: str
    template: Any               # Jinja2ChatFormatter, or None = plain prompts
    users: int = 0
    retired: bool = False
    freed: bool = False


def _piece(llama_cpp: Any, vocab: Any, token: int) -> bytes:
    """The bytes of one token (special tokens render as nothing)."""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(token), buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


# -- the engine -----------------------------------------------------------------------------------
class LlamaEngine:
    """llama-cpp-python on one GGUF, with a hot-swappable LoRA adapter. See the module docstring."""

    adapter_artifact = ADAPTER_FILE  # what AdapterWatcher hands to set_adapter

    def __init__(self, base_path: Path | str, *, sha256: str | None = None, n_ctx: int = 4096,
                 n_threads: int = 0, chat_format: str = "auto", model_id: str | None = None,
                 gpu_layers: int = 0, seed: int | None = None,
                 logger_: logging.Logger | None = None) -> None:
        self._lc = _llama_cpp()
        _install_log_callback(self._lc)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or usable_cpus()
        self.chat_format = chat_format
        self.gpu_layers = gpu_layers
        self.logger = logger_ or logger
        self._gate = _Gate()
        self._swap_lock = threading.Lock()   # one swap at a time (adapter or base)
        self._refs = threading.Lock()        # base users / retirement
        self._rng = random.Random(seed)
        self._closed = False
        self._base = self._load_base(Path(base_path), sha256)
        self._adapter: _Adapter | None = None
        self.model_id = model_id or self._base.path.stem
        # telemetry
        self.swaps = 0
        self.base_swaps = 0
        self.swap_failures = 0
        self.last_error: str | None = None
        self.last_swap: SwapRecord | None = None
        self.swap_history: deque[SwapRecord] = deque(maxlen=_SWAP_HISTORY)
        self.generations = 0
        self.cancelled = 0

    @classmethod
    def from_settings(cls, settings: Settings, ref: BaseModelRef | None = None,
                      **overrides: Any) -> LlamaEngine:
        """The served base from ``model.base`` (GGUF only; ``ref`` if already resolved), sized by
        the ``serve`` section."""
        from milton.serve.openai_api import default_model_id

        ref = ref or resolve_serve_base(settings, "llama")
        kwargs: dict[str, Any] = {
            "sha256": ref.sha256, "n_ctx": settings.serve.n_ctx,
            "n_threads": settings.serve.n_threads, "chat_format": settings.model.chat_format,
            # Named after model.base, not the file served: clients keep their model id when
            # an evolved base (checkpoints/base/<v>/model.gguf) is switched in.
            "model_id": settings.serve.model_name or default_model_id(settings),
            "gpu_layers": 0 if settings.model.device == "cpu" else -1,
        }
        kwargs.update(overrides)
        return cls(ref.path, **kwargs)

    # -- loading ----------------------------------------------------------------------------------
    def _load_base(self, path: Path, sha256: str | None, what: str = "model.base") -> _Base:
        lc = self._lc
        if not path.is_file():
            raise ConfigError(f"{what}: {path} does not exist")
        digest = sha256 or sha256_file(path)
        try:
            with _llama_messages() as lines:
                llm = lc.Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                               n_threads_batch=self.n_threads, n_gpu_layers=self.gpu_layers,
                               n_batch=min(512, self.n_ctx), verbose=False)
        except Exception as exc:  # noqa: BLE001 - the reason is in llama.cpp's log
            why = _reason(lines) or str(exc)
            raise ConfigError(f"{what}: llama.cpp cannot load {path}: {why}") from None
        return _Base(llm=llm, path=path, sha256=digest, template=self._formatter(llm))

    def _formatter(self, llm: Any) -> Any:
        if self.chat_format == "plain":
            return None
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = llm._model
        eos, bos = model.token_eos(), model.token_bos()
        return Jinja2ChatFormatter(template=template,
                                   eos_token=model.token_get_text(eos) if eos != -1 else "",
                                   bos_token=model.token_get_text(bos) if bos != -1 else "",
                                   add_generation_prompt=True)

    def _init_adapter(self, base: _Base, path: Path) -> Any:
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise AdapterError(f"{path}: {exc.strerror or exc}") from None
        if magic != b"GGUF":
            raise AdapterError(f"{path}: not a GGUF file")
        with _llama_messages() as lines:
            adapter = self._lc.llama_adapter_lora_init(base.llm._model.model, str(path).encode())
        if not adapter:
            why = _reason(lines).removeprefix("failed to apply lora adapter: ")
            raise AdapterError(f"{path}: llama.cpp rejected the adapter: {why}" if why else
                               f"{path}: llama.cpp rejected the adapter (truncated, not a LoRA, "
                               f"or made for another model than {base.path.name})")
        return adapter

    def _free_adapter(self, adapter: _Adapter | None) -> None:
        if adapter is None or adapter.freed:
            return
        adapter.freed = True
        self._lc.llama_adapter_lora_free(adapter.handle)

    def _apply(self, base: _Base, adapter: _Adapter | None) -> None:
        """Under the gate: put ``adapter`` on the context and forget every cached token."""
        lc, llm = self._lc, base.llm
        if adapter is None:
            rc = lc.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(adapter.handle)
            scales = (ctypes.c_float * 1)(1.0)
            rc = lc.llama_set_adapters_lora(llm._ctx.ctx, handles, 1, scales)
        if rc != 0:
            raise AdapterError(f"llama.cpp could not set the adapter on the context (code {rc})")
        memory = lc.llama_get_memory(llm._ctx.ctx)
        if memory is not None:
            lc.llama_memory_clear(memory, True)
        llm.reset()                 # n_tokens = 0: no prefix of the old KV cache is reused
        if llm.cache is not None:   # a prompt-state cache holds states of the old adapter
            llm.set_cache(None)

    def _detach(self, base: _Base) -> None:
        """Under the gate: no adapter on ``base``'s context (before the adapter is freed)."""
        self._lc.llama_set_adapters_lora(base.llm._ctx.ctx, None, 0, None)

    # -- public: adapter --------------------------------------------------------------------------
    @property
    def adapter_version(self) -> str | None:
        adapter = self._adapter
        return adapter.version if adapter is not None else None

    @property
    def base_sha256(self) -> str:
        return self._base.sha256

    def set_adapter(self, path: Path | str | None, version: str | None = None, *,
                    base_sha256: str | None = None, promoted_at: str | None = None) -> SwapRecord:
        """Serve ``path`` (a LoRA GGUF) from the next generation on; None = the bare base.

        ``base_sha256`` (from the adapter's manifest) must equal the served base's, if given.
        Raises :class:`AdapterError` (counted, ``last_error`` set) when the adapter is rejected;
        the previous adapter then keeps serving.
        """
        t0 = time.perf_counter()
        with self._swap_lock:
            self._check_open()
            base = self._base
            label = version or (str(path) if path is not None else None)
            new: _Adapter | None = None
            try:
                if path is not None:
                    path = Path(path)
                    if base_sha256 is not None and base_sha256 != base.sha256:
                        raise AdapterError(
                            f"adapter {label} was trained on base sha256 {base_sha256[:12]}…, "
                            f"but serve runs {base.path.name} (sha256 {base.sha256[:12]}…)")
                    handle = self._init_adapter(base, path)
                    new = _Adapter(handle, path, version, base_sha256, promoted_at,
                                   iso(utcnow()) or "")
            except AdapterError as exc:
                raise self._failed("adapter", label, t0, exc) from None
            t_loaded = time.perf_counter()
            self._gate.acquire(urgent=True)
            t_locked = time.perf_counter()
            try:
                try:
                    self._apply(base, new)
                except AdapterError as exc:
                    with contextlib.suppress(AdapterError):
                        self._apply(base, self._adapter)  # put the old one back
                    self._free_adapter(new)
                    raise self._failed("adapter", label, t0, exc) from None
                old, self._adapter = self._adapter, new
            finally:
                t_switched = time.perf_counter()
                self._gate.release()
            self._free_adapter(old)
            record = SwapRecord("adapter", version if path is not None else None, True,
                                load_ms=(t_loaded - t0) * 1e3, wait_ms=(t_locked - t_loaded) * 1e3,
                                locked_ms=(t_switched - t_locked) * 1e3,
                                total_ms=(time.perf_counter() - t0) * 1e3, at=iso(utcnow()) or "")
            self.swaps += 1
            self._record(record)
            log_event(self.logger, f"adapter now {version or ('bare base' if path is None else path)}",
                      previous=old.version if old else None,
                      locked_ms=round(record.locked_ms, 3), total_ms=round(record.total_ms, 3))
            return record

    def _failed(self, kind: str, label: str | None, t0: float, exc: Exception) -> MiltonError:
        """Count and log a rejected swap; the error to raise (the old state keeps serving)."""
        self.swap_failures += 1
        self.last_error = str(exc)
        record = SwapRecord(kind, label, False, load_ms=(time.perf_counter() - t0) * 1e3,
                            wait_ms=0.0, locked_ms=0.0, total_ms=(time.perf_counter() - t0) * 1e3,
                            error=str(exc), at=iso(utcnow()) or "")
        self._record(record)
        current = self.adapter_version if kind == "adapter" else self._base.path.name
        log_event(self.logger, f"rejected {kind} {label}; still serving {current or 'the bare base'}",
                  level=logging.ERROR, error=str(exc))
        return AdapterError(str(exc)) if kind == "adapter" else ConfigError(str(exc))

    def _record(self, record: SwapRecord) -> None:
        self.last_swap = record if record.ok else self.last_swap
        self.swap_history.append(record)

    # -- public: base -----------------------------------------------------------------------------
    def swap_base(self, path: Path | str, *, sha256: str | None = None) -> SwapRecord:
        """Serve another GGUF (an evolved base) without a gap: load beside, switch, free the old.

        The adapter is carried over only if its manifest named the new base's sha256; otherwise
        the new base serves bare until an adapter made for it is set. Raises ConfigError (and
        the old base keeps serving) when the new file cannot be loaded.
        """
        t0 = time.perf_counter()
        with self._swap_lock:
            self._check_open()
            path = Path(path)
            try:
                new_base = self._load_base(path, sha256, "base swap")
            except ConfigError as exc:
                raise self._failed("base", path.name, t0, exc) from None
            old_adapter = self._adapter
            carried: _Adapter | None = None
            dropped: str | None = None
            if old_adapter is not None:
                if old_adapter.base_sha256 == new_base.sha256:
                    try:
                        handle = self._init_adapter(new_base, old_adapter.path)
                        carried = _Adapter(handle, old_adapter.path, old_adapter.version,
                                           old_adapter.base_sha256, old_adapter.promoted_at,
                                           iso(utcnow()) or "")
                    except AdapterError as exc:
                        dropped = str(exc)
                else:
                    dropped = (f"adapter {old_adapter.version} was made for base sha256 "
                               f"{(old_adapter.base_sha256 or 'unknown')[:12]}…, not "
                               f"{new_base.path.name}; serving the new base bare")
            t_loaded = time.perf_counter()
            self._gate.acquire(urgent=True)
            t_locked = time.perf_counter()
            try:
                if carried is not None:
                    self._apply(new_base, carried)
                old_base, self._base, self._adapter = self._base, new_base, carried
                self._detach(old_base)
            except AdapterError as exc:
                self._gate.release()
                self._free_adapter(carried)
                self._retire(new_base)
                raise self._failed("base", path.name, t0, exc) from None
            t_switched = time.perf_counter()
            self._gate.release()
            self._free_adapter(old_adapter)   # before its model goes
            self._retire(old_base)
            if dropped:
                self.last_error = dropped
                log_event(self.logger, "adapter dropped on base swap", level=logging.WARNING,
                          error=dropped)
            record = SwapRecord("base", path.name, True, load_ms=(t_loaded - t0) * 1e3,
                                wait_ms=(t_locked - t_loaded) * 1e3,
                                locked_ms=(t_switched - t_locked) * 1e3,
                                total_ms=(time.perf_counter() - t0) * 1e3, at=iso(utcnow()) or "")
            self.base_swaps += 1
            self._record(record)
            log_event(self.logger, f"base now {path.name}", previous=old_base.path.name,
                      adapter=carried.version if carried else None,
                      locked_ms=round(record.locked_ms, 3), total_ms=round(record.total_ms, 3))
            return record

    def _use(self) -> _Base:
        with self._refs:
            self._check_open()
            base = self._base
            base.users += 1
            return base

    def _unuse(self, base: _Base) -> None:
        with self._refs:
            base.users -= 1
            free = base.retired and base.users == 0 and not base.freed
            if free:
                base.freed = True
        if free:
            base.llm.close()

    def _retire(self, base: _Base) -> None:
        with self._refs:
            base.retired = True
            free = base.users == 0 and not base.freed
            if free:
                base.freed = True
        if free:
            base.llm.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the language model engine is closed")

    # -- ChatEngine -------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        base, adapter, last = self._base, self._adapter, self.last_swap
        return EngineInfo(
            model_id=self.model_id, base_path=str(base.path), base_sha256=base.sha256,
            adapter_version=adapter.version if adapter else None,
            adapter_promoted_at=adapter.promoted_at if adapter else None,
            swaps=self.swaps, last_swap_ms=round(last.locked_ms, 3) if last else None,
            swap_failures=self.swap_failures, last_error=self.last_error,
            extra={
                "backend": "llama.cpp",
                "chat_format": "template" if base.template is not None else "plain",
                "n_ctx": self.n_ctx, "n_threads": self.n_threads,
                "adapter_path": str(adapter.path) if adapter else None,
                "adapter_loaded_at": adapter.loaded_at if adapter else None,
                "base_swaps": self.base_swaps,
                "last_swap_kind": last.kind if last else None,
                "last_swap_total_ms": round(last.total_ms, 3) if last else None,
                "last_swap_wait_ms": round(last.wait_ms, 3) if last else None,
                "last_swap_load_ms": round(last.load_ms, 3) if last else None,
                "generations": self.generations, "cancelled": self.cancelled,
            })

    def count_tokens(self, text: str) -> int:
        base = self._use()
        try:
            return len(base.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        finally:
            self._unuse(base)

    def render_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """(prompt token ids, 'template' | 'plain') for ``messages`` on the served base."""
        base = self._use()
        try:
            return self._render(base, messages)
        finally:
            self._unuse(base)

    def _render(self, base: _Base, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        llm = base.llm
        if base.template is not None:
            try:
                text = base.template(messages=[dict(m) for m in messages]).prompt
            except Exception as exc:  # noqa: BLE001 - a template's raise_exception, bad roles...
                raise PromptError(f"the model's chat template refused the messages: {exc}") from None
            # As llama-cpp-python's create_chat_completion: the template writes BOS itself.
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True), "template"
        # As train-lora tokenises plain prompts: BOS, no special-token parsing of user text.
        return llm.tokenize(plain_prompt(messages).encode("utf-8"), add_bos=True,
                            special=False), "plain"

    def chat(self, messages: list[dict[str, str]], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream the answer to ``messages``; the last chunk has finish_reason and usage.

        The prompt is checked now (:class:`PromptError` if the template refuses it or it does
        not fit the context); generation starts when the returned iterator is first advanced
        and holds the context until it is exhausted or closed.
        """
        base = self._use()
        try:
            ids, mode = self._render(base, messages)
            self._check_fits(ids)
        finally:
            self._unuse(base)
        return self._generate(base, messages, ids, mode, params, cancel)

    def _check_fits(self, ids: list[int]) -> None:
        if len(ids) >= self.n_ctx:
            raise PromptError(f"the prompt is {len(ids)} tokens; the context holds "
                              f"{self.n_ctx} (serve.n_ctx)")

    def _generate(self, rendered_for: _Base, messages: list[dict[str, str]], ids: list[int],
                  mode: str, params: GenerationParams,
                  cancel: threading.Event | None) -> Iterator[Chunk]:
        # Nothing is held until the first next(): an iterator dropped unstarted costs nothing.
        if not self._gate.acquire(cancel=cancel):
            self.cancelled += 1
            yield ServedChunk(finish_reason="cancelled", usage=Usage(len(ids), 0),
                              adapter_version=self.adapter_version)
            return
        try:
            base = self._use()  # raises once closed
            try:
                if base is not rendered_for:  # the base was swapped while this request queued
                    ids, mode = self._render(base, messages)
                    self._check_fits(ids)
                yield from self._run(base, ids, mode, params, cancel)
            finally:
                self._unuse(base)
        finally:
            self._gate.release()

    def _run(self, base: _Base, ids: list[int], mode: str, params: GenerationParams,
             cancel: threading.Event | None) -> Iterator[Chunk]:
        lc, llm = self._lc, base.llm
        version = self.adapter_version
        vocab = llm._model.vocab
        budget = self.n_ctx - len(ids)
        max_new = budget if params.max_tokens <= 0 else min(params.max_tokens, budget)
        scanner = StopScanner(stop_strings(params, mode))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        finish = "length"
        self.generations += 1
        llm.set_seed(params.seed if params.seed is not None else self._rng.randrange(2**31))
        tokens = llm.generate(ids, temp=max(0.0, params.temperature), top_p=params.top_p,
                              top_k=40, min_p=0.05, repeat_penalty=1.0)
        try:
            while produced < max_new:
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                token = next(tokens, None)
                if token is None or lc.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                text = scanner.push(decoder.decode(_piece(lc, vocab, token)))
                if scanner.stopped:
                    finish = "stop"
                    break
                if text:
                    yield ServedChunk(text=text, adapter_version=version)
        finally:
            tokens.close()
        if finish != "cancelled":
            rest = scanner.finish(decoder.decode(b"", final=True))
            finish = "stop" if scanner.stopped else finish
        else:
            self.cancelled += 1
            rest = ""
        yield ServedChunk(text=rest, finish_reason=finish, usage=Usage(len(ids), produced),
                          adapter_version=version)

    def close(self) -> None:
        """Free the adapter, the context and the model (waits for a generation in flight)."""
        with self._swap_lock:
            if self._closed:
                return
            with self._gate.hold(urgent=True):
                self._closed = True
                self._detach(self._base)
                adapter, self._adapter = self._adapter, None
                self._free_adapter(adapter)
                self._retire(self._base)


def open_engine(settings: Settings) -> tuple[LlamaEngine | HFEngine, AdapterWatcher | None]:
    """The served model from settings, and its adapter watcher (None if serve.adapter_enabled
    is false). The backend is :func:`serve_backend`'s: llama.cpp (:class:`LlamaEngine`) or
    transformers + PEFT (:class:`~milton.serve.hf_engine.HFEngine`). Start the watcher
    (``start()``: one synchronous check, then a thread) once the engine is up; at shutdown
    ``watcher.stop()`` then ``engine.close()``."""
    ref = resolve_serve_base(settings)
    engine: LlamaEngine | HFEngine
    if serve_backend(settings, ref) == "transformers":
        from milton.serve.hf_engine import HFEngine

        engine = HFEngine.from_settings(settings, ref)
    else:
        engine = LlamaEngine.from_settings(settings, ref)
    watcher = AdapterWatcher.from_settings(engine, settings) if settings.serve.adapter_enabled else None
    return engine, watcher


# -- watching checkpoints/adapter -----------------------------------------------------------------
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
        self.artifact: str = getattr(engine, "adapter_artifact", ADAPTER_FILE)

    @classmethod
    def from_settings(cls, engine: AdapterTarget, settings: Settings) -> AdapterWatcher:
        store = ArtifactStore(settings.paths.checkpoints_dir, ADAPTER_KIND,
                              keep=settings.train.keep_versions)
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
            self._loaded = None
            self.reloads += 1
            self.last_swap_s = record.locked_ms / 1e3
            self.last_reload = iso(utcnow())
            log_event(self.logger, f"no current {self.store.kind}: serving the bare base",
                      previous=previous)
            return True

    def retry(self) -> None:
        """Forget rejected versions and re-read ``current`` (e.g. after a base swap)."""
        with self._check_lock:
            self._bad.clear()
            self._loaded = None
        self.check()
