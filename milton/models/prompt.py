"""Prompt formats for models without a chat template, and stop-string handling, shared by
training and serving.

``model.chat_format`` picks how serve asks the model (:func:`serve_format`):

* ``template``: the model's own chat template (an instruct GGUF's ``tokenizer.chat_template``,
  an HF instruct tokenizer's); rendered by the backends.
* ``few-shot`` (what ``auto`` gives a base model, one without a chat template, such as the
  packaged Gemma 3 270M): :func:`few_shot_prompt`, a short frame that says a helpful assistant
  answers, and a few example turns, then the conversation as ``plain`` renders it. A base
  model asked a bare question tends to continue the text rather than answer it (repeat the
  question, count, loop); the frame makes "answer in one sentence" the likely continuation.
  Measured on 30 simple questions through serve: ``benchmarks/bench_chat.py``.
* ``plain``: system text, then ``User: ...`` / ``Assistant: ...`` turns, ending with
  ``Assistant:``. It is what train-lora trains base models on (:mod:`milton.train.formatting`;
  ``few-shot`` trains on ``plain`` too: the frame is a serve-time prefix, the turns are the same).

:class:`StopScanner` turns decoded text into streamable text: stop strings (the next ``User:``
turn for plain and few-shot prompts) are held back, never streamed, and the answer is cut at
the first. :func:`loop_start` finds a degenerate loop at the end of an answer (few-shot only).
"""

from __future__ import annotations

from collections.abc import Iterable

PLAIN_USER = "User: "
PLAIN_ASSISTANT = "Assistant:"
PLAIN_STOP = "\nUser:"
TURN_FORMATS = ("plain", "few-shot")  # the formats with User:/Assistant: turns
LOOP_WINDOW = 512  # characters of streamed text the loop guard looks back over

# The frame of few-shot prompts. The examples hold no numbers and no question of the benchmark
# (a number in an example is copied into arithmetic answers: measured, see bench_chat.py).
FEW_SHOT_INTRO = ("The following is a conversation between a user and a helpful, knowledgeable "
                  "assistant. The assistant answers each question correctly in one short sentence.")
FEW_SHOT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Hi!", "Hi! How can I help you?"),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("What is a mammal?", "A mammal is a warm-blooded animal that feeds its young with milk."),
)


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


def few_shot_prompt(messages: list[dict[str, str]]) -> str:
    """``model.chat_format`` few-shot: :data:`FEW_SHOT_INTRO`, the example turns, then the
    conversation as :func:`plain_prompt` renders it, system text (the caller's, and the
    memories serve injects) included: right before the real turns, where a small model still
    uses it (placed before the examples, Gemma 270M ignored an injected memory)."""
    examples = "".join(f"{PLAIN_USER}{q}\n{PLAIN_ASSISTANT} {a}\n" for q, a in FEW_SHOT_EXAMPLES)
    return f"{FEW_SHOT_INTRO}\n\n{examples}\n{plain_prompt(messages)}"


def turn_prompt(messages: list[dict[str, str]], mode: str) -> str:
    """The prompt text of a format without a chat template: 'few-shot' or 'plain'."""
    return few_shot_prompt(messages) if mode == "few-shot" else plain_prompt(messages)


def serve_format(chat_format: str, has_template: bool) -> str:
    """How serve asks the model, for ``model.chat_format`` (auto|template|few-shot|plain) and
    whether the model has a usable chat template: 'template', 'few-shot' or 'plain'.
    auto and template use the template when there is one; without one, a base model gets the
    few-shot frame (template's documented fallback)."""
    if chat_format in TURN_FORMATS:
        return chat_format
    return "template" if has_template else "few-shot"


def stop_strings(stop: Iterable[str], mode: str) -> list[str]:
    """A request's stop strings, plus ``\\nUser:`` for plain and few-shot prompts (the next
    turn)."""
    stops = [s for s in stop if s]
    if mode in TURN_FORMATS:
        stops.append(PLAIN_STOP)
    return stops


def loop_start(text: str, *, min_run: int = 32, max_unit: int = 12, min_repeats: int = 4) -> int | None:
    """Where a degenerate loop at the end of ``text`` starts (the first repeat after the first
    copy of the unit), or None: the last ``min_run`` or more characters are one unit of at most
    ``max_unit`` characters repeated ``min_repeats`` or more times ("100.000.000.000.000...",
    "solid, solid, solid, ..."). Serve ends a few-shot answer there: a base model that starts
    looping never stops by itself, and the loop is no part of an answer."""
    n = len(text)
    if n < min_run:
        return None
    for unit in range(1, max_unit + 1):
        if text[n - unit:] != text[n - 2 * unit:n - unit]:
            continue
        start = n - unit
        while start - unit >= 0 and text[start - unit:start] == text[n - unit:]:
            start -= unit
        run = n - start
        if run >= min_run and run // unit >= min_repeats:
            return start + unit
    return None


class StopScanner:
    """Decoded text in, streamable text out: the answer's leading space is dropped, text that
    could be the start of a stop string is held back, and the text is cut at the first stop.

    Shared by the serve backends so they stream, stop and strip alike.
    """

    def __init__(self, stops: list[str], *, loop_guard: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.loop_guard = loop_guard   # end the answer where it starts looping (loop_start)
        self.looped = False
        self.seen = ""                 # the text streamed so far (kept for the loop guard)
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
        if self._cut() or self._loop():
            return ""
        emit = len(self.pending) - held_back(self.pending, self.stops, self.hold)
        if emit <= 0:
            return ""
        out, self.pending = self.pending[:emit], self.pending[emit:]
        if self.loop_guard:
            self.seen = (self.seen + out)[-LOOP_WINDOW:]
        return out

    def finish(self, tail: str = "") -> str:
        """After the last token: what is left (``tail`` = the decoder's flush), cut at a stop."""
        if not self.stopped:  # bytes after a stop string are not part of the answer
            self.pending += tail
        if not self.started:
            self.pending = self.pending.lstrip(" ")
        if not self._cut() and not self.looped:
            self._loop()
        out, self.pending = self.pending, ""
        return out

    def _loop(self) -> bool:
        """With the loop guard: cut ``pending`` where the answer started looping (what was
        streamed already stays)."""
        if not self.loop_guard or self.looped:
            return False
        text = self.seen + self.pending
        start = loop_start(text)
        if start is None:
            return False
        self.pending = self.pending[:max(0, start - len(self.seen))]
        self.stopped = self.looped = True
        return True

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
