"""Which assistant answers may become training targets.

A logged answer is the model's own output: training on it teaches the model whatever it said,
nonsense included. So an answer is a target only when nothing marks it bad, and with a base
model (whose answers are often wrong or degenerate) only when the user confirmed it:

* **Feedback.** ``POST /v1/feedback`` (or ``/good`` / ``/bad`` in ``milton chat``) stores a
  rating per completion id in ``feedback`` (append only; the latest rating counts). ``bad``
  always excludes the answer; ``good`` includes it under every policy but ``none``.
* **Corrections.** When the user's next message corrects the answer ("no, it's X", "actually,
  X", "that's wrong, X"), the answer is dropped and the user's correction becomes the target
  for the same prompt ("no, it's Paris" -> "It's Paris."). A bare "no, that's wrong" only drops it.
* **Degenerate text** (empty, repetition loops, mostly digits or markup) is never a target,
  whatever the feedback: :func:`degenerate` says why.

``train.assistant_targets`` picks the policy: ``filtered`` (every answer not marked bad: right
for an instruction-tuned model), ``confirmed`` (only answers rated good, plus corrections:
right for a base model), ``none`` (no assistant answers, only corrections), or ``auto``:
``filtered`` when ``model.base``'s file or folder name marks an instruction-tuned model
(instruct, chat, ``-it``), else ``confirmed`` (the packaged Gemma 3 270M is a base model).
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.config import Settings

POLICIES = ("auto", "filtered", "confirmed", "none")
RATINGS = ("good", "bad")

#: A model name that says it was instruction- or chat-tuned (Gemma "-it", Llama/Qwen "Instruct").
_INSTRUCT_NAME = re.compile(r"(?i)(instruct|chat|(?:^|[-_.])it(?:$|[-_.]))")
#: A model name that says it is a pre-trained base model (Qwen "-Base", Gemma "-pt").
_BASE_NAME = re.compile(r"(?i)((?:^|[-_.])(?:base|pt)(?:$|[-_.]))")


# -- degenerate text ---------------------------------------------------------------------------
_MARKUP = re.compile(r"<[^>\n]{0,80}>|[<>{}\[\]|#*_=~`\\/^]")
_WORD = re.compile(r"\w+", re.UNICODE)


def degenerate(text: str) -> str | None:
    """Why ``text`` must not be a training target (None: it may be).

    Cheap, model-free rules that catch what small models produce when they go wrong:
    nothing at all; one token or phrase looped ("100.000.000.000...", "the the the"); a reply
    that is mostly digits or mostly markup/punctuation rather than words.
    """
    stripped = text.strip()
    if not stripped:
        return "empty"
    compact = "".join(stripped.split())
    if len(compact) >= 12:
        digits = sum(c.isdigit() for c in compact)
        if digits / len(compact) > 0.5:
            return "mostly digits"
        markup = sum(len(m.group()) for m in _MARKUP.finditer(compact))
        letters = sum(c.isalpha() for c in compact)
        if markup / len(compact) > 0.5 or letters / len(compact) < 0.3:
            return "mostly markup or symbols"
    if _looping(stripped):
        return "repetition loop"
    return None


def _looping(text: str) -> bool:
    """A short unit repeated: characters or words that compress far better than language does,
    or one word n-gram that covers most of a longer reply."""
    if len(text) >= 40:
        raw = text.encode("utf-8")
        if len(zlib.compress(raw, 9)) / len(raw) < 0.25:  # prose is ~0.5+; loops ~0.1
            return True
    if re.search(r"(.{1,2})\1{7,}|(.{3,24}?)\2{3,}", text, re.S):  # a short unit 4-8+ times in a row
        return True
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 6:
        for n in (1, 2, 3, 4):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            top = grams.most_common(1)[0][1]
            if top >= 3 and top * n / len(words) > 0.6:
                return True
    return False


# -- corrections -------------------------------------------------------------------------------
_NOT_A_FIX = r"(?!\s*(?:thanks|thank\s+you|problem|worries|need|matter|idea)\b)"
_REQUEST = r"(?!\s*(?:can|could|would|will|please|let'?s|also|i'?d|i\s+would|i\s+want|i\s+need|never\s*mind|forget|how|what|why|when|where|who|which)\b)"
_CORRECTION = re.compile(
    r"""^\s*(?:
        (?:no|nope|nah)(?:\s*[,.;:!-]+\s*""" + _NOT_A_FIX + r"""|\s+(?=(?:it|it'?s|its|that|that'?s|the|my|he|she|they|we|you|i|his|her|their|our|there|in|on|at)\b)|\s*$)
            (?:(?:that'?s|that\ is|it'?s|it\ is)\s+(?:wrong|not\ right|incorrect|not\ correct)\b[\s,.;:!-]*)?
      | (?:that'?s|that\ is|this\ is|you'?re|you\ are)\s+(?:wrong|not\ right|incorrect|not\ correct|mistaken)\b[\s,.;:!-]*
      | (?:wrong|incorrect|not\ quite|not\ really)\b[\s,.;:!-]*
      | actually\b[\s,.;:!-]*""" + _REQUEST + r"""
      | correction\s*:\s*
    )(?P<rest>.*)$""", re.I | re.S | re.X)
_FILLER = re.compile(r"^(?:(?:no|sorry|that'?s\s+(?:wrong|not\s+right|incorrect))\b[\s,.;:!-]*)*$", re.I)


def correction(reply: str) -> tuple[bool, str | None]:
    """Does the user's ``reply`` (their next message) correct the answer before it, and with what?

    (False, None): not a correction. (True, text): the corrected answer in the user's words.
    (True, None): it says the answer was wrong without giving the right one.
    """
    m = _CORRECTION.match(reply)
    if m is None:
        return False, None
    rest = m.group("rest").strip()
    if not rest or _FILLER.fullmatch(rest) or rest.endswith("?"):
        # "No?" or "actually, what about X?" asks something new: only a statement corrects.
        return (not rest.endswith("?")), None
    return True, rest[0].upper() + rest[1:]


# -- feedback ----------------------------------------------------------------------------------
def record_feedback(db: sqlite_utils.Database, completion_id: str, rating: str, source: str,
                    ts: float, note: str | None = None) -> int:
    """Store one rating (append only: a later one for the same completion wins)."""
    if rating not in RATINGS:
        raise ValueError(f"rating must be one of {', '.join(RATINGS)}, not {rating!r}")
    with db.atomic():
        cursor = db.conn.execute(
            "insert into feedback (completion_id, rating, source, note, ts) values (?, ?, ?, ?, ?)",
            (completion_id, rating, source, note, ts))
    return int(cursor.lastrowid or 0)


def ratings(db: sqlite_utils.Database, completion_ids: Sequence[str]) -> dict[str, str]:
    """completion id -> its latest rating, for the ids that have one."""
    out: dict[str, str] = {}
    ids = list(dict.fromkeys(completion_ids))
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        for cid, rating in db.execute(
                "select completion_id, rating from feedback where id in (select max(id) from feedback "
                f"where completion_id in ({','.join('?' * len(part))}) group by completion_id)", part):
            out[cid] = rating
    return out


def completion_logged(db: sqlite_utils.Database, completion_id: str) -> bool:
    """Whether an assistant message of that completion is in the session log yet."""
    return db.execute("select 1 from messages where role = 'assistant' and "
                      "json_extract(metadata, '$.request_id') = ? limit 1",
                      [completion_id]).fetchone() is not None


# -- the policy ----------------------------------------------------------------------------------
def resolve_policy(settings: Settings) -> str:
    """``train.assistant_targets`` with ``auto`` decided from ``model.base``: ``confirmed`` for
    the packaged Gemma 3 270M (a base model) and names that mark a base model (``base``,
    ``-pt``), ``filtered`` for the rest (a model the user chose to chat with, usually tuned)."""
    policy = settings.train.assistant_targets
    if policy != "auto":
        return policy
    base = settings.model.base.strip()
    if not base:
        return "confirmed"
    name = Path(base).name
    if _INSTRUCT_NAME.search(name):
        return "filtered"
    return "confirmed" if _BASE_NAME.search(name) else "filtered"


@dataclass
class TargetReport:
    """Counts of what happened to assistant answers (never their text)."""

    kept: int = 0
    corrected: int = 0  # answers replaced by the user's correction
    rejected_by_user: int = 0  # a correction without the right answer
    feedback_bad: int = 0
    feedback_good: int = 0
    degenerate: int = 0
    unconfirmed: int = 0  # left out by the policy (no good rating)
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: TargetReport) -> None:
        for name in ("kept", "corrected", "rejected_by_user", "feedback_bad", "feedback_good",
                     "degenerate", "unconfirmed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, n in other.reasons.items():
            self.reasons[key] = self.reasons.get(key, 0) + n


Row = tuple[int, str, str, "str | None"]  # (message id, role, content, metadata)
Exchange = tuple[str, str, list[int]]  # (prompt, response, message ids)


def request_id(metadata: str | None) -> str | None:
    """The completion id serve put in a message's metadata (None: not served, or unreadable)."""
    try:
        meta = json.loads(metadata) if metadata else None
    except ValueError:
        return None
    rid = meta.get("request_id") if isinstance(meta, dict) else None
    return rid if isinstance(rid, str) else None


