"""Document chunking scales linearly: one long paragraph of 1 MB and of 8 MB.

Issue 19 measured 0.04, 0.23, 1.05 and 4.4 s for 1, 2, 4 and 8 MB of one paragraph: the
long-sentence splitter re-sliced the rest of the text after every piece (O(n^2 / limit)).
The figure is the ratio of the 8 MB time to the 1 MB time in the same run (so the machine's
speed cancels out): ~8 when linear, ~64 when quadratic. Two shapes: one sentence with no
sentence end (the hard split at spaces) and ordinary sentences (packed at sentence ends).
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import median, target, timed
from milton.memory.documents import chunk_text

CHUNK_CHARS = 1200
TARGET_RATIO = 16.0  # linear is 8; room for cache effects and a busy machine; quadratic is 64
SHAPES = {"one sentence": "lorem ipsum dolor ", "sentences": "Lorem ipsum dolor sit amet. "}


def _text(unit: str, megabytes: int) -> str:
    size = megabytes << 20
    return (unit * (size // len(unit) + 1))[:size]


def run(quick: bool) -> dict[str, Any]:
    repeats = 1 if quick else 3
    figures: dict[str, Any] = {}
    targets = []
    for shape, unit in SHAPES.items():
        seconds = {}
        for mb in (1, 8):
            text = _text(unit, mb)
            seconds[mb] = median([timed(lambda: chunk_text(text, CHUNK_CHARS))[0]
                                  for _ in range(repeats)])
        ratio = seconds[8] / seconds[1] if seconds[1] > 0 else None
        figures[shape] = {"seconds_1mb": round(seconds[1], 4), "seconds_8mb": round(seconds[8], 4),
                          "ratio_8mb_to_1mb": round(ratio, 2) if ratio else None}
        targets.append(target(f"{shape}: 8 MB / 1 MB time", ratio, "<=", TARGET_RATIO, "x"))
    return {"figures": figures, "targets": targets,
            "params": {"chunk_chars": CHUNK_CHARS, "repeats": repeats, "sizes_mb": [1, 8]}}
