"""Conversation files into sessions: OpenAI chat JSONL, ShareGPT, and Milton's own export.

``.jsonl``/``.ndjson`` hold one conversation per line; a ``.json`` file holds one or a list
(errors then name the line where that record starts). Each record is validated on its own and a
bad one is reported as ``file:line: reason``; the good ones of a file are written in ONE
transaction (``strict``: none if any is bad). A conversation is identified by a hash of its
(role, normalised content) list, so re-ingesting it, even reformatted or converted to another
of these formats, adds nothing. Imported sessions are stored 'ended'; the job then processes
them into memory (:func:`milton.memory.sessions.process_sessions`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import sqlite_utils

from milton.core.errors import InputError
from milton.core.inputs import lone_surrogate, open_source, read_lines, special_file_reason
from milton.memory.sessions import (
    ROLES,
    MessageIn,
    conversation_hash,
    insert_session,
    message_problem,
)

SUFFIXES = (".jsonl", ".ndjson", ".json")
MAX_RECORD_BYTES = 64 << 20  # one conversation line; messages themselves are capped by config
MAX_JSON_BYTES = 512 << 20  # a whole .json file is parsed in memory
_NAMESPACE = uuid.UUID("5f0f3c8e-6d1a-4c55-9a63-0c1f6f1b7a21")
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_OPENAI_ROLES = {**{r: r for r in ROLES}, "developer": "system", "function": "tool"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "function_call": "assistant", "system": "system",
                   "tool": "tool", "function": "tool", "observation": "tool"}
_MESSAGE_TS = ("ts", "timestamp", "created_at", "create_time")
_RECORD_TS = ("started", "timestamp", "created", "created_at", "create_time")


class RecordError(ValueError):
    """One record is unusable; the message is the reason shown after ``file:line:``."""


class RejectedInput(InputError):
    """Nothing could be ingested. ``rejected`` holds (source, line, reason) for the records not
    already named in the message, so the CLI can list them before the one-line error."""

    def __init__(self, message: str, rejected: list[tuple[str, int | str, str]]) -> None:
        super().__init__(message)
        self.rejected = rejected


@dataclass
class Conversation:
    messages: list[MessageIn]
    format: str
    session_id: str | None = None  # Milton exports keep their id
    user: str | None = None
    ended: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return conversation_hash((m.role, m.content) for m in self.messages)


@dataclass
class FileReport:
    source: str
    sessions: list[str] = field(default_factory=list)  # ids added
    duplicates: int = 0
    messages: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class ConversationReport:
    source: str
    files: list[FileReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def session_ids(self) -> list[str]:
        return [sid for f in self.files for sid in f.sessions]

    @property
    def rejected(self) -> list[tuple[str, int, str]]:
        return [(f.source, line, reason) for f in self.files for line, reason in f.rejected]

    def as_metrics(self) -> dict[str, Any]:
        rejected = self.rejected
        return {"source": self.source, "files": len(self.files), "sessions": len(self.session_ids),
                "duplicates": sum(f.duplicates for f in self.files),
                "messages": sum(f.messages for f in self.files), "rejected": len(rejected),
                "rejected_rows": [list(r) for r in rejected[:50]],
                "skipped_files": [list(s) for s in self.skipped[:50]]}


# -- parsing ---------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def parse_ts(value: Any, where: str) -> float:
    """ISO-8601 (naive means UTC) or epoch seconds (milliseconds accepted above 1e11)."""
    out: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value) / (1000 if value > 1e11 else 1)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            out = float(text)
            out = out / 1000 if out > 1e11 else out
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                out = None
            else:
                out = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    if out is None or not math.isfinite(out) or out <= 0 or out > 32503680000:  # year 3000
        raise RecordError(f"{where}: bad timestamp {str(value)[:40]!r} (expected ISO-8601 or epoch seconds)")
    return out


def _text(content: Any, where: str) -> str:
    """A string, or OpenAI's list of parts with the text parts joined (images etc. dropped)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    raise RecordError(f"{where}: content must be a string or a list of text parts, got {_kind(content)}")


