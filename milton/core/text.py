"""Printing text that came from outside (process names, paths, users, memories, titles, file
names) literally: never as Rich markup, never as terminal control sequences.

A process can rename itself ``[/bold]`` or ``\\x1b[2J`` (prctl PR_SET_NAME); printed through
Rich with markup on, the first crashes the command (MarkupError) and ``[link=...]`` or colour
tags can spoof what a table shows; the second drives the terminal. Control characters are shown
as visible escapes (``\\x1b``) so an odd name stays visibly odd instead of disappearing.
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text

# C0 controls, DEL and C1 controls (\x9b is a one-byte CSI on some terminals); bidi overrides
# and isolates, which can reorder what a table shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: Any, *, keep_newlines: bool = False) -> str:
    """``value`` as text with every control character replaced by a visible escape.

    ``keep_newlines`` keeps ``\\n`` and ``\\t`` (multi-line memory text); table cells and
    one-line messages escape them too, so a name cannot forge an extra row.
    """
    text = "" if value is None else str(value)
    pattern = _CONTROL_KEEP_LINES if keep_newlines else _CONTROL
    return pattern.sub(_escape, text)


def literal(value: Any, *, style: str = "", keep_newlines: bool = False) -> Text:
    """A Rich ``Text`` that renders ``value`` exactly (no markup parsing, no highlighting)."""
    return Text(safe(value, keep_newlines=keep_newlines), style=style)
