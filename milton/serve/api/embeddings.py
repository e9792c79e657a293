"""``POST /v1/embeddings``: vectors from the embedding model memory uses (all-MiniLM-L6-v2 by
default), as floats or base64, with the token usage."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from milton.core.config import Settings
from milton.memory.context import estimate_tokens
from milton.memory.embed import Embedder, resolve_model
from milton.serve.api.context import ChatMemory
from milton.serve.api.errors import ApiError
from milton.serve.api.metrics import ApiMetrics
from milton.serve.api.schema import parse_embeddings, read_json


class Embeddings:
    """The embeddings endpoint, on :class:`~milton.serve.api.context.ChatMemory`'s embedder."""

    def __init__(self, settings: Settings, memory: ChatMemory, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.memory = memory
        self.metrics = metrics

    def model_id(self) -> str:
        name, _path = resolve_model(self.settings.memory.embedding_model)
        return Path(name).name

    async def create(self, request: Request) -> Response:
        """``POST /v1/embeddings``."""
        t0 = time.perf_counter()
        try:
            req = parse_embeddings(await read_json(request), self.settings.serve)
            try:
                name, _path = resolve_model(self.settings.memory.embedding_model)
                embedder = await asyncio.to_thread(self.memory.embedder)
            except Exception as exc:  # noqa: BLE001 - a config problem, reported in the API's shape
                raise ApiError(500, f"the embedding model cannot be loaded: {exc}", "server_error") from None
            if req.model not in (name, Path(name).name):
                raise ApiError(404, f"The model {req.model!r} does not exist; embeddings come from "
                               f"{Path(name).name!r}", param="model", code="model_not_found")
            if req.dimensions is not None and req.dimensions != embedder.dim:
                raise ApiError(400, f"dimensions: this model gives {embedder.dim}-d vectors", param="dimensions",
                               code="unsupported")
            vectors, tokens = await asyncio.to_thread(self._encode, embedder, req.texts)
            data = [{"object": "embedding", "index": i,
                     "embedding": (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
                                   if req.encoding_format == "base64" else v.tolist())}
                    for i, v in enumerate(vectors)]
            self.metrics.request("embeddings", 200, time.perf_counter() - t0)
            return JSONResponse({"object": "list", "data": data, "model": req.model,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        except ApiError as exc:
            self.metrics.request("embeddings", exc.status, time.perf_counter() - t0)
            return exc.response()

    @staticmethod
    def _encode(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, int]:
        vectors = embedder.encode(texts)
        try:
            tokens = sum(len(ids) for ids in embedder.model.tokenizer(texts)["input_ids"])
        except Exception:  # noqa: BLE001 - usage is informative; estimate it
            tokens = sum(estimate_tokens(t) for t in texts)
        return vectors, tokens