def _tool_calls_text(raw: dict[str, Any]) -> str:
    """An assistant turn that only calls tools has no content; describe the calls instead."""
    calls = raw.get("tool_calls") or ([{"function": raw["function_call"]}] if raw.get("function_call") else [])
    out = []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and fn.get("name"):
            out.append(f"[tool call] {fn['name']}({str(fn.get('arguments') or '')[:2000]})")
    return "\n".join(out)


def parse_record(record: Any, *, max_chars: int, now: float) -> Conversation:
    """Validate one decoded record; raise :class:`RecordError` with the reason."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {_kind(record)}")
    if "milton_session" in record:
        fmt, key, role_key, text_key, roles = "milton", "messages", "role", "content", {r: r for r in ROLES}
    elif "messages" in record:
        fmt, key, role_key, text_key, roles = "openai", "messages", "role", "content", _OPENAI_ROLES
    elif "conversations" in record:
        fmt, key, role_key, text_key, roles = "sharegpt", "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise RecordError("no messages (expected a 'messages' or 'conversations' list)")
    raw_messages = record[key]
    if not isinstance(raw_messages, list):
        raise RecordError(f"'{key}': expected a list, got {_kind(raw_messages)}")
    if not raw_messages:
        raise RecordError(f"no messages ('{key}' is empty)")
    messages: list[MessageIn] = []
    stamps: list[float | None] = []
    for index, raw in enumerate(raw_messages):
        where = f"{key}[{index}]"
        if not isinstance(raw, dict):
            raise RecordError(f"{where}: expected an object, got {_kind(raw)}")
        role = raw.get(role_key, raw.get("role"))
        if not isinstance(role, str) or role.strip().lower() not in roles:
            shown = repr(role) if isinstance(role, str) else f"{_kind(role)}"
            raise RecordError(f"{where}: unknown role {shown} (expected {', '.join(roles)})")
        role = roles[role.strip().lower()]
        content = _text(raw.get(text_key, raw.get("content")), where)
        if not content.strip() and role == "assistant":
            content = _tool_calls_text(raw)
        problem = message_problem(role, content, max_chars)
        if problem:
            raise RecordError(f"{where}: {problem}")
        stamp = next((raw[k] for k in _MESSAGE_TS if raw.get(k) not in (None, "")), None)
        stamps.append(None if stamp is None else parse_ts(stamp, f"{where}.ts"))
        meta = raw.get("metadata") if fmt == "milton" else {
            k: raw[k] for k in ("name", "tool_calls", "tool_call_id", "function_call") if raw.get(k)}
        messages.append(MessageIn(role, content, 0.0, meta if isinstance(meta, dict) and meta else None))
    top_key = next((k for k in _RECORD_TS if record.get(k) not in (None, "")), None)
    start = parse_ts(record[top_key], top_key) if top_key else None
    for message, ts in zip(messages, _fill_times(stamps, start, now)):
        message.ts = ts
    ended = parse_ts(record["ended"], "ended") if fmt == "milton" and record.get("ended") else None
    conv = Conversation(messages, fmt, ended=ended)
    user = record.get("user")
    conv.user = None if user in (None, "") or isinstance(user, (dict, list)) else str(user)
    if fmt == "milton":
        sid = record.get("id")
        if sid is not None and (not isinstance(sid, str) or not _SESSION_ID.match(sid)):
            raise RecordError(f"id: expected letters, digits and ._:- (at most 128), got {str(sid)[:40]!r}")
        conv.session_id = sid
        conv.metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    else:
        conv.metadata = {"format": fmt}
        if isinstance(record.get("id"), (str, int)):
            conv.metadata["external_id"] = str(record["id"])
    return conv


def _fill_times(stamps: list[float | None], start: float | None, now: float) -> list[float]:
    """Timestamps from the data; missing ones one second after the previous message (before
    the first known one), and a conversation without any ends at ``now`` (or starts at its
    top-level timestamp)."""
    known = [i for i, ts in enumerate(stamps) if ts is not None]
    if not known:
        base = start if start is not None else now - (len(stamps) - 1)
        return [base + i for i in range(len(stamps))]
    out = list(stamps)
    first = known[0]
    for i in range(first - 1, -1, -1):
        out[i] = out[i + 1] - 1  # type: ignore[operator]
    for i in range(first + 1, len(out)):
        if out[i] is None:
            out[i] = out[i - 1] + 1  # type: ignore[operator]
    return out  # type: ignore[return-value]


def _decode(text: str) -> Any:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"invalid JSON: {str(exc)[:80]}") from None
    _no_surrogate(text, record)
    return record


def _no_surrogate(text: str, record: Any) -> None:
    where = lone_surrogate(text, record)
    if where is not None:
        raise RecordError(f"{where}: a lone surrogate escape (e.g. \\ud800) is not valid Unicode")


def _jsonl_records(lines: Iterator[tuple[int, str | None, str | None]]) -> Iterator[tuple[int, Any, str | None]]:
    for number, text, error in lines:
        if error:
            yield number, None, error
        elif text is not None and text.strip():
            try:
                yield number, _decode(text.rstrip("\r\n")), None  # columns stay on this line
            except RecordError as exc:
                yield number, None, str(exc)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_records(text: str) -> Iterator[tuple[int, Any, str | None]]:
    """One JSON document: an object, or a list whose items keep the line they start on."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        yield exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
        return
    except (ValueError, RecursionError) as exc:
        yield 1, None, f"invalid JSON: {str(exc)[:80]}"
        return
    if not isinstance(data, list):
        line = _line_of(text, len(text) - len(text.lstrip()))
        try:
            _no_surrogate(text, data)
        except RecordError as exc:
            yield line, None, str(exc)
            return
        yield line, data, None
        return
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    for item in data:  # re-scan only for positions; the document is known to be valid
        pos = ws.match(text, pos).end()  # type: ignore[union-attr]
        _, end = decoder.raw_decode(text, pos)
        try:
            _no_surrogate(text[pos:end], item)
        except RecordError as exc:
            yield _line_of(text, pos), None, str(exc)
        else:
            yield _line_of(text, pos), item, None
        pos = end


