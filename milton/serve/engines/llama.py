"""The llama.cpp backend of the chat API: one GGUF base, the promoted LoRA adapter, hot swaps.

:class:`LlamaEngine` is an :class:`~milton.serve.engines.base.Engine` on llama-cpp-python's one
model context. Generations are serialised (one context, one KV cache); each runs entirely on
the adapter that was active when it started.

Adapter swap (:meth:`~milton.serve.engines.base.Engine.set_adapter`), without reloading the base:

1. off the context: ``llama_adapter_lora_init(model, path)`` parses and uploads the adapter
   beside the running one (NULL = unreadable, or made for another architecture or shape:
   rejected, the old adapter keeps serving);
2. waiting for the generation in flight to finish (a pending swap goes before queued
   requests), then, holding the context: ``llama_set_adapters_lora`` switches the context,
   ``llama_memory_clear`` drops the KV cache and ``Llama.reset()`` llama-cpp-python's prompt
   reuse, so no token computed under the old adapter is reused;
3. ``llama_adapter_lora_free`` frees the old adapter.

A base swap (:meth:`LlamaEngine.swap_base`) loads the new GGUF beside the old one, switches
under the same lock, re-applies the adapter only if it was made for the new base (by sha256),
and frees the old model once nothing uses it.

Prompts (:func:`milton.models.prompt.serve_format`): ``template``/``auto`` -> the GGUF's own
chat template (``tokenizer.chat_template``, rendered by llama-cpp-python's
``Jinja2ChatFormatter`` exactly as its ``create_chat_completion`` does), falling back to
``few-shot`` (:func:`milton.models.prompt.few_shot_prompt`: a base model framed as an assistant,
answers cut where they start looping) for a model without one; ``few-shot`` and ``plain``
(:func:`milton.models.prompt.plain_prompt`, what train-lora trains base models on) on request.
Tokens are sampled by a loop over ``Llama.generate`` so that usage is exact, a cancel takes
effect between two tokens, and stop strings are held back rather than streamed.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milton.core.artifacts import sha256_file
from milton.core.config import Settings
from milton.core.errors import ConfigError
from milton.core.log import log_event
from milton.core.timeutil import iso, utcnow
from milton.models.hf import usable_cpus
from milton.models.layout import ADAPTER_GGUF
from milton.models.llamacpp import (
    failure_reason,
    gpu_layers,
    install_log_callback,
    llama_cpp,
    llama_messages,
)
from milton.models.prompt import StopScanner, serve_format, stop_strings, turn_prompt
from milton.models.refs import BaseModelRef, default_model_id, gguf_error
from milton.serve.engines.base import (
    AdapterError,
    Chunk,
    Engine,
    EngineInfo,
    GenerationParams,
    LoadedAdapter,
    PromptError,
    SwapRecord,
)
from milton.serve.engines.select import resolve_serve_base


@dataclass
class _Adapter(LoadedAdapter):
    handle: Any = None          # llama_adapter_lora_p
    freed: bool = False


@dataclass
class _Base:
    llm: Any                    # llama_cpp.Llama
    path: Path
    sha256: str
    template: Any               # Jinja2ChatFormatter, or None = few-shot/plain prompts
    mode: str                   # 'template' | 'few-shot' | 'plain' (serve_format)
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
class LlamaEngine(Engine):
    """llama-cpp-python on one GGUF, with a hot-swappable LoRA adapter. See the module docstring."""

    adapter_artifact = ADAPTER_GGUF  # what AdapterWatcher hands to set_adapter

    def __init__(self, base_path: Path | str, *, sha256: str | None = None, n_ctx: int = 4096,
                 n_threads: int = 0, chat_format: str = "auto", model_id: str | None = None,
                 gpu_layers: int = 0, seed: int | None = None,
                 logger_: logging.Logger | None = None) -> None:
        self._lc = llama_cpp()
        install_log_callback(self._lc)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or usable_cpus()
        self.chat_format = chat_format
        self.gpu_layers = gpu_layers
        super().__init__(seed=seed, logger_=logger_)
        self._refs = threading.Lock()        # base users / retirement
        self._base = self._load_base(Path(base_path), sha256)
        self._adapter: _Adapter | None = None
        self.model_id = model_id or self._base.path.stem

    @classmethod
    def from_settings(cls, settings: Settings, ref: BaseModelRef | None = None,
                      **overrides: Any) -> LlamaEngine:
        """The served base from ``model.base`` (GGUF only; ``ref`` if already resolved), sized by
        the ``serve`` section."""
        ref = ref or resolve_serve_base(settings, "llama")
        kwargs: dict[str, Any] = {
            "sha256": ref.sha256, "n_ctx": settings.serve.n_ctx,
            "n_threads": settings.serve.n_threads, "chat_format": settings.model.chat_format,
            # Named after model.base, not the file served: clients keep their model id when
            # an evolved base (checkpoints/base/<v>/model.gguf) is switched in.
            "model_id": settings.serve.model_name or default_model_id(settings),
            "gpu_layers": gpu_layers(settings.model.device),
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
            with llama_messages() as lines:
                llm = lc.Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                               n_threads_batch=self.n_threads, n_gpu_layers=self.gpu_layers,
                               n_batch=min(512, self.n_ctx), verbose=False)
        except Exception as exc:  # noqa: BLE001 - the reason is in llama.cpp's log
            why = failure_reason(lines) or str(exc)
            raise ConfigError(f"{what}: llama.cpp cannot load {path}: {why}") from None
        template = self._formatter(llm)
        return _Base(llm=llm, path=path, sha256=digest, template=template,
                     mode=serve_format(self.chat_format, template is not None))

    def _formatter(self, llm: Any) -> Any:
        template = llm.metadata.get("tokenizer.chat_template")
        if serve_format(self.chat_format, bool(template)) != "template":
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = llm._model
        eos, bos = model.token_eos(), model.token_bos()
        return Jinja2ChatFormatter(template=template,
                                   eos_token=model.token_get_text(eos) if eos != -1 else "",
                                   bos_token=model.token_get_text(bos) if bos != -1 else "",
                                   add_generation_prompt=True)

    def _init_adapter(self, base: _Base, path: Path) -> Any:
        error = gguf_error(path)
        if error is not None:
            raise AdapterError(error)
        with llama_messages() as lines:
            adapter = self._lc.llama_adapter_lora_init(base.llm._model.model, str(path).encode())
        if not adapter:
            why = failure_reason(lines).removeprefix("failed to apply lora adapter: ")
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
        """Holding the context lock: put ``adapter`` on the context and forget every cached token."""
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
        """Holding the context lock: no adapter on ``base``'s context (before the adapter is freed)."""
        self._lc.llama_set_adapters_lora(base.llm._ctx.ctx, None, 0, None)

    # -- adapter swaps (Engine) -------------------------------------------------------------------
    @property
    def base_sha256(self) -> str:
        return self._base.sha256

    def _base_name(self) -> str:
        return self._base.path.name

    def _prepare_adapter(self, path: Path, version: str | None, base_sha256: str | None,
                         promoted_at: str | None) -> _Adapter:
        base = self._base
        if base_sha256 is not None and base_sha256 != base.sha256:
            raise AdapterError(
                f"adapter {version or path} was trained on base sha256 {base_sha256[:12]}…, "
                f"but serve runs {base.path.name} (sha256 {base.sha256[:12]}…)")
        handle = self._init_adapter(base, path)
        return _Adapter(path, version, base_sha256, promoted_at, iso(utcnow()) or "", handle)

    def _switch_adapter(self, new: _Adapter | None) -> _Adapter | None:
        base = self._base
        try:
            self._apply(base, new)
        except AdapterError:
            with contextlib.suppress(AdapterError):
                self._apply(base, self._adapter)  # put the old one back
            self._free_adapter(new)
            raise
        return self._adapter

    def _drop_adapter(self, old: _Adapter | None) -> None:
        self._free_adapter(old)

    # -- base swaps -------------------------------------------------------------------------------
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
                        carried = _Adapter(old_adapter.path, old_adapter.version,
                                           old_adapter.base_sha256, old_adapter.promoted_at,
                                           iso(utcnow()) or "", handle)
                    except AdapterError as exc:
                        dropped = str(exc)
                else:
                    dropped = (f"adapter {old_adapter.version} was made for base sha256 "
                               f"{(old_adapter.base_sha256 or 'unknown')[:12]}…, not "
                               f"{new_base.path.name}; serving the new base bare")
            t_loaded = time.perf_counter()
            self._context.acquire(urgent=True)
            t_locked = time.perf_counter()
            try:
                if carried is not None:
                    self._apply(new_base, carried)
                old_base, self._base, self._adapter = self._base, new_base, carried
                self._detach(old_base)
            except AdapterError as exc:
                self._context.release()
                self._free_adapter(carried)
                self._retire(new_base)
                raise self._failed("base", path.name, t0, exc) from None
            t_switched = time.perf_counter()
            self._context.release()
            self._free_adapter(old_adapter)   # before its model goes
            self._retire(old_base)
            if dropped:
                self.last_error = dropped
                log_event(self.logger, "adapter dropped on base swap", level=logging.WARNING,
                          error=dropped)
            record = self._swapped("base", path.name, t0, t_loaded, t_locked, t_switched)
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

    # -- ChatEngine -------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        base = self._base
        return self._info(self.model_id, base.path, base.sha256, {
            "backend": "llama.cpp",
            "chat_format": base.mode,
            "n_ctx": self.n_ctx, "n_threads": self.n_threads})

    def count_tokens(self, text: str) -> int:
        base = self._use()
        try:
            return len(base.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        finally:
            self._unuse(base)

    def render_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """(prompt token ids, 'template' | 'few-shot' | 'plain') for ``messages`` on the
        served base."""
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
        return llm.tokenize(turn_prompt(messages, base.mode).encode("utf-8"), add_bos=True,
                            special=False), base.mode

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
            self._check_fits(ids, self.n_ctx)
        finally:
            self._unuse(base)
        return self._exclusive(ids, cancel, lambda: self._generate(base, messages, ids, mode,
                                                                   params, cancel))

    def _generate(self, rendered_for: _Base, messages: list[dict[str, str]], ids: list[int],
                  mode: str, params: GenerationParams,
                  cancel: threading.Event | None) -> Iterator[Chunk]:
        base = self._use()  # raises once closed
        try:
            if base is not rendered_for:  # the base was swapped while this request queued
                ids, mode = self._render(base, messages)
                self._check_fits(ids, self.n_ctx)
            yield from self._run(base, ids, mode, params, cancel)
        finally:
            self._unuse(base)

    def _run(self, base: _Base, ids: list[int], mode: str, params: GenerationParams,
             cancel: threading.Event | None) -> Iterator[Chunk]:
        lc, llm = self._lc, base.llm
        vocab = llm._model.vocab
        budget = self.n_ctx - len(ids)
        max_new = budget if params.max_tokens <= 0 else min(params.max_tokens, budget)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.generations += 1
        llm.set_seed(params.seed if params.seed is not None else self._rng.randrange(2**31))
        tokens = llm.generate(ids, temp=max(0.0, params.temperature), top_p=params.top_p,
                              top_k=40, min_p=0.05, repeat_penalty=1.0)
        try:
            yield from self._stream(
                len(ids), max_new, tokens, lambda token: lc.llama_vocab_is_eog(vocab, token),
                lambda token: decoder.decode(_piece(lc, vocab, token)),
                lambda: decoder.decode(b"", final=True),
                StopScanner(stop_strings(params.stop, mode), loop_guard=mode == "few-shot"),
                cancel, self.adapter_version, done=lambda _produced: tokens.close())
        finally:
            tokens.close()

    def _release(self) -> None:
        self._detach(self._base)
        adapter, self._adapter = self._adapter, None
        self._free_adapter(adapter)
        self._retire(self._base)
