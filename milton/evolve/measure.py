"""What a GGUF is worth on this machine: perplexity, size and tokens/s, all in llama.cpp.

Every stage of an evolve run is measured here, on the same token ids (formatted by the
training code from the same items), so a merged f16, a pruned student and a q4_k_m file are
compared like for like, and with the model serve actually runs (the current base plus its
adapter). Perplexity is over the labelled (answer) tokens only, as in training.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milton.train.formatting import IGNORE, Example

if TYPE_CHECKING:
    from milton.evolve.vocab import Vocab

SPEED_PROMPT = ("Write a short note for a colleague about why regular backups of a workstation "
                "matter and how often they should be checked.")


def _open(gguf: Path, *, n_ctx: int, threads: int, lora: Path | None = None,
          logits_all: bool = False, vocab_only: bool = False) -> Any:
    from llama_cpp import Llama

    from milton.models.llamacpp import failure_reason, llama_messages

    kwargs: dict[str, Any] = {"model_path": str(gguf), "n_ctx": n_ctx, "n_threads": threads,
                              "n_threads_batch": threads, "n_batch": n_ctx,
                              "logits_all": logits_all, "vocab_only": vocab_only,
                              "verbose": False}
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    try:
        with llama_messages() as lines:
            return Llama(**kwargs)
    except Exception as exc:  # noqa: BLE001 - llama.cpp says why in its log
        from milton.models.convert import ConversionError

        raise ConversionError(f"{gguf}: llama.cpp cannot load it: {failure_reason(lines) or exc}") from None


def _in_vocabulary(gguf: Path, examples: Sequence[Example], full_vocab: Vocab | None,
                   doing: str) -> tuple[Sequence[Example], bool]:
    """``examples`` (ids of the full vocabulary) in ``gguf``'s ids, and whether it is trimmed
    (:func:`milton.evolve.vocab.translate`); a trimmed file needs ``full_vocab``."""
    from milton.evolve.vocab import kept_ids, translate

    kept = kept_ids(gguf)
    if kept is None:
        return examples, False
    if full_vocab is None:
        raise ValueError(f"{gguf.name} has a trimmed vocabulary: {doing} it needs the full one")
    return translate(examples, full_vocab, kept), True


def _context_size(examples: Sequence[Example]) -> int:
    longest = max((len(ex.input_ids) for ex in examples), default=16)
    return max(64, -(-longest // 64) * 64)


def gguf_perplexity(gguf: Path, examples: Sequence[Example], *, threads: int,
                    lora: Path | None = None, full_vocab: Vocab | None = None) -> float | None:
    """exp(mean NLL) of the labelled tokens of ``examples`` under ``gguf`` (+ ``lora``).

    A GGUF with a trimmed vocabulary is given the same text (:func:`milton.evolve.vocab.translate`,
    spelling dropped tokens with ``full_vocab``'s pieces) and its total NLL is divided by the
    original token count, so its figure compares with the full model's.
    """
    import numpy as np

    examples = [ex for ex in examples if any(label != IGNORE for label in ex.labels[1:])]
    if not examples:
        return None
    per = sum(1 for ex in examples for label in ex.labels[1:] if label != IGNORE)
    examples, trimmed = _in_vocabulary(gguf, examples, full_vocab, "measuring")
    llm = _open(gguf, n_ctx=_context_size(examples), threads=threads, lora=lora, logits_all=True)
    total, count = 0.0, 0
    try:
        for ex in examples:
            ids = list(ex.input_ids)
            llm.reset()
            llm.eval(ids)
            targets = np.asarray(ex.labels[1:])
            positions = np.nonzero(targets != IGNORE)[0]
            logits = np.asarray(llm.scores[positions], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            picked = logits[np.arange(len(positions)), targets[positions]]
            total += float((log_z - picked).sum())
            count += len(positions)
    finally:
        llm.close()
    mean = total / (per if trimmed else count)
    return float(np.exp(mean)) if mean < 700 else float("inf")


def gguf_speed(gguf: Path, *, tokens: int, threads: int, repeats: int = 3,
               lora: Path | None = None, prompt: str = SPEED_PROMPT) -> dict[str, float]:
    """Greedy decode tokens/s (first token excluded) and prompt tokens/s, medians of repeats.

    Generation never stops at end-of-text here, so every model is timed over the same number
    of tokens.
    """
    llm = _open(gguf, n_ctx=512 + tokens, threads=threads, lora=lora)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        decode, prefill = [], []
        for repeat in range(repeats + 1):  # the first run warms caches and is not counted
            llm.reset()
            t0 = time.perf_counter()
            t_first = None
            for n, _token in enumerate(llm.generate(ids, temp=0.0, reset=True), start=1):
                if t_first is None:
                    t_first = time.perf_counter()
                if n >= tokens:
                    break
            t_end = time.perf_counter()
            if repeat:
                prefill.append(len(ids) / max(1e-9, (t_first or t_end) - t0))
                decode.append((tokens - 1) / max(1e-9, t_end - (t_first or t0)))
    finally:
        llm.close()
    return {"tokens_per_s": round(statistics.median(decode), 2),
            "prompt_tokens_per_s": round(statistics.median(prefill), 1)}


def interleaved_speed(files: Sequence[tuple[Path, Path | None]], *, tokens: int, threads: int,
                      rounds: int = 3) -> list[float]:
    """Decode tokens/s of each (GGUF, adapter), timed in turn ``rounds`` times, medians.

    Every file sees the same moments of the machine, so their ratios hold where timings taken
    minutes apart (each stage's own) jitter by 20-30% on two busy cores.
    """
    runs: list[list[float]] = [[] for _ in files]
    for _ in range(rounds):
        for i, (path, lora) in enumerate(files):
            runs[i].append(gguf_speed(path, tokens=tokens, threads=threads, repeats=1,
                                      lora=lora)["tokens_per_s"])
    return [round(statistics.median(r), 2) for r in runs]


def same_tokenizer(reference: Path, candidate: Path, texts: Sequence[str], *,
                   kept: Sequence[int] | None = None) -> str | None:
    """None if both GGUFs tokenise ``texts`` to the same ids, else the first text that differs.

    With ``kept`` (``candidate`` has the trimmed vocabulary of those ids of ``reference``'s),
    the reference's ids are renumbered, and texts that need a dropped token are not compared.
    """
    a = _open(reference, n_ctx=64, threads=1, vocab_only=True)
    b = _open(candidate, n_ctx=64, threads=1, vocab_only=True)
    new_id = {old: new for new, old in enumerate(kept)} if kept is not None else None
    try:
        for text in texts:
            data = text.encode()
            ids = a.tokenize(data, add_bos=True, special=True)
            if new_id is not None:
                if any(i not in new_id for i in ids):
                    continue
                ids = [new_id[i] for i in ids]
            if ids != b.tokenize(data, add_bos=True, special=True):
                return text
        return None
    finally:
        a.close()
        b.close()


def gguf_answers(gguf: Path, prompts: Sequence[list[int]], *, threads: int, lora: Path | None = None,
                 full_vocab: Vocab | None = None, max_new_tokens: int = 24,
                 stops: Sequence[str] = ()) -> list[str]:
    """Greedy answers of ``gguf`` (+ ``lora``) to ``prompts`` (ids of the full vocabulary, as
    serve frames a question), each cut at the first of ``stops``."""
    if not prompts:
        return []
    examples, _ = _in_vocabulary(
        gguf, [Example(input_ids=list(p), labels=[IGNORE] * len(p), format="text") for p in prompts],
        full_vocab, "asking")
    prompts = [ex.input_ids for ex in examples]
    llm = _open(gguf, n_ctx=max(len(p) for p in prompts) + max_new_tokens + 8, threads=threads, lora=lora)
    answers = []
    try:
        for ids in prompts:
            llm.reset()
            out: list[int] = []
            for token in llm.generate(list(ids), temp=0.0, reset=True):
                if token == llm.token_eos() or len(out) >= max_new_tokens:
                    break
                out.append(token)
                text = llm.detokenize(out).decode("utf-8", errors="replace")
                if any(stop in text for stop in stops):
                    break
            text = llm.detokenize(out).decode("utf-8", errors="replace")
            for stop in stops:
                text = text.split(stop, 1)[0]
            answers.append(text.strip())
    finally:
        llm.close()
    return answers


def measure_gguf(gguf: Path, eval_examples: Sequence[Example], regression_examples: Sequence[Example],
                 *, threads: int, bench_tokens: int, lora: Path | None = None,
                 full_vocab: Vocab | None = None) -> dict[str, Any]:
    """eval_ppl, regression_ppl, size_mb (model + adapter) and tokens/s of one served model."""
    size = gguf.stat().st_size + (lora.stat().st_size if lora is not None else 0)
    return {
        "eval_ppl": gguf_perplexity(gguf, eval_examples, threads=threads, lora=lora, full_vocab=full_vocab),
        "regression_ppl": gguf_perplexity(gguf, regression_examples, threads=threads, lora=lora,
                                          full_vocab=full_vocab),
        "size_mb": round(size / 1e6, 2),
        **gguf_speed(gguf, tokens=bench_tokens, threads=threads, lora=lora),
    }
