"""The evaluation gate: a candidate adapter is promoted only when it measurably learned what
the user taught and kept what it knew.

Everything is checked against what is serving now (the current adapter, or the bare base model
when there is none), measured on this run's data in this run:

* **new-item recall** (when this run taught facts): the share of held-out paraphrase probes
  of this run's facts answered with the fact's value must *rise* above the serving model's by
  more than ``train.min_recall_gain``. Perplexity alone says "learned" when only the answer
  style was (:mod:`milton.train.recall`); without facts, held-out perplexity must improve by
  ``train.min_improvement`` instead, as before;
* **retention recall** (when earlier promoted runs taught facts): recall on the retention set
  may be below the serving model's by at most ``train.retention_margin`` (an absolute share):
  a night that makes the model forget or contradict what it was taught is rejected;
* **regression**: regression-set perplexity (older held-out data + the built-in general set)
  must not be worse by more than ``train.regression_margin`` (a share).

Held-out perplexity is reported either way, as a diagnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from milton.core.config import TrainConfig


@dataclass
class Decision:
    promote: bool
    reason: str
    checks: dict[str, Any] = field(default_factory=dict)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def regression_reference(serving: dict[str, Any], base: dict[str, Any] | None = None, *,
                         serving_name: str = "current") -> tuple[Any, str]:
    """(regression perplexity a candidate is held against, whose): the better of the serving
    model's and the bare ``base``'s. Were it only the serving adapter's, each night could drift
    ``train.regression_margin`` further from what the base knew (5% a night is 4x in a month)."""
    s_reg, b_reg = serving.get("regression_ppl"), (base or {}).get("regression_ppl")
    if _finite(b_reg) and _finite(s_reg) and b_reg < s_reg:
        return b_reg, "base"
    return s_reg, serving_name


def decide(candidate: dict[str, Any], serving: dict[str, Any], cfg: TrainConfig,
           *, serving_name: str = "current", base: dict[str, Any] | None = None) -> Decision:
    """Compare ``candidate`` with ``serving`` metrics (``eval_ppl``, ``regression_ppl`` and,
    when facts were probed, ``recall_new`` / ``recall_retention``); regression against
    :func:`regression_reference`."""
    c_eval, s_eval = candidate.get("eval_ppl"), serving.get("eval_ppl")
    c_reg = candidate.get("regression_ppl")
    s_reg, reg_name = regression_reference(serving, base, serving_name=serving_name)
    c_new, s_new = candidate.get("recall_new"), serving.get("recall_new")
    c_ret, s_ret = candidate.get("recall_retention"), serving.get("recall_retention")
    by_recall = _finite(c_new) and _finite(s_new)
    if not (_finite(c_eval) or by_recall) or not _finite(c_reg):
        return Decision(False, f"candidate perplexity is not finite (eval {c_eval}, "
                               f"regression {c_reg}): training diverged")
    if not _finite(s_reg) or not (by_recall or _finite(s_eval)):
        return Decision(False, f"{serving_name} perplexity could not be measured")
    limit = s_reg * (1 + cfg.regression_margin)
    checks: dict[str, Any] = {
        "eval_ppl": {"candidate": c_eval, serving_name: s_eval,
                     **({"diagnostic": True} if by_recall else
                        {"must_be_below": s_eval * (1 - cfg.min_improvement)})},
        "regression_ppl": {"candidate": c_reg, reg_name: s_reg, "must_be_at_most": limit},
    }
    if by_recall:
        checks["recall_new"] = {"candidate": c_new, serving_name: s_new,
                                "must_be_above": s_new + cfg.min_recall_gain}
        if not c_new > s_new + cfg.min_recall_gain:
            return Decision(False, f"recall of this run's facts {c_new:.0%} does not rise above "
                                   f"{serving_name} {s_new:.0%}: nothing measurable was learned",
                            checks)
    else:
        need = s_eval * (1 - cfg.min_improvement)
        if not c_eval < need:
            return Decision(False, f"held-out perplexity {c_eval:.3f} does not beat {serving_name} "
                                   f"{s_eval:.3f}" + (f" by {cfg.min_improvement:.0%}"
                                                       if cfg.min_improvement else ""), checks)
    if _finite(c_ret) and _finite(s_ret):
        floor = s_ret - cfg.retention_margin
        checks["recall_retention"] = {"candidate": c_ret, serving_name: s_ret,
                                      "must_be_at_least": floor}
        if c_ret < floor:
            return Decision(False, f"retention recall {c_ret:.0%} is below {serving_name} "
                                   f"{s_ret:.0%} by more than {cfg.retention_margin:.0%}: it forgot "
                                   "or contradicts what earlier nights taught", checks)
    if c_reg > limit:
        worse = c_reg / s_reg - 1
        return Decision(False, f"regression-set perplexity {c_reg:.3f} is {worse:.1%} worse than "
                               f"{reg_name} {s_reg:.3f} (margin {cfg.regression_margin:.0%}): "
                               "it forgot", checks)
    parts = []
    if by_recall:
        parts.append(f"recall {s_new:.0%} -> {c_new:.0%}")
    if "recall_retention" in checks:
        parts.append(f"retention {s_ret:.0%} -> {c_ret:.0%}")
    if _finite(c_eval) and _finite(s_eval):
        parts.append(f"held-out perplexity {s_eval:.3f} -> {c_eval:.3f}")
    parts.append(f"regression {s_reg:.3f} -> {c_reg:.3f}")
    return Decision(True, ", ".join(parts), checks)
