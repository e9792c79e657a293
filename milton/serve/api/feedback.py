"""``POST /v1/feedback``: a user's rating of one answer, by its completion id.

Body: ``{"id": "chatcmpl-...", "rating": "good" | "bad", "note": "..."}`` (``completion_id``
is accepted for ``id``). The rating is stored append-only (the latest counts) and decides at
the next train-lora whether that answer may become a training target
(:mod:`milton.train.targets`). The answer is logged to its session in the background, so a
rating may arrive before it: it is stored anyway, and ``logged`` in the reply says whether the
answer was found yet.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from milton.core.config import Settings
from milton.core.store import open_store
from milton.serve.api.errors import ApiError
from milton.serve.api.metrics import ApiMetrics
from milton.serve.api.schema import read_json
from milton.train.targets import RATINGS, completion_logged, record_feedback

MAX_ID_CHARS = 200
MAX_NOTE_CHARS = 2000


def parse_feedback(body: Any) -> tuple[str, str, str | None]:
    """(completion id, rating, note) from a request body; 400 in OpenAI's shape when invalid."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    cid = body.get("id", body.get("completion_id"))
    if not isinstance(cid, str) or not cid.strip() or len(cid) > MAX_ID_CHARS:
        raise ApiError(400, f"id: the completion id (a non-empty string of at most {MAX_ID_CHARS} "
                       "characters, the 'id' of a chat completion)", param="id")
    rating = body.get("rating")
    if rating not in RATINGS:
        raise ApiError(400, f"rating: must be one of {', '.join(repr(r) for r in RATINGS)}", param="rating")
    note = body.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        raise ApiError(400, f"note: a string of at most {MAX_NOTE_CHARS} characters", param="note")
    return cid.strip(), rating, note


class Feedback:
    """The feedback endpoint: validate, store in this machine's store, answer."""

    def __init__(self, settings: Settings, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.metrics = metrics

    def _store(self, cid: str, rating: str, note: str | None) -> tuple[int, bool]:
        db = open_store(self.settings.db_path, self.settings.store.busy_timeout_ms)
        try:
            return record_feedback(db, cid, rating, "api", time.time(), note), completion_logged(db, cid)
        finally:
            db.close()

    async def create(self, request: Request) -> Response:
        """``POST /v1/feedback``."""
        t0 = time.perf_counter()
        try:
            cid, rating, note = parse_feedback(await read_json(request))
            row, logged = await asyncio.to_thread(self._store, cid, rating, note)
        except ApiError as exc:
            self.metrics.request("feedback", exc.status, time.perf_counter() - t0)
            return exc.response()
        self.metrics.request("feedback", 200, time.perf_counter() - t0)
        return JSONResponse({"object": "feedback", "id": cid, "rating": rating, "feedback_id": row,
                             "logged": logged})
