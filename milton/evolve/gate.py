"""Which evolved GGUF, if any, should replace the model serve runs? Only one worth it and no worse.

Quality is the serving model's perplexity over the candidate's (1.0 = as good, 0.9 = its
perplexity is 11% higher), on the held-out set and on the general regression set, both measured
in llama.cpp on the same tokens. The candidate must keep ``evolve.quality_threshold`` of both,
and must also be smaller on disk or faster: a model that is neither is not an evolution.
"""

from __future__ import annotations

import math
from typing import Any

from milton.core.config import EvolveConfig
from milton.train.gate import Decision

#: Faster means at least this much more tokens/s (timings on a busy machine jitter).
SPEED_MARGIN = 1.05
#: Smaller means at least this much less on disk.
SIZE_MARGIN = 0.99


def quality(serving_ppl: Any, candidate_ppl: Any) -> float | None:
    """serving / candidate perplexity; None when either is missing or not finite."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
               for v in (serving_ppl, candidate_ppl)):
        return None
    return serving_ppl / candidate_ppl


def decide(candidate: dict[str, Any], serving: dict[str, Any], cfg: EvolveConfig) -> Decision:
    threshold = cfg.quality_threshold
    checks: dict[str, Any] = {"threshold": threshold}
    reasons: list[str] = []
    for key, label in (("eval_ppl", "held-out"), ("regression_ppl", "regression")):
        q = quality(serving.get(key), candidate.get(key))
        checks[f"{key.split('_')[0]}_quality"] = q
        if q is None:
            reasons.append(f"{label} perplexity could not be measured")
        elif q < threshold:
            reasons.append(f"{label} perplexity {candidate[key]:.3g} vs serving {serving[key]:.3g} "
                           f"keeps {q:.0%} of the quality (threshold {threshold:.0%})")
    if serving.get("recall") is not None:  # facts the user taught, asked as serve asks them
        recall = candidate.get("recall")
        checks.update(recall=recall, serving_recall=serving["recall"])
        if recall is None:
            reasons.append("recall of taught facts could not be measured")
        elif recall < serving["recall"] - cfg.recall_margin:
            reasons.append(f"answers {recall:.0%} of the taught-fact probes vs serving "
                           f"{serving['recall']:.0%} (margin {cfg.recall_margin:.0%})")
    size_ratio = candidate["size_mb"] / serving["size_mb"] if serving.get("size_mb") else None
    speed_ratio = (candidate["tokens_per_s"] / serving["tokens_per_s"]
                   if serving.get("tokens_per_s") else None)
    checks.update(size_ratio=size_ratio, speed_ratio=speed_ratio)
    smaller = size_ratio is not None and size_ratio <= SIZE_MARGIN
    faster = speed_ratio is not None and speed_ratio >= SPEED_MARGIN
    if not (smaller or faster):
        reasons.append(f"neither smaller ({size_ratio or 0:.2f}x the size) nor faster "
                       f"({speed_ratio or 0:.2f}x the tokens/s) than the serving model")
    if reasons:
        return Decision(False, "; ".join(reasons), checks)
    gains = []
    if smaller:
        gains.append(f"{1 / size_ratio:.2f}x smaller")
    if faster:
        gains.append(f"{speed_ratio:.2f}x faster")
    return Decision(True, f"{' and '.join(gains)}, keeping {checks['eval_quality']:.0%} of held-out "
                    f"and {checks['regression_quality']:.0%} of regression quality", checks)


#: Candidates whose tokens/s are within this factor of the fastest are "as fast" (timings jitter);
#: among those the smaller wins.
TIE_SPEED = SPEED_MARGIN


def label(candidate: dict[str, Any]) -> str:
    """``stage format``, e.g. ``merge q8_0``: how the report names a candidate."""
    return f"{candidate.get('stage', '?')} {candidate.get('format', '?')}"


def choose(candidates: list[dict[str, Any]], serving: dict[str, Any],
           cfg: EvolveConfig) -> tuple[Decision, dict[str, Any] | None, list[dict[str, Any]]]:
    """The candidate to promote among every measured one, by the rule written in RULE.

    Returns (decision, winner or None, one verdict per candidate: ``{"candidate", "qualifies",
    "won", "why"}``). A candidate qualifies when :func:`decide` promotes it against the serving
    model; the winner is the fastest qualifying one, where candidates within ``TIE_SPEED`` of the
    fastest count as equally fast and the smallest of them wins (then the better held-out
    quality). Nothing qualifying is a rejection whose reason lists why each candidate failed.
    """
    decided = [(c, decide(c, serving, cfg)) for c in candidates]
    qualifying = [(c, d) for c, d in decided if d.promote]
    verdicts: list[dict[str, Any]] = []
    if not qualifying:
        for c, d in decided:
            verdicts.append({"candidate": label(c), "qualifies": False, "won": False, "why": d.reason})
        reason = "no candidate qualifies: " + "; ".join(
            f"{label(c)}: {d.reason}" for c, d in decided) if decided else "no candidate was measured"
        return Decision(False, reason, {"threshold": cfg.quality_threshold, "rule": RULE}), None, verdicts
    fastest = max(float(c["tokens_per_s"]) for c, _ in qualifying)
    band = [(c, d) for c, d in qualifying if float(c["tokens_per_s"]) * TIE_SPEED >= fastest]
    winner, decision = min(band, key=lambda cd: (cd[0]["size_mb"], -(cd[1].checks.get("eval_quality") or 0)))
    for c, d in decided:
        if c is winner:
            why = f"won: {d.reason}"
        elif not d.promote:
            why = d.reason
        elif float(c["tokens_per_s"]) * TIE_SPEED < fastest:
            why = (f"qualifies but slower: {c['tokens_per_s']:.1f} tokens/s vs the winner's "
                   f"{winner['tokens_per_s']:.1f}")
        elif c["size_mb"] > winner["size_mb"]:
            why = f"qualifies and as fast, but larger: {c['size_mb']:.1f} MB vs {winner['size_mb']:.1f} MB"
        else:
            why = "qualifies, as fast and as small; the winner keeps more held-out quality"
        verdicts.append({"candidate": label(c), "qualifies": d.promote, "won": c is winner, "why": why})
    checks = {**decision.checks, "winner": label(winner), "rule": RULE}
    return Decision(True, f"{label(winner)}: {decision.reason}", checks), winner, verdicts


RULE = (f"a candidate qualifies when it keeps quality_threshold of the serving model's held-out and "
        f"regression quality (serving ppl / candidate ppl), answers the probes of the facts the user "
        f"taught within recall_margin of the serving model, and is at least {1 / SIZE_MARGIN - 1:.0%} "
        f"smaller or {SPEED_MARGIN - 1:.0%} faster (decode tokens/s) than the serving model; "
        f"the fastest qualifying candidate wins, those within {TIE_SPEED - 1:.0%} of the fastest "
        f"count as equally fast and the smallest of them wins")
