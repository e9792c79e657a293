"""``milton ingest documents``: chunking, dedupe by file hash and chunk content, changed files,
mixed directories. Real SQLite and the real embedder (loaded once for the module)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pytest
from helpers import assert_clean_error

from milton.memory.documents import chunk_text, ingest_documents, sections

NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)
GUIDE = """Milton keeps everything in one SQLite file.

# Setup

## Install

Create a virtualenv and install Milton with pip.

## Configure

Settings live in config.toml. Environment variables override the file.

# Usage

Run `milton serve` to start the server.
"""


class CountingEmbedder:
    """The real model, counting what it is asked to embed."""

    def __init__(self, real) -> None:
        self.real, self.name, self.dim = real, real.name, real.dim
        self.texts: list[str] = []

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        self.texts += list(texts)
        return self.real.encode(texts)


@pytest.fixture
def embedder(embedder) -> CountingEmbedder:
    """conftest's real embedder, counting what it is asked to encode."""
    return CountingEmbedder(embedder)


@pytest.fixture
def db(memory_db):
    return memory_db


def knowledge(db) -> dict[str, int]:
    return {content: memory_id for memory_id, content in db.execute(
        "select id, content from memories where tier = 'long' and category = 'knowledge'")}


# -- chunking --------------------------------------------------------------------------------
def test_chunks_carry_their_heading_path():
    assert chunk_text(GUIDE, 1200) == [
        "Milton keeps everything in one SQLite file.",
        "Setup > Install\n\nCreate a virtualenv and install Milton with pip.",
        "Setup > Configure\n\nSettings live in config.toml. Environment variables override the file.",
        "Usage\n\nRun `milton serve` to start the server.",
    ]


def test_paragraphs_are_packed_and_long_ones_split_at_sentences():
    sentences = " ".join(f"Sentence {i} says something about chunking." for i in range(60))
    text = "# Notes\n\n" + "\n\n".join(["Short one.", "Short two.", sentences, "Tail."])
    chunks = chunk_text(text, 400)
    assert chunks[0] == "Notes\n\nShort one.\n\nShort two."  # packed together
    assert all(len(c) <= 400 for c in chunks) and len(chunks) > 5
    body = [c.removeprefix("Notes\n\n") for c in chunks]
    assert all(c.startswith("Notes\n\n") for c in chunks)
    assert all(b.endswith(".") for b in body)  # cut at sentence ends only
    assert " ".join(body[1:]).replace("\n\n", " ") == f"{sentences} Tail."  # nothing lost
    word = "x" * 1000
    assert all(len(c) <= 300 for c in chunk_text(word + " " + word, 300))


def test_headings_in_code_fences_and_setext_headings():
    text = ("Title\n=====\n\nIntro.\n\nPart\n----\n\n```bash\n# a comment, not a heading\n\necho hi\n```\n"
            "\n### Deep\n\nDetail.\n")
    assert [(path, body.splitlines()[0]) for path, body in sections(text)] == [
        (["Title"], "Intro."), (["Title", "Part"], "```bash"), (["Title", "Part", "Deep"], "Detail.")]
    assert chunk_text(text, 1200)[1] == "Title > Part\n\n```bash\n# a comment, not a heading\n\necho hi\n```"


# -- ingest ----------------------------------------------------------------------------------
def test_new_unchanged_and_changed_files(db, embedder, milton_home):
    guide = milton_home / "guide.md"
    guide.write_text(GUIDE)
    report = ingest_documents(db, embedder, [guide], NOW, 1200)
    assert (report.files_seen, report.new, report.chunks_added) == (1, 1, 4)
    rows = db.execute("select category, importance, tags, source, created from memories").fetchall()
    assert {r[:4] for r in rows} == {("knowledge", 0.7, '["guide", "document"]', str(guide.resolve()))}
    assert db.execute("select path, sha256, size, chunks from documents").fetchone()[2:] == (len(GUIDE), 4)
    before = knowledge(db)
    assert len(embedder.texts) == 4

    embedder.texts.clear()
    report = ingest_documents(db, embedder, [guide], NOW, 1200)
    assert (report.unchanged, report.chunks_added, report.chunks_removed) == (1, 0, 0)
    assert embedder.texts == []  # an unchanged file is never re-embedded
    assert knowledge(db) == before

    guide.write_text(GUIDE.replace("Environment variables override the file.",
                                   "MILTON_* environment variables override the file."))
    report = ingest_documents(db, embedder, [guide], NOW, 1200)
    assert (report.changed, report.chunks_added, report.chunks_removed) == (1, 1, 1)
    assert embedder.texts == [
        "Setup > Configure\n\nSettings live in config.toml. MILTON_* environment variables override the file."]
    after = knowledge(db)
    kept = set(before) & set(after)
    assert len(kept) == 3 and all(before[c] == after[c] for c in kept)  # untouched chunks keep their ids
    assert db.execute("select count(*) from memory_vectors").fetchone() == (4,)
    new_id = after[embedder.texts[0]]
    assert db.execute("select rowid from memories_fts where memories_fts match 'settings'").fetchall() == [
        (new_id,)]  # the replaced chunk is gone from keyword search too


