"""Reading user-supplied files safely: bounded lines, UTF-8 checks, stdin, one-line errors."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from milton.core.errors import InputError


def read_lines(handle: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield (line number, text, error) without ever holding more than one oversized line."""
    number = 0
    while True:
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while True:  # drain the rest of the oversized line
                more = handle.readline(1 << 20)
                if not more or more.endswith(b"\n"):
                    break
            yield number, None, f"line longer than {max_line_bytes} bytes"
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, None, f"not UTF-8 (byte {exc.start})"
            continue
        if number == 1 and text.startswith("\ufeff"):
            text = text[1:]
        yield number, text, None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(text: str, decoded: Any) -> str | None:
    """Where a JSON document decoded from ``text`` holds a lone surrogate (``"\\ud800"``).

    JSON allows the escape, but the string cannot be encoded as UTF-8, so SQLite, hashing and
    printing would fail later with a traceback. Only escapes can make one (valid UTF-8 input
    cannot), so documents without ``\\uD8..``-``\\uDF..`` escapes cost one regex scan.
    Returns a path like ``messages[0].content`` (``<top>`` for the document), else None.
    """
    if not _SURROGATE_ESCAPE.search(text):
        return None
    stack: list[tuple[str, Any]] = [("", decoded)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if any("\ud800" <= ch <= "\udfff" for ch in value):
                return where or "<top>"
        elif isinstance(value, dict):
            for key, item in value.items():
                shown = json.dumps(str(key)[:40])[1:-1]  # escaped: a key may hold anything
                name = f"{where}.{shown}" if where else shown
                if any("\ud800" <= ch <= "\udfff" for ch in str(key)):
                    return f"{name} (its key)"
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def _kind_of(mode: int) -> str | None:
    """Why a file of this mode is not read as input (None: a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return f"{what}, not a regular file"
    return "not a regular file"


def special_file_reason(path: Path) -> str | None:
    """None for a regular file (or a symlink to one); else why it is skipped.

    Reading a FIFO blocks forever, a link to ``/dev/zero`` never ends, a symlink loop raises:
    directory scans skip them (with this reason) instead of hanging or aborting the run.
    """
    try:
        return _kind_of(os.stat(path).st_mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return "a broken symlink"
        return f"cannot read: {exc.strerror or exc}"


def open_regular(path: Path, *, allow_fifo: bool = False) -> BinaryIO:
    """Open a regular file for reading, never blocking on a FIFO or reading a device.

    The check is on the opened descriptor (fstat), so a file swapped for a FIFO after a
    directory scan is refused too. ``allow_fifo``: a pipe the user named on purpose
    (``--from <(ssh host milton-agent)``, a named pipe) is read like ``cat`` reads it, waiting
    for its writer. Raises :class:`InputError` naming the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path}: a symlink loop") from None
        if exc.errno == errno.ENOENT:
            raise InputError(f"{path}: no such file") from None
        if exc.errno == errno.EACCES:
            raise InputError(f"{path}: permission denied") from None
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if allow_fifo and stat.S_ISFIFO(mode):
            os.close(fd)
            fd = -1
            return open(path, "rb")  # blocking, as the user asked: it waits for the writer
        reason = _kind_of(mode)
        if reason is not None:
            raise InputError(f"{path}: {reason}")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def open_source(path: str | Path) -> tuple[BinaryIO, str, bool]:
    if str(path) == "-":
        if sys.stdin is None:
            raise InputError("<stdin>: not available (stdin is closed)")
        return sys.stdin.buffer, "<stdin>", False
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a file")
    return open_regular(p, allow_fifo=True), str(p), True


