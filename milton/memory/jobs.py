"""Runner jobs for conversations, documents and sessions (CLI commands and timers).

The embedding model takes seconds to load, so it is loaded only when something needs
embedding: re-ingesting known conversations or unchanged documents never loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from milton.core.config import Settings
from milton.core.errors import InputError
from milton.core.jobs import JobContext, Skip
from milton.memory.embed import Embedder, embedder_for

Job = Callable[[JobContext], dict[str, Any]]


class LazyEmbedder:
    """Stands in for :class:`Embedder`; loads the configured model on first real use."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model: Embedder | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _get(self) -> Embedder:
        if self._model is None:
            self._model = embedder_for(self._settings.memory)
        return self._model

    @property
    def name(self) -> str:
        return self._get().name

    @property
    def dim(self) -> int:
        return self._get().dim

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return self._get().encode(texts, progress=progress)

    def encode_one(self, text: str) -> np.ndarray:
        return self._get().encode_one(text)


def _process_pending(ctx: JobContext, embedder: Any, progress: bool) -> dict[str, Any]:
    from milton.memory.sessions import pending_sessions, process_sessions

    done = process_sessions(ctx.db, embedder, pending_sessions(ctx.db), ctx.now, ctx.settings.logs_dir,
                            progress=progress)
    return {"processed": len(done), "memories_added": sum(s.memories_added for s in done)}


def ingest_conversations_job(path: str, *, strict: bool = False, progress: bool = False) -> Job:
    """Ingest a conversation file/directory/stdin, then process every ended session."""

    def job(ctx: JobContext) -> dict[str, Any]:
        from milton.memory.conversations import ingest_conversations

        report = ingest_conversations(ctx.db, path, max_message_chars=ctx.settings.memory.max_message_chars,
                                      now=ctx.now, strict=strict)
        metrics = {**report.as_metrics(), **_process_pending(ctx, LazyEmbedder(ctx.settings), progress)}
        ctx.log("ingested conversations",
                **{k: v for k, v in metrics.items() if k not in ("rejected_rows", "skipped_files")})
        return metrics

    return job


def document_paths(settings: Settings, paths: Sequence[str] | None) -> list[Path]:
    """Given PATHs (which must exist), else ``memory.documents`` (relative to ``paths.home``)."""
    if paths:
        missing = [p for p in paths if not Path(p).expanduser().exists()]
        if missing:
            raise InputError(f"{missing[0]}: no such file or directory")
        return [Path(p).expanduser() for p in paths]
    configured = [p.expanduser() for p in settings.memory.documents]
    if not configured:
        # A skip, not an error: the 6-hourly timer runs on installs that collect nothing.
        raise Skip("no PATH given and memory.documents is empty: pass files or directories, "
                   "or list them under [memory] documents = [...] in config.toml")
    return [p if p.is_absolute() else settings.paths.home / p for p in configured]


def ingest_documents_job(paths: Sequence[str] | None = None, *, progress: bool = False) -> Job:
    """Ingest documents (default: the configured ones); unchanged files cost one hash each."""

    def job(ctx: JobContext) -> dict[str, Any]:
        from milton.memory.documents import ingest_documents

        targets = document_paths(ctx.settings, paths)
        report = ingest_documents(ctx.db, LazyEmbedder(ctx.settings), targets, ctx.now,  # type: ignore[arg-type]
                                  ctx.settings.memory.chunk_chars, progress=progress)
        metrics = {"paths": [str(p) for p in targets], **report.as_metrics()}
        ctx.log("ingested documents", **{k: v for k, v in metrics.items() if k != "skipped_files"})
        return metrics

    return job


def end_idle_sessions_job(ctx: JobContext) -> dict[str, Any]:
    """End sessions idle past ``memory.session_idle_minutes`` (also ones a crashed server left
    open) and process every ended session."""
    from milton.memory.sessions import expire_idle_sessions

    ended = expire_idle_sessions(ctx.db, ctx.settings.memory.session_idle_minutes, ctx.now)
    metrics = {"ended": len(ended), **_process_pending(ctx, LazyEmbedder(ctx.settings), False)}
    ctx.log("ended idle sessions", **metrics)
    return metrics


def end_sessions_job(session_id: str | None = None) -> Job:
    """End one session (default: every open one) now and process it."""

    def job(ctx: JobContext) -> dict[str, Any]:
        from milton.memory.sessions import end_session

        if session_id is not None:
            ids = [session_id]
        else:
            ids = [r[0] for r in ctx.db.execute("select id from sessions where status = 'open'")]
        ended = [sid for sid in ids if end_session(ctx.db, sid, ctx.now.timestamp())]
        metrics = {"ended": len(ended), "session_ids": ended,
                   **_process_pending(ctx, LazyEmbedder(ctx.settings), False)}
        ctx.log("ended sessions", **{k: v for k, v in metrics.items() if k != "session_ids"})
        return metrics

    return job