def test_identical_chunks_across_files_are_stored_once(db, embedder, milton_home):
    (milton_home / "a.md").write_text("# Shared\n\nThe same paragraph.\n\n# Only A\n\nAlpha.\n")
    (milton_home / "b.txt").write_text("# Shared\n\nThe same paragraph.\n")
    report = ingest_documents(db, embedder, [milton_home / "a.md", milton_home / "b.txt"], NOW, 1200)
    assert (report.new, report.chunks_added, report.chunks_shared) == (2, 2, 1)
    assert embedder.texts == ["Shared\n\nThe same paragraph.", "Only A\n\nAlpha."]
    assert db.execute("select chunks from documents order by path").fetchall() == [(2,), (1,)]


def test_mixed_directory(db, embedder, milton_home):
    docs = milton_home / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / ".git").mkdir()
    (docs / "readme.md").write_text(GUIDE)
    (docs / "sub" / "notes.rst").write_text("Notes\n=====\n\nA reStructuredText note.\n")
    (docs / "sub" / "todo.text").write_text("buy milk\n")
    (docs / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (docs / "data.txt").write_bytes(b"text\x00with NUL")
    (docs / "latin1.md").write_bytes("caf\xe9\n".encode("latin-1"))
    (docs / ".git" / "HEAD.txt").write_text("ref: refs/heads/main")
    (docs / ".hidden.md").write_text("secret")
    report = ingest_documents(db, embedder, [docs, milton_home / "missing.md"], NOW, 1200)
    assert (report.files_seen, report.new, report.chunks_added) == (5, 3, 6)
    assert sorted(report.skipped) == sorted([
        (str(docs.resolve() / "data.txt"), "binary file (contains NUL bytes)"),
        (str(docs.resolve() / "latin1.md"), "not UTF-8 (byte 3)"),
        (str(docs / "logo.png"), "not a .txt/.md/.markdown/.rst/.text file"),
        (str(milton_home / "missing.md"), "no such file or directory"),
    ])
    assert "secret" not in json.dumps(list(knowledge(db)))
    assert report.as_metrics()["skipped"] == 4


def test_cli(cli, milton_home):
    rc, out, err = cli("ingest", "documents")  # what the 6-hourly timer runs on a fresh install
    assert rc == 0, err
    assert "skipped: no PATH given and memory.documents is empty" in out
    rc, out, err = cli("ingest", "documents", "nope.md")
    assert rc == 2
    assert_clean_error(err, "nope.md: no such file or directory")

    (milton_home / "kb").mkdir()
    (milton_home / "kb" / "guide.md").write_text(GUIDE)
    (milton_home / "kb" / "image.png").write_bytes(b"\x89PNG")
    env = {"MILTON_MEMORY__DOCUMENTS": '["kb"]'}  # relative to MILTON_HOME
    rc, out, err = cli("ingest", "documents", "--now", "2024-06-01T00:00:00Z", env=env)
    assert rc == 0, err
    assert f"{milton_home / 'kb' / 'image.png'}: skipped: not a .txt/.md" in err
    rc, out, err = cli("ingest", "documents", env=env)  # unchanged: fast, nothing embedded
    assert rc == 0, err
    import sqlite3

    conn = sqlite3.connect(milton_home / "data" / "milton.db")
    try:
        runs = [json.loads(m) for (m,) in conn.execute("select metrics from job_runs where job = 'ingest-documents' "
                                                       "and status = 'ok' order by id")]
        assert conn.execute("select count(*) from memories").fetchone() == (4,)
    finally:
        conn.close()
    assert [(r["new"], r["unchanged"], r["chunks_added"]) for r in runs] == [(1, 0, 4), (0, 1, 0)]
