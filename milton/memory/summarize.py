"""Summaries for compress-memory: the local language model when there is one, else extractive.

The extractive summariser keeps the sentences closest to the group's centroid in embedding
space, picked with maximal marginal relevance so that several distinct facts survive rather
than three phrasings of the main one; sentences keep their original order and speaker. What
the user said, and sentences with specifics (numbers, identifiers, paths), get a bonus: users
state the facts, assistants mostly echo them (measured: without the bonus the echo was kept
and the user's "Ticket JIRA-2291 tracks the leak" dropped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from milton.core.errors import ConfigError
from milton.memory.embed import Embedder

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])|\n+")
_CUES = re.compile(
    r"\b(remember|don't forget|do not forget|note that|important|always|never|my name|"
    r"i prefer|i like|i use|i work|my \w+ is|deadline|password|birthday|address)\b",
    re.IGNORECASE,
)
_INFO = re.compile(r"\d|`|/|[A-Z][a-z]+[A-Z]|\b[A-Z]{2,}\b")


class Summarizer(Protocol):
    name: str

    def summarize(self, texts: list[str], max_chars: int) -> str: ...

    def importance(self, texts: list[str]) -> float: ...


def split_sentences(texts: list[str]) -> list[str]:
    """Sentences with their speaker kept ("User: ..."), from "User: ...\\nAssistant: ..." texts."""
    out: list[str] = []
    for text in texts:
        speaker = ""
        for part in _SENTENCE.split(text):
            part = part.strip()
            if not part:
                continue
            match = re.match(r"^(User|Assistant|System|Tool):\s*(.*)$", part, re.DOTALL)
            if match:
                speaker, part = match.group(1), match.group(2).strip()
                if not part:
                    continue
            out.append(f"{speaker}: {part}" if speaker else part)
    return out


def heuristic_importance(texts: list[str]) -> float:
    """0.35 base; + cues a user wants kept ("remember", "I prefer"), + specifics (numbers,
    paths, identifiers), + length of the discussion. Casual chatter stays below the 0.5
    pruning line; anything a user stated about themselves or asked to keep stays above it."""
    user_text = " ".join(t for t in texts if "User:" in t) or " ".join(texts)
    score = 0.35
    if _CUES.search(user_text):
        score += 0.25
    if _INFO.search(" ".join(texts)):
        score += 0.15
    if len(texts) >= 3:
        score += 0.1
    return round(min(1.0, score), 3)


@dataclass
class ExtractiveSummarizer:
    embedder: Embedder
    name: str = "extractive"
    diversity: float = 0.3  # MMR: 0 = pure centrality, 1 = pure novelty
    user_bonus: float = 0.2
    info_bonus: float = 0.1

    def summarize(self, texts: list[str], max_chars: int) -> str:
        sentences = split_sentences(texts)
        if not sentences:
            return ""
        if sum(len(s) + 1 for s in sentences) <= max_chars:
            return " ".join(sentences)
        vectors = self.embedder.encode(sentences)
        centroid = vectors.mean(axis=0)
        norm = float(np.linalg.norm(centroid)) or 1.0
        central = vectors @ (centroid / norm)
        central = central + np.array([
            (self.user_bonus if s.startswith("User: ") else 0.0)
            + (self.info_bonus if _INFO.search(s.split(": ", 1)[-1]) else 0.0)
            for s in sentences])
        chosen: list[int] = []
        used = 0
        candidates = set(range(len(sentences)))
        while candidates:
            best, best_value = None, -np.inf
            for i in candidates:
                redundancy = max((float(vectors[i] @ vectors[j]) for j in chosen), default=0.0)
                value = (1 - self.diversity) * central[i] - self.diversity * redundancy
                if value > best_value:
                    best, best_value = i, value
            assert best is not None
            candidates.discard(best)
            cost = len(sentences[best]) + 1
            if used + cost > max_chars:
                if not chosen:  # a single over-long sentence: cut it at a word boundary
                    cut = sentences[best][: max_chars - 1].rsplit(" ", 1)[0]
                    return cut + "…"
                continue
            chosen.append(best)
            used += cost
        return " ".join(sentences[i] for i in sorted(chosen))

    def importance(self, texts: list[str]) -> float:
        return heuristic_importance(texts)


class LlamaSummarizer:
    """A local GGUF model through llama-cpp-python. Output that is empty, longer than the input
    or not text is refused (the caller then falls back to extractive and records why)."""

    name = "llm"

    def __init__(self, model_path: Path, n_ctx: int = 2048) -> None:
        from llama_cpp import Llama

        self.path = model_path
        self.llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=None, verbose=False,
                         seed=0)

    def _complete(self, prompt: str, max_tokens: int) -> str:
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0,
                                         stop=["\n\n", "Conversation:"])
        return str(out["choices"][0]["text"]).strip()

    def summarize(self, texts: list[str], max_chars: int) -> str:
        body = "\n".join(texts)[: 4 * 1500]
        prompt = ("Summarise the conversation below in a few sentences. Keep names, numbers, "
                  "preferences and decisions.\n\nConversation:\n" + body + "\n\nSummary:")
        text = self._complete(prompt, max_tokens=max(32, max_chars // 4))
        if not text or len(text) > max(max_chars, len(body)):
            raise ValueError("the language model returned an unusable summary")
        return text[:max_chars]

    def importance(self, texts: list[str]) -> float:
        prompt = ("On a scale of 1 (mundane) to 10 (essential to remember), rate this "
                  "conversation:\n" + "\n".join(texts)[:3000] + "\nRating:")
        match = re.search(r"\b(10|[1-9])\b", self._complete(prompt, max_tokens=4))
        return int(match.group(1)) / 10 if match else heuristic_importance(texts)


def packaged_gguf() -> Path | None:
    """The embedded Gemma 3 270M GGUF when its package is installed (assembled on first use)."""
    from milton.core.errors import MiltonError
    from milton.models.refs import embedded_gguf

    try:
        return embedded_gguf()
    except (MiltonError, OSError):  # not installed, or cannot be assembled here
        return None


def choose_summarizer(mode: str, llm_model: str, embedder: Embedder) -> tuple[Summarizer, str]:
    """(summariser, why) for ``memory.summarizer``.

    ``auto`` uses the LLM only for a model the user configured (``memory.llm_model``): the
    packaged Gemma 3 270M is a base model, not an instruction-tuned one, and its summaries lose
    facts the extractive summary keeps. ``llm`` with no model configured uses it anyway.
    """
    extractive = ExtractiveSummarizer(embedder)
    if mode == "extractive":
        return extractive, "configured: extractive"
    if mode == "auto" and not llm_model:
        return extractive, "extractive (memory.llm_model not set; the packaged model is a base model)"
    try:
        import llama_cpp  # noqa: F401 - an availability check
    except ImportError:
        why = "llama-cpp-python is not installed"
        if mode == "llm":
            raise ConfigError(f"memory.summarizer = 'llm': {why}") from None
        return extractive, f"extractive ({why})"
    path = Path(llm_model).expanduser() if llm_model else packaged_gguf()
    if path is None or not path.is_file():
        why = f"no GGUF model ({llm_model or 'packaged Gemma 3 270M not installed'})"
        if mode == "llm":
            raise ConfigError(f"memory.llm_model: {why}")
        return extractive, f"extractive ({why})"
    try:
        return LlamaSummarizer(path), f"llm ({path.name})"
    except Exception as exc:  # noqa: BLE001 - any load failure falls back to extractive
        if mode == "llm":
            raise ConfigError(f"memory.llm_model: cannot load {path}: {exc}") from None
        return extractive, f"extractive (cannot load {path.name}: {exc})"
