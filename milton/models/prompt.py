"""The plain prompt format and stop-string handling, shared by training and serving.

``model.chat_format`` ``plain`` (base models, and any model without a usable chat template):
system text, then ``User: ...`` / ``Assistant: ...`` turns, ending with ``Assistant:``. It is
what train-lora trains on (:mod:`milton.train.formatting`) and what both serve backends render,
so a model is asked exactly the way it was taught. :class:`StopScanner` turns decoded text into
streamable text: stop strings (the next ``User:`` turn for plain prompts) are held back, never
streamed, and the answer is cut at the first.
"""

from __future__ import annotations

from collections.abc import Iterable

PLAIN_USER = "User: "
PLAIN_ASSISTANT = "Assistant:"
PLAIN_STOP = "\nUser:"


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """``model.chat_format`` plain: system text, then ``User: ...`` / ``Assistant: ...`` turns,
    ending with ``Assistant:`` (the format train-lora trains base models on)."""
    parts: list[str] = []
    system = [m.get("content") or "" for m in messages if m.get("role") == "system"]
    if system:
        parts.append("\n\n".join(system) + "\n\n")
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "user":
            parts.append(f"{PLAIN_USER}{content}\n")
        elif role == "assistant":
            parts.append(f"{PLAIN_ASSISTANT} {content}\n")
    parts.append(PLAIN_ASSISTANT)
    return "".join(parts)


def stop_strings(stop: Iterable[str], mode: str) -> list[str]:
    """A request's stop strings, plus ``\\nUser:`` for plain prompts (the next turn)."""
    stops = [s for s in stop if s]
    if mode == "plain":
        stops.append(PLAIN_STOP)
    return stops


class StopScanner:
    """Decoded text in, streamable text out: the answer's leading space is dropped, text that
    could be the start of a stop string is held back, and the text is cut at the first stop.

    Shared by the serve backends so they stream, stop and strip alike.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.started = False
        self.stopped = False   # a stop string was found; ``pending`` is cut before it

    def push(self, text: str) -> str:
        """Add decoded text; return what may be streamed now ('' while held or once stopped)."""
        self.pending += text
        if not self.started and self.pending:
            if self.pending == " ":
                return ""  # SentencePiece's word-start space, not yet followed by text
            self.pending = self.pending[1:] if self.pending.startswith(" ") else self.pending
            self.started = True
        if self._cut():
            return ""
        emit = len(self.pending) - held_back(self.pending, self.stops, self.hold)
        if emit <= 0:
            return ""
        out, self.pending = self.pending[:emit], self.pending[emit:]
        return out

    def finish(self, tail: str = "") -> str:
        """After the last token: what is left (``tail`` = the decoder's flush), cut at a stop."""
        if not self.stopped:  # bytes after a stop string are not part of the answer
            self.pending += tail
        if not self.started:
            self.pending = self.pending.lstrip(" ")
        self._cut()
        out, self.pending = self.pending, ""
        return out

    def _cut(self) -> bool:
        cut = min((self.pending.find(s) for s in self.stops if s in self.pending), default=-1)
        if cut >= 0:
            self.pending = self.pending[:cut]
            self.stopped = True
        return self.stopped


def held_back(text: str, stops: list[str], hold: int) -> int:
    """How many trailing characters could be the start of a stop string (kept back)."""
    for n in range(min(hold, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0
