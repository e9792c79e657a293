"""The evaluation gate: a candidate adapter is promoted only when it measurably helped.

Both conditions are checked against what is serving now (the current adapter, or the bare
base model when there is none), measured on this run's data in this run:

* held-out perplexity must improve by at least ``train.min_improvement`` (a share);
* regression-set perplexity (older held-out data + the built-in general set) must not be
  worse by more than ``train.regression_margin`` (a share): learning new facts may cost a
  little elsewhere, forgetting may not.
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


def decide(candidate: dict[str, Any], serving: dict[str, Any], cfg: TrainConfig,
           *, serving_name: str = "current") -> Decision:
    """Compare ``candidate`` with ``serving`` metrics (``eval_ppl``, ``regression_ppl``)."""
    c_eval, s_eval = candidate.get("eval_ppl"), serving.get("eval_ppl")
    c_reg, s_reg = candidate.get("regression_ppl"), serving.get("regression_ppl")
    if not (_finite(c_eval) and _finite(c_reg)):
        return Decision(False, f"candidate perplexity is not finite (eval {c_eval}, "
                               f"regression {c_reg}): training diverged")
    if not (_finite(s_eval) and _finite(s_reg)):
        return Decision(False, f"{serving_name} perplexity could not be measured")
    need = s_eval * (1 - cfg.min_improvement)
    limit = s_reg * (1 + cfg.regression_margin)
    checks = {
        "eval_ppl": {"candidate": c_eval, serving_name: s_eval, "must_be_below": need},
        "regression_ppl": {"candidate": c_reg, serving_name: s_reg, "must_be_at_most": limit},
    }
    if not c_eval < need:
        return Decision(False, f"held-out perplexity {c_eval:.3f} does not beat {serving_name} "
                               f"{s_eval:.3f}" + (f" by {cfg.min_improvement:.0%}"
                                                   if cfg.min_improvement else ""), checks)
    if c_reg > limit:
        worse = c_reg / s_reg - 1
        return Decision(False, f"regression-set perplexity {c_reg:.3f} is {worse:.1%} worse than "
                               f"{serving_name} {s_reg:.3f} (margin {cfg.regression_margin:.0%}): "
                               "it forgot", checks)
    return Decision(True, f"held-out perplexity {s_eval:.3f} -> {c_eval:.3f}, regression "
                          f"{s_reg:.3f} -> {c_reg:.3f}", checks)