def read_records(handle: BinaryIO, source: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line, decoded record or None, error) for a conversation stream, by extension; ``-`` and
    other names are sniffed (a JSON document if it parses as one, else JSONL)."""
    suffix = Path(source).suffix.lower() if source != "<stdin>" else ""
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_records(read_lines(handle, MAX_RECORD_BYTES))
        return
    raw = handle.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        yield 1, None, f"larger than {MAX_JSON_BYTES} bytes; split it or use JSONL"
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1)  # within the line, as read_lines
        yield raw.count(b"\n", 0, exc.start) + 1, None, f"not UTF-8 (byte {column})"
        return
    text = text.removeprefix("\ufeff")
    if suffix != ".json":
        try:
            json.loads(text)
        except ValueError:
            yield from _jsonl_records(read_lines(io.BytesIO(raw), MAX_RECORD_BYTES))
            return
    records = list(_json_records(text))
    if suffix == ".json" and records and records[0][2] and "Extra data" in records[0][2]:  # JSONL named .json
        records = list(_jsonl_records(read_lines(io.BytesIO(raw), MAX_RECORD_BYTES)))
    yield from records


# -- ingest ----------------------------------------------------------------------------------
def ingest_conversation_file(db: sqlite_utils.Database, path: str | Path, *, max_message_chars: int,
                             now: datetime, strict: bool = False, raise_errors: bool = True) -> FileReport:
    """One file (or ``-``) in one transaction. With ``raise_errors``, raises InputError when no
    record was usable, or under ``strict`` when any is bad; without, such a file is returned
    with its rejections and nothing written."""
    handle, source, close = open_source(path)
    report = FileReport(source=source)
    good: list[tuple[int, Conversation]] = []
    try:
        for line, record, error in read_records(handle, source):
            if error is None:
                try:
                    good.append((line, parse_record(record, max_chars=max_message_chars, now=now.timestamp())))
                    continue
                except RecordError as exc:
                    error = str(exc)
            report.rejected.append((line, error))
    except OSError as exc:
        report.rejected.append((0, f"cannot read: {exc.strerror or exc}"))
    finally:
        if close:
            handle.close()
    if strict and report.rejected and raise_errors:
        line, reason = report.rejected[0]
        raise RejectedInput(f"{source}:{line}: {reason} (--strict: nothing ingested from this file)",
                            [(source, n, r) for n, r in report.rejected[1:]])
    if not good or (strict and report.rejected):
        if raise_errors:
            if report.rejected:
                line, reason = report.rejected[0]
                raise RejectedInput(f"{source}:{line}: {reason} (all {len(report.rejected)} record(s) "
                                    "rejected, nothing ingested)",
                                    [(source, n, r) for n, r in report.rejected[1:]])
            raise InputError(f"{source}: empty, no conversations to ingest")
        return report
    with db.atomic():
        for _line, conv in good:
            digest = conv.digest
            if db.execute("select 1 from sessions where content_hash = ? or id = ?",
                          [digest, conv.session_id]).fetchone():
                report.duplicates += 1
                continue
            sid = conv.session_id or str(uuid.uuid5(_NAMESPACE, digest))
            if db.execute("select 1 from sessions where id = ?", [sid]).fetchone():
                sid = str(uuid.uuid4())
            last = max(m.ts for m in conv.messages)
            insert_session(db, session_id=sid, user=conv.user, source=f"import:{source}",
                           messages=conv.messages, status="ended", digest=digest,
                           metadata=conv.metadata or None, ended=conv.ended or last)
            report.sessions.append(sid)
            report.messages += len(conv.messages)
    return report


def collect_files(path: Path, suffixes: tuple[str, ...]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under a directory, sorted, hidden ones skipped; others reported with a reason."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = Path(root) / name
            if full.suffix.lower() not in suffixes:
                skipped.append((str(full), f"not a {'/'.join(suffixes)} file"))
            elif (special := special_file_reason(full)) is not None:
                skipped.append((str(full), special))  # a FIFO would hang the run, a loop abort it
            else:
                files.append(full)
    return files, skipped


def ingest_conversations(db: sqlite_utils.Database, path: str | Path, *, max_message_chars: int,
                         now: datetime, strict: bool = False) -> ConversationReport:
    """A file, ``-`` or a directory (each file its own transaction). With a directory, bad
    records and files are reported and the rest kept; :class:`RejectedInput` only when nothing
    at all was ingested (duplicates count as ingested: a re-run is not an error)."""
    report = ConversationReport(source=str(path))
    target = Path(path)
    if str(path) == "-" or not target.is_dir():
        report.files.append(ingest_conversation_file(db, path, max_message_chars=max_message_chars,
                                                     now=now, strict=strict))
        return report
    files, report.skipped = collect_files(target, SUFFIXES)
    for file in files:
        try:
            done = ingest_conversation_file(db, file, max_message_chars=max_message_chars, now=now,
                                            strict=strict, raise_errors=False)
        except InputError as exc:  # e.g. swapped for a FIFO since the scan: skip it, go on
            report.skipped.append((str(file), str(exc).removeprefix(f"{file}: ")))
            continue
        report.files.append(done)
        if strict and done.rejected:
            report.skipped.append((done.source, f"--strict: {len(done.rejected)} bad record(s), "
                                                "nothing ingested from this file"))
    if not any(f.sessions or f.duplicates for f in report.files):
        rejected = report.rejected
        why = (f"{len(rejected)} record(s) rejected in {len(files)} file(s)" if files
               else "no conversation files (.jsonl, .ndjson, .json)")
        raise RejectedInput(f"{path}: nothing ingested ({why})", [*rejected])
    return report
