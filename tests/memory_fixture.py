"""A labelled retrieval fixture written for the memory tests.

Twelve conversations carry facts; about two hundred distractor exchanges, generated from
templates on the same subjects (other error codes, ports, hosts, pets, tools), make the
haystack. Each question names a needle: a phrase only the right exchange contains.

Questions come in three kinds, so hybrid search has something to prove:
- paraphrases that share no content word with the answer (vectors find them, keywords can't),
- exact identifiers buried among look-alikes (keywords find them, vectors blur them),
- plain questions both can answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CONVERSATIONS: list[list[tuple[str, str]]] = [
    [
        ("My dog is a beagle named Biscuit and she is terrified of thunderstorms.",
         "Poor Biscuit! A snug crate with a blanket over it often calms beagles during storms."),
        ("She also hates the vacuum cleaner.", "Try running it while she is out on a walk."),
    ],
    [
        ("The nightly import fails with error ERR-4471 when the CSV has a BOM.",
         "ERR-4471 is the header validation error; strip the BOM with encoding='utf-8-sig'."),
    ],
    [
        ("Our staging Postgres listens on port 5433, not the default.",
         "Then set PGPORT=5433 or pass -p 5433 to psql."),
    ],
    [
        ("I'm allergic to penicillin, keep that in mind if I ask about medicine.",
         "Noted: penicillin allergy. I'll flag antibiotics in that family."),
    ],
    [
        ("The build server is called zephyr-07 and it runs the GPU jobs.",
         "Good to know: GPU jobs go to zephyr-07."),
    ],
    [
        ("We moved house last spring; we live in Ghent now, near the Korenmarkt.",
         "Ghent is lovely; the Korenmarkt is right in the historic centre."),
    ],
    [
        ("Ticket JIRA-2291 tracks the memory leak in the uploader.",
         "I'll refer to JIRA-2291 for the uploader leak."),
    ],
    [
        ("For my thesis I'm measuring how soil moisture affects tomato yield in greenhouses.",
         "Consider logging moisture hourly; yield effects lag by weeks."),
    ],
    [
        ("My daughter Lena turns seven on the 14th of March.",
         "A seventh birthday! Want some party ideas closer to the date?"),
    ],
    [
        ("The Wi-Fi password for the cabin is bluefjord-88.",
         "Saved: the cabin Wi-Fi password is bluefjord-88."),
    ],
    [
        ("I bike to work every day, about 12 kilometres each way along the canal.",
         "That's a healthy start to the day; 24 km daily adds up fast."),
    ],
    [
        ("The backup script rotates archives with keep-weekly set to 6.",
         "So six weekly archives are retained before the oldest is removed."),
    ],
]

QUESTIONS: list[tuple[str, str, str]] = [
    # (kind, question, needle)
    ("paraphrase", "What is the name of my pet?", "beagle named Biscuit"),
    ("paraphrase", "Which antibiotic am I not able to take?", "allergic to penicillin"),
    ("paraphrase", "Which city do I live in these days?", "we live in Ghent"),
    ("paraphrase", "What is my research project about?", "soil moisture affects tomato"),
    ("paraphrase", "When is my kid's birthday?", "Lena turns seven"),
    ("paraphrase", "How do I commute?", "bike to work every day"),
    ("paraphrase", "How does my animal react to bad weather?", "terrified of thunderstorms"),
    ("identifier", "ERR-4471", "ERR-4471 when the CSV"),
    ("identifier", "JIRA-2291", "Ticket JIRA-2291"),
    ("identifier", "zephyr-07", "called zephyr-07"),
    ("identifier", "bluefjord-88", "password for the cabin is bluefjord-88"),
    ("identifier", "port 5433", "listens on port 5433"),
    ("identifier", "keep-weekly 6", "keep-weekly set to 6"),
    ("both", "What error does the nightly CSV import fail with?", "ERR-4471 when the CSV"),
    ("both", "Which server runs the GPU jobs?", "called zephyr-07"),
    ("both", "What is the wifi password at the cabin?", "password for the cabin is bluefjord-88"),
    ("both", "Which ticket tracks the uploader memory leak?", "Ticket JIRA-2291"),
    ("both", "What port does staging Postgres use?", "listens on port 5433"),
]

_SUBJECTS = {
    "error": ("The {svc} job failed with error ERR-{n} after the {thing} step.",
              "ERR-{n} usually means the {thing} step timed out; retry with a longer timeout."),
    "port": ("Our {svc} service listens on port {n} in production.",
             "Make sure the firewall allows port {n} for {svc}."),
    "host": ("The {svc} runner is called {word}-{k:02d} and handles {thing} jobs.",
             "OK, {thing} jobs are scheduled on {word}-{k:02d}."),
    "ticket": ("Ticket JIRA-{n} is about the {thing} bug in {svc}.",
               "I'll link JIRA-{n} whenever the {svc} {thing} bug comes up."),
    "pet": ("My neighbour's {animal} keeps digging up the {thing} in the garden.",
            "A low fence around the {thing} usually stops a curious {animal}."),
    "password": ("The guest network password at the {place} is {word}-{k}.",
                 "Saved the {place} guest password."),
    "backup": ("The {svc} backup keeps {k} daily archives.",
               "So {k} daily archives of {svc} are kept."),
    "commute": ("My colleague drives {k} kilometres to the {place} office.",
                "That's a long drive to the {place} office."),
    "weather": ("It rained all weekend at the {place}, the {thing} got flooded.",
                "Hope the {thing} dries out soon."),
}
_SVC = ["billing", "search", "uploader", "reporting", "auth", "ingest", "mailer", "metrics"]
_THING = ["validation", "export", "cache", "thumbnail", "schema", "login", "roses", "tulips"]
_WORD = ["boreas", "notus", "eurus", "aeolus", "skiron", "kaikias", "apeliotes", "lips"]
_ANIMAL = ["terrier", "cat", "labrador", "rabbit", "spaniel", "hamster"]
_PLACE = ["cabin", "lake house", "studio", "office", "farm", "cottage"]


def distractors(n: int = 200, seed: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    subjects = list(_SUBJECTS.values())
    out: list[tuple[str, str]] = []
    while len(out) < n:
        user, assistant = subjects[len(out) % len(subjects)]
        values = {"svc": rng.choice(_SVC), "thing": rng.choice(_THING), "word": rng.choice(_WORD),
                  "animal": rng.choice(_ANIMAL), "place": rng.choice(_PLACE),
                  "n": rng.randint(1000, 9999), "k": rng.randint(2, 99)}
        pair = (user.format(**values), assistant.format(**values))
        if pair not in out:
            out.append(pair)
    return out


def write_jsonl(path: Path, start_ts: float, step_s: float = 600.0, distractor_count: int = 200) -> Path:
    """The fixture as OpenAI chat JSONL: the fact conversations interleaved with distractor
    conversations of three exchanges each, timestamped from ``start_ts``."""
    convs = [list(c) for c in CONVERSATIONS]
    extra = distractors(distractor_count)
    filler = [extra[i:i + 3] for i in range(0, len(extra), 3)]
    ordered: list[list[tuple[str, str]]] = []
    for i in range(max(len(convs), len(filler))):
        if i < len(filler):
            ordered.append(filler[i])
        if i < len(convs):
            ordered.append(convs[i])
    ts = start_ts
    with path.open("w", encoding="utf-8") as fh:
        for conv in ordered:
            messages = []
            for user, assistant in conv:
                messages.append({"role": "user", "content": user, "timestamp": ts})
                messages.append({"role": "assistant", "content": assistant, "timestamp": ts + 5})
                ts += step_s
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path
