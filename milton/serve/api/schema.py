"""OpenAI wire format: request bodies parsed into JSON or a 400 (:func:`read_json`), chat and
embedding requests validated into plain objects (every problem a 400 naming the field, or a 413
for a limit), and the response and stream-chunk bodies."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from milton.core.config import ServeConfig
from milton.serve.api.errors import ApiError
from milton.serve.engines.base import GenerationParams, Usage

#: Roles a request may use -> the role stored and sent to the engine.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
MAX_STOP = 4
FINISH_REASONS = ("stop", "length")
SURROGATE = "text holds a lone UTF-16 surrogate (not valid Unicode)"


# -- request bodies in the OpenAPI schema (the handlers read raw JSON and validate it themselves;
# these tell clients, and the schema-driven tests, what a body looks like) ----------------------
def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body ``schema`` the handler checks itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


CHAT_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                           "content": {"type": "string"}}}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "stream": {"type": "boolean"},
        "stop": {"anyOf": [{"type": "string"},
                           {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP}]},
        "seed": {"type": "integer"},
        "user": {"type": "string"},
        "milton": {"type": "object", "properties": {"memory": {"type": "boolean"},
                                                    "session": {"type": "string", "minLength": 1}}},
    },
}
EMBEDDINGS_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["model", "input"],
    "properties": {
        "model": {"type": "string"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]},
        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        "dimensions": {"type": "integer"},
    },
}

FEEDBACK_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["id", "rating"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": 200},
        "rating": {"type": "string", "enum": ["good", "bad"]},
        "note": {"type": "string", "maxLength": 2000},
    },
}


# -- bodies ------------------------------------------------------------------------------------
async def read_json(request: Request) -> Any:
    """The request's JSON body (its size is bounded by :mod:`milton.serve.guard` while it
    streams in): see :func:`parse_json`."""
    return parse_json(await request.body())


def parse_json(raw: bytes) -> Any:
    """A JSON request body, or a 400 ``invalid_request_error`` for anything that is not
    plain JSON text: empty, not UTF-8, malformed, nested too deep, an integer too long for
    Python to read, or a string holding a lone surrogate (``"\\ud800"``), which no model,
    tokenizer or store can take."""
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8: {exc.reason} at byte {exc.start}",
                       code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, "
                       f"column {exc.colno})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply",
                       code="invalid_json") from None
    except ValueError as exc:  # e.g. an integer past sys.get_int_max_str_digits()
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    where = _surrogate_at(body)
    if where is not None:
        raise ApiError(400, f"{where or 'body'}: {SURROGATE}",
                       param=where or None, code="invalid_unicode")
    return body


def _surrogate_at(body: Any) -> str | None:
    """The path (``messages[0].content``) of the first string, key or value, holding a lone
    surrogate; None when there is none. Iterative: the body may be deeply nested."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and has_surrogate(value):
                return where
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if not key.isascii() and has_surrogate(key):
                    return where or "body"
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (JSON's ``"\\ud800"`` decodes to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- requests ----------------------------------------------------------------------------------
def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _too_large(message: str, param: str | None) -> ApiError:
    return ApiError(413, message, param=param, code="request_too_large")


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{key}: expected a number, got {json.dumps(value)[:40]}", key, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"{key}: {value} is out of range [{low:g}, {high:g}]", key)
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{key}: expected an integer, got {json.dumps(value)[:40]}", key, "invalid_type")
    return value


def _bool(body: dict[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{where}{key}: expected true or false, got {json.dumps(value)[:40]}",
                   f"{where}{key}", "invalid_type")
    return value


def _text(content: Any, param: str) -> str:
    """A message's content: a string, a list of text parts, or null (an assistant turn)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{param}[{i}]: only text content parts are supported (got {kind!r})",
                           f"{param}[{i}]", "unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{param}: expected a string or a list of text parts, got {type(content).__name__}",
               param, "invalid_type")


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # role mapped (developer -> system), content flattened
    params: GenerationParams
    stream: bool
    include_usage: bool
    user: str | None
    memory: bool  # the body's {"milton": {"memory": ...}}; the header is checked by the caller
    session: str | None  # {"milton": {"session": ...}}
    chars: int


def _model(body: Any) -> str:
    """The ``model`` field of a request body, which must be a JSON object (every endpoint)."""
    if not isinstance(body, dict):
        raise _bad(f"expected a JSON object, got {type(body).__name__}", "body", "invalid_type")
    model = body.get("model")
    if model is None:
        raise _bad("model: required", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model: expected a non-empty string", "model", "invalid_type")
    return model


def parse_chat(body: Any, serve: ServeConfig) -> ChatRequest:
    model = _model(body)
    raw = body.get("messages")
    if raw is None:
        raise _bad("messages: required", "messages", "missing_required_parameter")
    if not isinstance(raw, list):
        raise _bad(f"messages: expected an array, got {type(raw).__name__}", "messages", "invalid_type")
    if not raw:
        raise _bad("messages: at least one message is required", "messages")
    if len(raw) > serve.max_messages:
        raise _too_large(f"messages: {len(raw)} messages; at most serve.max_messages "
                         f"({serve.max_messages}) per request", "messages")
    messages: list[dict[str, str]] = []
    chars = 0
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where}: expected an object, got {type(item).__name__}", where, "invalid_type")
        role = item.get("role")
        if role is None:
            raise _bad(f"{where}.role: required", f"{where}.role", "missing_required_parameter")
        if role not in ROLES:
            raise _bad(f"{where}.role: unknown role {json.dumps(role)[:40]} (expected one of "
                       f"{', '.join(ROLES)})", f"{where}.role")
        if "content" not in item and role != "assistant":
            raise _bad(f"{where}.content: required", f"{where}.content", "missing_required_parameter")
        if item.get("tool_calls") or item.get("function_call"):
            raise _bad(f"{where}: tool calls are not supported by this server", where, "unsupported")
        content = _text(item.get("content"), f"{where}.content")
        chars += len(content)
        messages.append({"role": ROLES[role], "content": content})
    if chars > serve.max_request_chars:
        raise _too_large(f"messages: {chars} characters; at most serve.max_request_chars "
                         f"({serve.max_request_chars}) per request", "messages")
    if not any(m["content"].strip() for m in messages):
        raise _bad("messages: every message is empty", "messages")

    for key in ("tools", "functions"):
        if body.get(key):
            raise _bad(f"{key}: tool calling is not supported by this server", key, "unsupported")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise _bad("n: only n = 1 is supported", "n", "unsupported")
    if body.get("logprobs"):
        raise _bad("logprobs: not supported by this server", "logprobs", "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format: only {\"type\": \"text\"} is supported", "response_format",
                   "unsupported")

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key)
    if max_tokens is None:
        max_tokens = min(serve.default_max_tokens, serve.max_tokens_limit)
    elif max_tokens < 1:
        raise _bad(f"{key}: must be at least 1, got {max_tokens}", key)
    elif max_tokens > serve.max_tokens_limit:
        raise _bad(f"{key}: {max_tokens} is more than serve.max_tokens_limit ({serve.max_tokens_limit})",
                   key)
    defaults = GenerationParams()
    temperature = _number(body, "temperature", 0.0, 2.0, defaults.temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, defaults.top_p)
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (stop_raw,) if stop_raw else ()
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        if len(stop_raw) > MAX_STOP:
            raise _bad(f"stop: at most {MAX_STOP} sequences, got {len(stop_raw)}", "stop")
        stop = tuple(s for s in stop_raw if s)
    else:
        raise _bad("stop: expected a string or an array of strings", "stop", "invalid_type")
    seed = _integer(body, "seed")

    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options: expected an object", "stream_options", "invalid_type")
        if not stream:
            raise _bad("stream_options: only allowed with stream = true", "stream_options")
        include_usage = _bool(options, "include_usage", False, "stream_options.")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user: expected a string", "user", "invalid_type")
    ext = body.get("milton")
    if ext is None:
        ext = {}
    if not isinstance(ext, dict):
        raise _bad("milton: expected an object like {\"memory\": false}", "milton", "invalid_type")
    unknown = sorted(set(ext) - {"memory", "session"})
    if unknown:
        raise _bad(f"milton.{unknown[0]}: unknown option (expected memory, session)", f"milton.{unknown[0]}")
    memory = _bool(ext, "memory", True, "milton.")
    session = ext.get("session")
    if session is not None and (not isinstance(session, str) or not session.strip()):
        raise _bad("milton.session: expected a non-empty string", "milton.session", "invalid_type")
    return ChatRequest(
        model=model, messages=messages,
        params=GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                stop=stop, seed=seed),
        stream=stream, include_usage=include_usage, user=user or None, memory=memory,
        session=session, chars=chars)


@dataclass
class EmbeddingRequest:
    model: str
    texts: list[str]
    encoding_format: str
    dimensions: int | None


def parse_embeddings(body: Any, serve: ServeConfig) -> EmbeddingRequest:
    model = _model(body)
    raw = body.get("input")
    if raw is None:
        raise _bad("input: required", "input", "missing_required_parameter")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        texts = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(t, int | list) for t in raw):
        raise _bad("input: token arrays are not supported; send text", "input", "unsupported")
    else:
        raise _bad("input: expected a string or a non-empty array of strings", "input", "invalid_type")
    for i, text in enumerate(texts):
        if not text.strip():
            raise _bad(f"input[{i}]: empty text", f"input[{i}]")
    if len(texts) > serve.max_embedding_inputs:
        raise _too_large(f"input: {len(texts)} texts; at most serve.max_embedding_inputs "
                         f"({serve.max_embedding_inputs}) per request", "input")
    chars = sum(len(t) for t in texts)
    if chars > serve.max_request_chars:
        raise _too_large(f"input: {chars} characters; at most serve.max_request_chars "
                         f"({serve.max_request_chars}) per request", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format: expected float or base64, got {json.dumps(fmt)[:40]}",
                   "encoding_format")
    dims = _integer(body, "dimensions")
    return EmbeddingRequest(model=model, texts=texts, encoding_format=fmt, dimensions=dims)


# -- responses -----------------------------------------------------------------------------------
def usage_body(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str,
                    usage: Usage, extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_body(usage), "milton": extra}


def chunk_body(rid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None,
               include_usage: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish_reason}]}
    if include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last, which carries it
    return body


def usage_chunk(rid: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage_body(usage)}


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")
