"""Text and Markdown documents into long-term knowledge memories.

Files are cut at headings, then paragraphs are packed up to ``memory.chunk_chars`` (over-long
ones split at sentence ends); each chunk starts with its heading path so it still makes sense
alone. The ``documents`` table keeps each file's sha256: an unchanged file costs one hash and no
embedding, and a changed one adds only its new chunks and deletes the ones that are gone, in one
transaction. Chunks are deduplicated by content, so identical text in two files is stored once
(owned by the first file; if that file later drops it, the other file's copy returns the next
time that file changes).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.errors import InputError
from milton.core.inputs import open_regular, special_file_reason
from milton.memory.conversations import collect_files
from milton.memory.embed import Embedder
from milton.memory.memories import (
    NewMemory,
    add_prepared,
    content_hash,
    delete_memories,
    embed_new,
)

SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
FLUSH_CHUNKS = 1024  # chunks embedded together before their files are written
_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_UNDERLINE = re.compile(r"^ {0,3}([=\-~^])\1{2,}[ \t]*$")
_UNDERLINE_LEVEL = {"=": 1, "-": 2, "~": 3, "^": 4}  # Markdown setext; the usual reST order
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


# -- chunking --------------------------------------------------------------------------------
def sections(text: str) -> list[tuple[list[str], str]]:
    """(heading path, body) in order. ATX (``#``) and underlined (Markdown setext, reST)
    headings; nothing inside code fences counts as a heading."""
    lines = text.splitlines()
    path: list[tuple[int, str]] = []
    out: list[tuple[list[str], str]] = []
    body: list[str] = []
    fence: str | None = None

    def flush() -> None:
        if "\n".join(body).strip():
            out.append(([title for _, title in path], "\n".join(body).strip("\n")))
        body.clear()

    def enter(level: int, title: str) -> None:
        flush()
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title.strip()))

    skip = False
    for i, line in enumerate(lines):
        if skip:
            skip = False
            continue
        marker = _FENCE.match(line)
        if fence is not None:
            body.append(line)
            if marker and marker.group(1) == fence:
                fence = None
            continue
        if marker:
            fence = marker.group(1)
            body.append(line)
            continue
        atx = _ATX.match(line)
        if atx:
            enter(len(atx.group(1)), atx.group(2))
            continue
        under = _UNDERLINE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if (under and line.strip() and (i == 0 or not lines[i - 1].strip())
                and len(lines[i + 1].strip()) >= min(len(line.strip()), 3)):
            enter(_UNDERLINE_LEVEL[under.group(1)], line)
            skip = True
            continue
        body.append(line)
    flush()
    return out


def paragraphs(body: str) -> list[str]:
    """Blocks separated by blank lines; a fenced code block stays one block."""
    blocks: list[str] = []
    current: list[str] = []
    fence: str | None = None
    for line in body.splitlines():
        marker = _FENCE.match(line)
        if fence is None and not line.strip():
            if current:
                blocks.append("\n".join(current).strip("\n"))
                current = []
            continue
        current.append(line)
        if marker:
            fence = None if fence == marker.group(1) else (fence or marker.group(1))
    if current:
        blocks.append("\n".join(current).strip("\n"))
    return [b for b in blocks if b.strip()]


_NON_SPACE = re.compile(r"\S")


def _hard_split(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit``, cut at the last space in their second half if any.

    Walks an index instead of re-slicing the rest of the text after each piece: slicing made
    one long sentence (a megabyte with no sentence end) cost O(n^2 / limit) in copying.
    """
    parts = []
    start, end = 0, len(text)
    while end - start > limit:
        found = text.rfind(" ", start + limit // 2, start + limit)
        cut = found - start if found > start else limit
        parts.append(text[start:start + cut].rstrip())
        rest = _NON_SPACE.search(text, start + cut)  # what str.lstrip() would skip (same \s)
        start = rest.start() if rest else end
    return parts + ([text[start:]] if start < end else [])


def _pack(pieces: Iterable[str], limit: int, joiner: str) -> list[str]:
    out: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(joiner) + len(piece) > limit:
            out.append(current)
            current = ""
        current = f"{current}{joiner}{piece}" if current else piece
    return out + ([current] if current else [])


def split_paragraph(paragraph: str, limit: int) -> list[str]:
    """At sentence ends, packed up to ``limit``; a sentence longer than that at spaces."""
    sentences = [s for s in _SENTENCE_END.split(paragraph) if s.strip()]
    parts = [p for s in sentences for p in (_hard_split(s, limit) if len(s) > limit else [s])]
    return _pack(parts, limit, " ")


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Chunks of about ``chunk_chars``, each prefixed by its heading path (``A > B``)."""
    chunks: list[str] = []
    for path, body in sections(text):
        prefix = " > ".join(path)
        limit = max(chunk_chars - len(prefix) - 2, chunk_chars // 2) if prefix else chunk_chars
        parts = [p for para in paragraphs(body)
                 for p in (split_paragraph(para, limit) if len(para) > limit else [para])]
        for piece in _pack(parts, limit, "\n\n"):
            chunks.append(f"{prefix}\n\n{piece}" if prefix else piece)
    return chunks


# -- ingest ----------------------------------------------------------------------------------
@dataclass
class DocumentReport:
    files_seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks_added: int = 0
    chunks_removed: int = 0
    chunks_shared: int = 0  # identical to a chunk already stored (another file's)

    def as_metrics(self) -> dict[str, Any]:
        return {"files_seen": self.files_seen, "new": self.new, "changed": self.changed,
                "unchanged": self.unchanged, "skipped": len(self.skipped),
                "skipped_files": [list(s) for s in self.skipped[:50]],
                "chunks_added": self.chunks_added, "chunks_removed": self.chunks_removed,
                "chunks_shared": self.chunks_shared}


@dataclass
class _Doc:
    path: str
    sha256: str
    size: int
    new: bool
    items: list[NewMemory]


def _targets(paths: Iterable[str | Path], report: DocumentReport) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found, skipped = collect_files(path, SUFFIXES)
            files += found
            report.skipped += skipped
        elif path.is_file():
            if path.suffix.lower() in SUFFIXES:
                files.append(path)
            else:
                report.skipped.append((str(path), f"not a {'/'.join(SUFFIXES)} file"))
        elif os.path.lexists(path):
            report.skipped.append((str(path), special_file_reason(path) or "not a regular file"))
        else:
            report.skipped.append((str(path), "no such file or directory"))
    return list(dict.fromkeys(f.resolve() for f in files))


def _read(path: Path) -> tuple[bytes | None, str]:
    try:
        with open_regular(path) as handle:  # never blocks on a FIFO or reads a device
            return handle.read(), ""
    except InputError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"


def _decode(data: bytes) -> tuple[str | None, str]:
    if b"\x00" in data:
        return None, "binary file (contains NUL bytes)"
    try:
        return data.decode("utf-8").removeprefix("\ufeff"), ""
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start})"


def _flush(db: sqlite_utils.Database, embedder: Embedder, docs: list[_Doc], now: datetime,
           report: DocumentReport, progress: bool) -> None:
    fresh: list[NewMemory] = []  # chunks this file does not have yet (others may: embed_new checks)
    for doc in docs:
        have = {h for (h,) in db.execute(
            "select content_hash from memories where source = ? and tier = 'long' "
            "and category = 'knowledge'", [doc.path])}
        fresh += [i for i in doc.items if content_hash(i.content) not in have]
    vectors = embed_new(db, embedder, fresh, progress=progress)
    for doc in docs:
        with db.atomic():
            have = {h: i for i, h in db.execute(
                "select id, content_hash from memories where source = ? and tier = 'long' "
                "and category = 'knowledge'", [doc.path])}
            wanted = {content_hash(i.content) for i in doc.items}
            todo = [i for i in doc.items if content_hash(i.content) not in have]
            ids = add_prepared(db, embedder, todo, vectors, now)
            removed = delete_memories(db, [m for digest, m in have.items() if digest not in wanted])
            db.conn.execute(
                "insert into documents (path, sha256, size, chunks, ingested) values (?, ?, ?, ?, ?) "
                "on conflict (path) do update set sha256 = excluded.sha256, size = excluded.size, "
                "chunks = excluded.chunks, ingested = excluded.ingested",
                (doc.path, doc.sha256, doc.size, len(wanted), now.timestamp()))
        report.chunks_added += sum(1 for i in ids if i is not None)
        report.chunks_shared += len({content_hash(t.content) for t, i in zip(todo, ids) if i is None})
        report.chunks_removed += removed
        if doc.new:
            report.new += 1
        else:
            report.changed += 1


def ingest_documents(db: sqlite_utils.Database, embedder: Embedder, paths: Sequence[str | Path],
                     now: datetime, chunk_chars: int, progress: bool = False) -> DocumentReport:
    """Ingest files and directories (recursively; hidden ones skipped). Unreadable, binary,
    non-UTF-8 and other-extension files are reported in ``skipped`` and never fatal."""
    report = DocumentReport()
    pending: list[_Doc] = []
    for path in _targets(paths, report):
        report.files_seen += 1
        data, why = _read(path)
        if data is None:
            report.skipped.append((str(path), why))
            continue
        digest = hashlib.sha256(data).hexdigest()
        row = db.execute("select sha256 from documents where path = ?", [str(path)]).fetchone()
        if row is not None and row[0] == digest:
            report.unchanged += 1
            continue
        text, why = _decode(data)
        if text is None:
            report.skipped.append((str(path), why))
            continue
        items = [NewMemory(content=chunk, tier="long", category="knowledge", importance=0.7,
                           tags=[path.stem, "document"], source=str(path), created=now.timestamp())
                 for chunk in chunk_text(text, chunk_chars)]
        pending.append(_Doc(str(path), digest, len(data), row is None, items))
        if sum(len(d.items) for d in pending) >= FLUSH_CHUNKS:
            _flush(db, embedder, pending, now, report, progress)
            pending = []
    if pending:
        _flush(db, embedder, pending, now, report, progress)
    return report
