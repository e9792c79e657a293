"""Should the evolved GGUF replace the model serve runs? Only if it is worth it and no worse.

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