def select_targets(pairs: Sequence[Exchange], rows: Sequence[Row], policy: str,
                   rated: dict[str, str]) -> tuple[list[tuple[str, str, list[int], bool]], TargetReport]:
    """The exchanges of one session whose answers may be trained on, as (prompt, target, message
    ids, corrected); ``rows`` are the session's messages in order, ``rated`` its feedback."""
    report = TargetReport()
    position = {row[0]: i for i, row in enumerate(rows)}
    out: list[tuple[str, str, list[int], bool]] = []
    for prompt, response, ids in pairs:
        replies = [rows[position[i]] for i in ids if rows[position[i]][1] == "assistant"]
        verdicts = {rated[r] for r in (request_id(row[3]) for row in replies) if r in rated}
        # The user's next message, if it comes right after this answer.
        after = position[ids[-1]] + 1
        while after < len(rows) and rows[after][1] == "system":
            after += 1
        is_fix, fixed = (correction(rows[after][2]) if after < len(rows) and rows[after][1] == "user"
                         else (False, None))
        if is_fix:
            if fixed is not None and degenerate(fixed) is None:
                report.corrected += 1
                out.append((prompt, fixed, ids + [rows[after][0]], True))
            else:
                report.rejected_by_user += 1
            continue
        if "bad" in verdicts:
            report.feedback_bad += 1
            continue
        why = degenerate(response)
        if why is not None:
            report.degenerate += 1
            report.reasons[why] = report.reasons.get(why, 0) + 1
            continue
        if "good" in verdicts and policy != "none":
            report.feedback_good += 1
        elif policy != "filtered":
            report.unconfirmed += 1
            continue
        report.kept += 1
        out.append((prompt, response, ids, False))
    return out, report


def report_metrics(report: TargetReport) -> dict[str, Any]:
    return {"targets_kept": report.kept, "targets_corrected": report.corrected,
            "targets_rejected_by_user": report.rejected_by_user,
            "targets_feedback_bad": report.feedback_bad, "targets_feedback_good": report.feedback_good,
            "targets_degenerate": report.degenerate, "targets_unconfirmed": report.unconfirmed}
