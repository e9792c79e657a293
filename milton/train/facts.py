"""What the user taught, as facts: parsed from their own words, phrased many ways for training,
with held-out paraphrases for the recall probes.

A *fact* is a statement the user made about something of theirs ("my cat is named Quillon",
"my sister moved to Oslo", a ``/remember`` or ``milton memory add`` note of that shape). It is
parsed into a subject ("cat"), a relation (name / place / generic) and a value ("Quillon"),
always copied from the user's text: nothing the assistant said ever becomes a fact's value.

Each fact becomes several training items, question forms and statement forms from
:data:`TEMPLATES` (``train.fact_phrasings`` of them), while :func:`probe_questions` picks, per
fact, question wordings that are *not* among its training items: a probe is answered correctly
only when the answer contains the value (:func:`recalled`). Which wordings are held out rotates
with the fact (a hash), so every wording is trained with some facts and probed with others.

A restated fact (same subject and relation, newer) replaces the older one: :func:`latest`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: relation -> question templates; ``{s}`` is the subject ("cat"), answers are statements.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "name": (
        "What is my {s}'s name?", "What is my {s} called?", "What's the name of my {s}?",
        "What did I name my {s}?", "What do I call my {s}?", "Do you remember my {s}'s name?",
        "Tell me the name of my {s}.", "How is my {s} named?", "Remind me what my {s} is called.",
        "My {s} is called what?",
    ),
    "place": (
        "Where does my {s} live?", "Where is my {s} now?", "Which city is my {s} in?",
        "Where did my {s} move to?", "Remind me where my {s} lives.", "Do you know where my {s} is?",
        "In which place does my {s} live?", "Tell me where my {s} lives.",
        "Where can I find my {s}?", "My {s} lives where?",
    ),
    "is": (
        "What is my {s}?", "What's my {s}?", "Tell me my {s}.", "Do you remember my {s}?",
        "Remind me of my {s}.", "Which is my {s}?", "What did I say my {s} is?",
        "Can you tell me what my {s} is?", "I forgot my {s}. What is it?", "My {s} is what?",
    ),
}
#: relation -> how the answer states the fact (second person).
ANSWERS = {
    "name": "Your {s} is named {v}.",
    "place": "Your {s} {verb} {v}.",
    "is": "Your {s} {verb} {v}.",
}
#: statement forms trained as text: the fact itself, in the user's voice and in a note's.
STATEMENTS = ("My {s} {verb} {v}.", "Note about the user: their {s} {verb} {v}.")

_PREFIX = re.compile(
    r"^\s*(?:(?:please|pls|ok|okay|hey|also|and|so)[\s,]+)*(?:(?:can you |could you )?"
    r"(?:remember|note|keep in mind|don't forget|do not forget|fyi|for the record)"
    r"(?: this| that)?\s*[:,-]?\s*(?:that\s+)?)?", re.IGNORECASE)
_NAME = re.compile(r"^my (?P<s>[a-z][\w' -]{0,40}?)(?:'s name is| is named| is called| are named"
                   r"| are called| goes by| name is)\s+(?P<v>.+)$", re.IGNORECASE)
_PLACE = re.compile(r"^my (?P<s>[a-z][\w' -]{0,40}?) (?P<verb>lives in|moved to|now lives in|"
                    r"is located in|is based in|lives at|is in|moved back to)\s+(?P<v>.+)$",
                    re.IGNORECASE)
_IS = re.compile(r"^my (?P<s>[a-z][\w' -]{0,40}?) (?P<verb>is|are|was|starts at|is at|"
                 r"is on|uses|runs on|costs)\s+(?P<v>.+)$", re.IGNORECASE)
_ABBREV = r"(?<!\bDr)(?<!\bMr)(?<!\bMs)(?<!\bSt)(?<!\bMrs)(?<!\bProf)"
_SENTENCE = re.compile(r"(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bSt\.)(?<!\bMrs\.)(?<!\bProf\.)"
                       r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Fact:
    """A fact the user stated: ``my {subject} {verb} {value}``."""

    subject: str
    relation: str  # 'name' | 'place' | 'is'
    verb: str
    value: str
    source: str = ""

    @property
    def key(self) -> str:
        """Same key = same fact slot: a newer statement replaces the older one."""
        return f"{self.relation}:{self.subject.lower()}"

    @property
    def statement(self) -> str:
        return f"My {self.subject} {self.verb} {self.value}."

    def answer(self) -> str:
        return ANSWERS[self.relation].format(s=self.subject, v=self.value, verb=self.verb)


def _clean_value(value: str) -> str:
    value = value.strip().strip("\"'")
    value = re.split(r"\s+(?:and|but|so|because)\s+(?:i|you|we|it|please)\b|[,;!?]|" + _ABBREV + r"\.(?:\s|$)",
                     value, maxsplit=1)[0]
    return value.strip().rstrip(".").strip()


def parse_fact(text: str, source: str = "") -> Fact | None:
    """A :class:`Fact` from one sentence of the user's, or None when it is not one."""
    sentence = _PREFIX.sub("", text.strip(), count=1).strip()
    if "?" in sentence or len(sentence) > 160:
        return None
    for relation, pattern in (("name", _NAME), ("place", _PLACE), ("is", _IS)):
        m = pattern.match(sentence)
        if m is None:
            continue
        subject = " ".join(m.group("s").split()).lower()
        value = _clean_value(m.group("v"))
        if not value or len(value.split()) > 8 or not subject:
            return None
        verb = "is named" if relation == "name" else m.group("verb").lower()
        if relation == "place" and verb in ("moved to", "now lives in", "moved back to"):
            verb = "lives in"  # where the subject is *now*: the question forms ask that
        return Fact(subject, relation, verb, value, source)
    return None


