"""Reading user-supplied files safely: bounded lines, UTF-8 checks, stdin, one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

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


def open_source(path: str | Path) -> tuple[BinaryIO, str, bool]:
    if str(path) == "-":
        if sys.stdin is None:
            raise InputError("<stdin>: not available (stdin is closed)")
        return sys.stdin.buffer, "<stdin>", False
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a file")
    try:
        return open(p, "rb"), str(p), True
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except PermissionError:
        raise InputError(f"{p}: permission denied") from None


