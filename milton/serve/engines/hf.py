"""The transformers + PEFT backend of the chat API: a Hugging Face base, the promoted LoRA adapter,
hot swaps. For users with a GPU and a Hugging Face model (``serve.backend`` transformers, or auto
with a model directory as ``model.base``).

:class:`HFEngine` is an :class:`~milton.serve.engines.base.Engine` like
:class:`milton.serve.engines.llama.LlamaEngine`, and shares its parts: the lock that serialises
generations (swaps go before queued requests), the swap steps and records, the token loop, the
prompt formats and stop-string scanner (:mod:`milton.models.prompt`) and the adapter watcher. The base is loaded by
:func:`milton.models.hf.load_base`, so device and dtype are train-lora's: CUDA in bf16 when
present (``model.device`` auto|cuda), else the CPU in fp32 with ``serve.n_threads`` threads.

Adapter swap (:meth:`~milton.serve.engines.base.Engine.set_adapter`; the artifact's PEFT
``adapter/`` directory):

1. off the context lock: the directory is checked (a LoRA ``adapter_config.json``, readable
   ``adapter_model.safetensors``, every LoRA matrix shaped for a module of this base), then
   PEFT ``add_adapter`` + ``load_adapter`` put it under a new adapter name beside the running
   one, which a generation in flight never looks at (it only runs its active adapter);
2. waiting for the generation in flight (a pending swap goes before queued requests), then,
   holding the context lock: ``set_adapter`` makes it the active one. No KV cache outlives a
   generation here, so nothing computed under the old adapter is reused;
3. ``delete_adapter`` drops the old one.

The first adapter of a process has no PEFT wrapper to go beside: wrapping injects LoRA layers
into the base in place, so that one is loaded under the context lock (usually at startup, before any
request; its cost shows in ``locked_ms``). The wrapper then stays; the bare base is the wrapper
with no adapter left. A rejected adapter raises :class:`~milton.serve.engines.base.AdapterError`
and the old one keeps serving.

Prompts are rendered as the llama backend renders them (:func:`~milton.models.prompt.serve_format`):
``template``/``auto`` is the tokenizer's chat template with the generation prompt, as
train-lora's :func:`~milton.train.formatting.prompt_ids` tokenises it, falling back to
``few-shot`` (:func:`~milton.models.prompt.few_shot_prompt`) when the tokenizer has no usable
template (:func:`~milton.train.formatting.has_usable_template`); ``few-shot`` and ``plain``
(:func:`~milton.models.prompt.plain_prompt`) on request, both with BOS and no special-token
parsing of user text.
Tokens come from a loop over the model's forward with its KV cache: greedy at temperature 0,
else llama.cpp's sampler chain (top-k 40, top-p, min-p 0.05, then temperature) with a seeded
generator; usage is exact, a cancel takes effect between two tokens, stop strings are held back.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milton.core.config import Settings
from milton.core.timeutil import iso, utcnow
from milton.models.layout import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS
from milton.models.prompt import (
    TURN_FORMATS,
    StopScanner,
    serve_format,
    stop_strings,
    turn_prompt,
)
from milton.models.refs import BaseModelRef
from milton.serve.engines.base import (
    AdapterError,
    Chunk,
    Engine,
    EngineInfo,
    GenerationParams,
    LoadedAdapter,
    PromptError,
    ServedChunk,
)
from milton.serve.engines.select import resolve_serve_base

TOP_K = 40                # llama-cpp-python's defaults, as LlamaEngine samples
MIN_P = 0.05
_PEFT_PREFIX = "base_model.model."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class _Adapter(LoadedAdapter):
    name: str = ""              # the PEFT adapter name inside the model
    config: Any = None          # its PEFT config, checked and ready to load for inference


class _Detokenizer:
    """Token ids in, text out, a piece at a time, as the whole sequence would decode.

    Each step decodes a short window twice (with and without the new token) and emits the
    difference, so a tokenizer's word-start space and multi-token characters come out right
    (a piece ending in U+FFFD waits for the next token). Special tokens render as nothing.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the last emitted piece, as context
        self.read = 0    # tokens up to here are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _delta(self) -> tuple[str, str]:
        return self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])

    def push(self, token: int) -> str:
        self.ids.append(token)
        before, after = self._delta()
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held (an incomplete character at the very end)."""
        before, after = self._delta()
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class HFEngine(Engine):
    """transformers + PEFT on one Hugging Face base, with a hot-swappable LoRA adapter.

    See the module docstring. ``base`` is a resolved :class:`~milton.models.refs.BaseModelRef`
    (its sha256 is what adapter manifests are checked against); ``dtype`` overrides the
    device's (CUDA bf16, CPU fp32).
    """

    adapter_artifact = ADAPTER_DIR  # what AdapterWatcher hands to set_adapter
    _swap_log = {"backend": "transformers"}

    def __init__(self, base: BaseModelRef, *, device: str = "auto", n_threads: int = 0,
                 n_ctx: int = 4096, chat_format: str = "auto", model_id: str | None = None,
                 seed: int | None = None, dtype: Any = None,
                 logger_: logging.Logger | None = None) -> None:
        import torch

        from milton.models.hf import load_base
        from milton.train.formatting import has_usable_template

        super().__init__(seed=seed, logger_=logger_)
        self.ref = base
        self._lm, self._tok = load_base(base, device, n_threads, dtype)  # dtype None: bf16 on CUDA
        first = next(self._lm.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.n_threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        self.chat_format = serve_format(chat_format, chat_format not in TURN_FORMATS
                                        and has_usable_template(self._tok))
        limit = getattr(self._lm.config, "max_position_embeddings", None)
        self.n_ctx = min(n_ctx, limit) if isinstance(limit, int) and limit > 0 else n_ctx
        self._eos = self._eos_ids()
        self._keep_last = "logits_to_keep" in inspect.signature(self._lm.forward).parameters
        self.model_id = model_id or (base.path.stem if base.kind == "gguf" else base.path.name)
        self._names = itertools.count(1)     # fresh PEFT adapter names
        self._peft: Any = None               # the PeftModel wrapper, once an adapter was loaded
        self._adapter: _Adapter | None = None
        self.last_tokens_per_s: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, ref: BaseModelRef | None = None,
                      **overrides: Any) -> HFEngine:
        """The served base from ``model.base`` (``ref`` if already resolved) on ``model.device``,
        sized by the ``serve`` section."""
        ref = ref or resolve_serve_base(settings, "transformers")
        kwargs: dict[str, Any] = {
            "device": settings.model.device, "n_threads": settings.serve.n_threads,
            "n_ctx": settings.serve.n_ctx, "chat_format": settings.model.chat_format,
            "model_id": settings.serve.model_name or None,
        }
        kwargs.update(overrides)
        return cls(ref, **kwargs)

    def _eos_ids(self) -> set[int]:
        """Every id that ends a turn: the tokenizer's EOS and the generation config's."""
        ids: set[int] = set()
        generation = getattr(self._lm, "generation_config", None)
        for value in (self._tok.eos_token_id, getattr(generation, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    # -- adapter swaps (Engine) -------------------------------------------------------------------
    @property
    def base_sha256(self) -> str:
        return self.ref.sha256

    def _base_name(self) -> str:
        return self.ref.name

    def _prepare_adapter(self, path: Path, version: str | None, base_sha256: str | None,
                         promoted_at: str | None) -> _Adapter:
        new = _Adapter(path, version, base_sha256, promoted_at, "", name=f"a{next(self._names)}")
        self._check_base(new)
        new.config = self._check_files(path)
        if self._peft is not None:
            self._load_beside(new, new.config)
        return new

    def _switch_adapter(self, new: _Adapter | None) -> _Adapter | None:
        if new is not None and self._peft is None:
            self._wrap(new, new.config)  # the first adapter: injected in place, so under the lock
        return self._switch(new)

    def _drop_adapter(self, old: _Adapter | None) -> None:
        if old is not None:
            self._discard(old.name)  # inactive now: a generation never looks at it

    # -- adapter loading --------------------------------------------------------------------------
    def _check_base(self, adapter: _Adapter) -> None:
        sha = adapter.base_sha256
        if sha is not None and sha != self.ref.sha256:
            raise AdapterError(f"adapter {adapter.version or adapter.path} was trained on base sha256 "
                               f"{sha[:12]}…, but serve runs {self.ref.name} "
                               f"(sha256 {self.ref.sha256[:12]}…)")

    def _check_files(self, path: Path) -> Any:
        """A LoRA adapter directory whose matrices fit this base, without touching the model;
        its config, ready to load for inference."""
        from peft import PeftConfig, PeftType
        from safetensors.torch import load_file

        if not path.is_dir():
            raise AdapterError(f"{path}: no such adapter directory" if not path.exists() else
                               f"{path}: not a PEFT adapter directory")
        if not (path / ADAPTER_CONFIG).is_file():
            raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
        try:
            config = PeftConfig.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - unreadable JSON, unknown fields or type
            raise AdapterError(f"{path}: unreadable {ADAPTER_CONFIG}: {_first_line(exc)}") from None
        if config.peft_type != PeftType.LORA:
            raise AdapterError(f"{path}: a {config.peft_type} adapter; serve applies LoRA adapters only")
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}")
        try:
            weights = load_file(str(path / ADAPTER_WEIGHTS), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, truncated header...
            raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} is corrupted or incomplete: "
                               f"{_first_line(exc)}") from None
        self._check_shapes(path, weights)
        config.inference_mode = True
        # The file's weights replace the initial ones; an init that rewrites the base's own
        # weights (PiSSA, OLoRA...) must never run on a serving model. The default one (B = 0)
        # also keeps a freshly injected layer inert until the weights are in.
        config.init_lora_weights = True
        return config

    def _check_shapes(self, path: Path, weights: dict[str, Any]) -> None:
        """Every lora_A/lora_B matrix belongs to a module of this base, in its shape."""
        import torch

        lora = [(k, v) for k, v in weights.items() if ".lora_A." in k or ".lora_B." in k]
        if not lora:
            raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA weights")
        for key, tensor in lora:
            module_name, _, part = key.removeprefix(_PEFT_PREFIX).partition(".lora_")
            try:
                module = self._lm.get_submodule(module_name)
            except AttributeError:
                raise AdapterError(f"{path}: made for another model than {self.ref.name}: it adapts "
                                   f"{module_name}, which this base does not have") from None
            layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if not isinstance(layer, torch.nn.Linear) or tensor.dim() != 2:
                continue  # embeddings, convolutions: PEFT's own load checks them
            axis, size = (1, layer.in_features) if part.startswith("A.") else (0, layer.out_features)
            if tensor.shape[axis] != size:
                raise AdapterError(f"{path}: made for another model than {self.ref.name}: "
                                   f"{key.removeprefix(_PEFT_PREFIX)} has shape "
                                   f"{tuple(tensor.shape)}, incorrect for {module_name} "
                                   f"({layer.in_features} -> {layer.out_features})")

    def _peft_load(self, adapter: _Adapter) -> None:
        """PEFT ``load_adapter``: the weights of ``adapter.name``, already added with our config;
        incomplete = rejected."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # base_model_name_or_path differs, gradient probes...
            result = self._peft.load_adapter(str(adapter.path), adapter_name=adapter.name,
                                             is_trainable=False, torch_device=str(self.device),
                                             autocast_adapter_dtype=False)
        missing = list(getattr(result, "missing_keys", []) or [])
        if missing:
            raise AdapterError(f"{adapter.path}: incomplete adapter: {len(missing)} LoRA weights "
                               f"missing (e.g. {missing[0]})")
        adapter.loaded_at = iso(utcnow()) or ""

    def _load_beside(self, adapter: _Adapter, config: Any) -> None:
        """Off the context lock: the new adapter beside the active one (inactive, so nothing changes)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._peft.add_adapter(adapter.name, config, autocast_adapter_dtype=False)
            self._peft_load(adapter)
        except Exception as exc:  # noqa: BLE001 - any failure rejects the adapter
            self._discard(adapter.name)
            raise exc if isinstance(exc, AdapterError) else \
                AdapterError(f"{adapter.path}: PEFT cannot load the adapter: {_first_line(exc)}") from None

    def _wrap(self, adapter: _Adapter, config: Any) -> None:
        """Holding the context lock: wrap the base in PEFT with ``adapter`` (injects LoRA layers in place)."""
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._peft = PeftModel(self._lm, config, adapter_name=adapter.name,
                                       autocast_adapter_dtype=False)
            self._peft.eval()
            self._peft_load(adapter)
        except Exception as exc:  # noqa: BLE001 - leave the wrapper bare: the base's own output
            if self._peft is not None:
                self._discard(adapter.name)
            raise exc if isinstance(exc, AdapterError) else \
                AdapterError(f"{adapter.path}: PEFT cannot load the adapter: {_first_line(exc)}") from None

    def _switch(self, new: _Adapter | None) -> _Adapter | None:
        """Holding the context lock: make ``new`` the active adapter (None: no adapter). Returns the old
        one if it still has to be deleted."""
        old = self._adapter
        if new is not None:
            self._peft.set_adapter(new.name, inference_mode=True)
            return old
        if old is not None:
            self._discard(old.name)  # the wrapper with no adapter left computes the bare base
        return None

    def _discard(self, name: str) -> None:
        """PEFT ``delete_adapter``, if the wrapper has it."""
        if self._peft is None or name not in self._peft.peft_config:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(name)

    # -- ChatEngine -------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return self._info(self.model_id, self.ref.path, self.ref.sha256, {
            "backend": "transformers", "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "chat_format": self.chat_format, "n_ctx": self.n_ctx, "n_threads": self.n_threads,
        }, {"last_tokens_per_s": self.last_tokens_per_s})

    def count_tokens(self, text: str) -> int:
        self._check_open()
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def render_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """(prompt token ids, 'template' | 'few-shot' | 'plain') for ``messages``."""
        self._check_open()
        if self.chat_format == "template":
            try:
                text = self._tok.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                     add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template's raise_exception, bad roles...
                raise PromptError(f"the model's chat template refused the messages: {exc}") from None
            # As train-lora's prompt_ids: the template writes BOS itself.
            return list(self._tok(text, add_special_tokens=False)["input_ids"]), "template"
        # As the llama backend: BOS, no special-token parsing of user text.
        ids = self._tok(turn_prompt(messages, self.chat_format), add_special_tokens=True,
                        split_special_tokens=True)["input_ids"]
        return list(ids), self.chat_format

    def chat(self, messages: list[dict[str, str]], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream the answer to ``messages``; the last chunk has finish_reason and usage.

        The prompt is checked now (:class:`PromptError` if the template refuses it or it does
        not fit the context); generation starts when the returned iterator is first advanced
        and holds the context lock until it is exhausted or closed.
        """
        ids, mode = self.render_prompt(messages)
        self._check_fits(ids, self.n_ctx)
        return self._exclusive(ids, cancel, lambda: self._generate(ids, mode, params, cancel))

    def _generate(self, ids: list[int], mode: str, params: GenerationParams,
                  cancel: threading.Event | None) -> Iterator[Chunk]:
        self._check_open()
        yield from self._run(ids, mode, params, cancel)

    def _run(self, ids: list[int], mode: str, params: GenerationParams,
             cancel: threading.Event | None) -> Iterator[ServedChunk]:
        import torch

        budget = self.n_ctx - len(ids)
        max_new = budget if params.max_tokens <= 0 else min(params.max_tokens, budget)
        detok = _Detokenizer(self._tok)
        pick = self._sampler(params)
        self.generations += 1
        t0 = time.perf_counter()

        def forward() -> Iterator[int]:
            inputs = torch.tensor([ids], dtype=torch.long, device=self.device)
            cache = None  # the KV cache lives as long as this generator: one generation
            while True:
                logits, cache = self._forward(inputs, cache)
                token = pick(logits)
                yield token
                inputs = torch.tensor([[token]], dtype=torch.long, device=self.device)

        def done(produced: int) -> None:
            tokens.close()
            elapsed = time.perf_counter() - t0
            self.last_tokens_per_s = (round(produced / elapsed, 2) if produced and elapsed > 0
                                      else None)

        tokens = forward()
        try:
            yield from self._stream(len(ids), max_new, tokens, lambda token: token in self._eos,
                                    detok.push, detok.flush,
                                    StopScanner(stop_strings(params.stop, mode),
                                                loop_guard=mode == "few-shot"), cancel,
                                    self.adapter_version, done)
        finally:
            tokens.close()

    def _forward(self, inputs: Any, cache: Any) -> tuple[Any, Any]:
        """One step: the next-token logits (1-d) and the grown KV cache. Inference mode is
        entered per step, never across a ``yield`` (a stream may resume on another thread)."""
        import torch

        kwargs: dict[str, Any] = {"input_ids": inputs, "past_key_values": cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions need no vocabulary row
        with torch.inference_mode():
            out = self._lm(**kwargs)
        return out.logits[0, -1], out.past_key_values

    def _sampler(self, params: GenerationParams) -> Callable[[Any], int]:
        """Greedy at temperature 0; else llama.cpp's chain: top-k, top-p, min-p, temperature,
        drawn with a generator seeded by ``params.seed`` (or the engine's own sequence)."""
        import torch

        if params.temperature <= 0:
            return lambda logits: int(torch.argmax(logits))
        generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else self._rng.randrange(2**31))
        temperature, top_p = params.temperature, params.top_p

        def pick(logits: Any) -> int:
            top, index = torch.topk(logits.float(), min(TOP_K, logits.shape[-1]))
            top, index = top.cpu(), index.cpu()   # 40 values: sample on the CPU, any device
            probs = torch.softmax(top, dim=-1)
            keep = probs >= MIN_P * probs[0]
            if top_p < 1.0:
                keep &= (torch.cumsum(probs, dim=-1) - probs) < top_p
            keep[0] = True
            chosen = torch.multinomial(torch.softmax(top[keep] / temperature, dim=-1), 1,
                                       generator=generator)
            return int(index[keep][chosen])

        return pick

    def _release(self) -> None:
        self._adapter = None
        self._peft = self._lm = None

    def _after_close(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