def facts_in(text: str, source: str = "") -> list[Fact]:
    """Every fact stated in ``text`` (sentence by sentence)."""
    found = []
    for sentence in _SENTENCE.split(text):
        fact = parse_fact(sentence, source)
        if fact is not None:
            found.append(fact)
    return found


def latest(facts: Iterable[Fact]) -> list[Fact]:
    """One fact per :attr:`Fact.key`, the last stated winning, in first-stated order."""
    out: dict[str, Fact] = {}
    for fact in facts:
        out.pop(fact.key, None)
        out[fact.key] = fact
    return list(out.values())


def _rank(fact: Fact, template: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{fact.key}\0{template}".encode()).hexdigest()


def split_questions(fact: Fact, n_probe: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training questions, held-out probe questions) for ``fact``: disjoint wordings."""
    templates = sorted(QUESTIONS[fact.relation], key=lambda t: _rank(fact, t, seed))
    n_probe = max(0, min(n_probe, len(templates) - 1))
    probe, train = templates[:n_probe], templates[n_probe:]
    return [t.format(s=fact.subject) for t in train], [t.format(s=fact.subject) for t in probe]


def probe_questions(fact: Fact, n_probe: int = 2, seed: int = 0) -> list[str]:
    return split_questions(fact, n_probe, seed)[1]


def training_items(fact: Fact, n_questions: int, n_probe: int = 2,
                   seed: int = 0) -> list[dict[str, str]]:
    """``fact`` in ``n_questions`` question forms (pairs) plus its statement forms (texts)."""
    questions = split_questions(fact, n_probe, seed)[0][:n_questions]
    answer = fact.answer()
    verb = fact.verb
    items = [{"kind": "pair", "prompt": q, "response": answer, "source": fact.source}
             for q in questions]
    items += [{"kind": "text", "prompt": None,
               "response": s.format(s=fact.subject, verb=verb, v=fact.value), "source": fact.source}
              for s in STATEMENTS]
    return items


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def recalled(answer: str, fact: Fact) -> bool:
    """The answer contains the fact's value (case, punctuation and spacing ignored)."""
    value = _norm(fact.value)
    return bool(value) and f" {value} " in f" {_norm(answer)} "
