"""The one SQLite store: WAL, a busy timeout, the schema brought up to date on open.

Every writer opens it through :func:`open_store`, which creates the file, enables WAL once
(outside any transaction) and applies pending migrations (:mod:`milton.core.migrations`), each
in its own transaction, so a crash mid-migration leaves the previous schema version intact.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from milton.core.errors import MiltonError
from milton.core.migrations import migrate


class Store(sqlite_utils.Database):
    """A Database whose outermost ``atomic()`` is ``BEGIN IMMEDIATE``.

    A deferred transaction that reads before it writes cannot wait for the write lock in WAL
    mode: if another connection committed meanwhile, SQLite fails at once with "database is
    locked" (the busy timeout does not apply). Taking the write lock up front makes concurrent
    writers queue on the busy timeout instead.
    """

    @contextlib.contextmanager
    def atomic(self) -> Iterator[sqlite_utils.Database]:
        if self.conn.in_transaction:
            with super().atomic() as db:  # nested: a savepoint
                yield db
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.conn.rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.rollback()
                raise


def connect(path: Path, busy_timeout_ms: int = 30_000) -> sqlite_utils.Database:
    """Open a connection shared safely across threads (serve scores on worker threads)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        db = Store(conn)
        if db.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.enable_wal()
        conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: no corruption on crash
        conn.execute("PRAGMA foreign_keys = ON")
    except PermissionError as exc:
        raise MiltonError(f"{path}: cannot open database: {exc.strerror}") from None
    except sqlite3.OperationalError as exc:
        raise MiltonError(f"{path}: cannot open database: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise MiltonError(f"{path}: not a usable SQLite database: {exc}") from None
    return db


def connect_readonly(path: Path, timeout_s: float = 5.0) -> sqlite3.Connection:
    """A read-only connection that never creates, migrates or writes the store (status,
    notifications, the scheduler: the store may be missing or be what broke).

    Raises ``sqlite3.Error``; callers decide what a missing or unreadable store means.
    """
    conn = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=timeout_s)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
    return conn


def open_store(path: Path, busy_timeout_ms: int = 30_000) -> sqlite_utils.Database:
    db = connect(path, busy_timeout_ms)
    try:
        migrate(db)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise MiltonError(f"{path}: cannot migrate database: {exc}") from None
    return db
