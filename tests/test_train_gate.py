"""The promotion gate: better held-out perplexity, no forgetting beyond the margin."""

from __future__ import annotations

import math

from milton.core.config import TrainConfig
from milton.train.gate import decide

CFG = TrainConfig(regression_margin=0.05, min_improvement=0.0)
SERVING = {"eval_ppl": 20.0, "regression_ppl": 30.0}


def test_promotes_a_candidate_that_learned_without_forgetting():
    d = decide({"eval_ppl": 8.0, "regression_ppl": 31.0}, SERVING, CFG)
    assert d.promote and "20.000 -> 8.000" in d.reason


def test_rejects_no_improvement_on_held_out():
    d = decide({"eval_ppl": 20.5, "regression_ppl": 29.0}, SERVING, CFG)
    assert not d.promote and "does not beat current" in d.reason


def test_rejects_forgetting_beyond_the_margin():
    d = decide({"eval_ppl": 5.0, "regression_ppl": 31.6}, SERVING, CFG)  # +5.3%
    assert not d.promote and "it forgot" in d.reason
    assert decide({"eval_ppl": 5.0, "regression_ppl": 31.4}, SERVING, CFG).promote  # +4.7%


def test_min_improvement_share():
    cfg = TrainConfig(min_improvement=0.1)
    assert not decide({"eval_ppl": 18.5, "regression_ppl": 30.0}, SERVING, cfg).promote
    assert decide({"eval_ppl": 17.9, "regression_ppl": 30.0}, SERVING, cfg).promote


def test_diverged_candidate_is_rejected():
    for bad in (math.nan, math.inf, None):
        d = decide({"eval_ppl": bad, "regression_ppl": 1.0}, SERVING, CFG)
        assert not d.promote and "diverged" in d.reason


# -- recall probes decide when the run taught facts ---------------------------------------------
FACTS_SERVING = {**SERVING, "recall_new": 0.1, "recall_retention": 0.9}


def test_recall_must_rise_even_when_perplexity_falls():
    """The issue's adapter: perplexity 25 -> 5 from the answer style alone, no fact recalled."""
    d = decide({"eval_ppl": 5.0, "regression_ppl": 29.0, "recall_new": 0.1,
                "recall_retention": 0.9}, FACTS_SERVING, CFG)
    assert not d.promote and "does not rise" in d.reason
    assert d.checks["eval_ppl"]["diagnostic"] is True


def test_recall_rise_promotes_even_without_a_perplexity_gain():
    d = decide({"eval_ppl": 25.0, "regression_ppl": 29.0, "recall_new": 0.7,
                "recall_retention": 0.85}, FACTS_SERVING, CFG)
    assert d.promote and "recall 10% -> 70%" in d.reason and "retention 90% -> 85%" in d.reason


def test_retention_drop_beyond_the_margin_rejects():
    d = decide({"eval_ppl": 5.0, "regression_ppl": 29.0, "recall_new": 0.9,
                "recall_retention": 0.75}, FACTS_SERVING, CFG)  # 0.9 - 0.1 margin = 0.8
    assert not d.promote and "retention recall 75%" in d.reason and "earlier nights" in d.reason
    assert decide({"eval_ppl": 5.0, "regression_ppl": 29.0, "recall_new": 0.9,
                   "recall_retention": 0.81}, FACTS_SERVING, CFG).promote


def test_regression_still_holds_with_recall():
    d = decide({"eval_ppl": 5.0, "regression_ppl": 40.0, "recall_new": 0.9,
                "recall_retention": 0.9}, FACTS_SERVING, CFG)
    assert not d.promote and "it forgot" in d.reason


def test_regression_is_held_against_the_base_not_only_the_drifted_adapter():
    """Night after night each adapter may be a little worse on general text than the last;
    measured only against the serving adapter that drift would compound (5% a night)."""
    serving = {"eval_ppl": 20.0, "regression_ppl": 10.4, "recall_new": 0.0}
    base = {"eval_ppl": 30.0, "regression_ppl": 10.0}
    candidate = {"eval_ppl": 15.0, "regression_ppl": 10.8, "recall_new": 0.9}  # +3.8% vs serving
    assert decide(candidate, serving, CFG, serving_name="current v1").promote
    decision = decide(candidate, serving, CFG, serving_name="current v1", base=base)
    assert not decision.promote and "8.0% worse than base 10.000" in decision.reason, decision
    # a serving adapter better than the base on the regression set is the reference then
    better = {**serving, "regression_ppl": 9.0}
    decision = decide(candidate, better, CFG, serving_name="current v1", base=base)
    assert not decision.promote and "current v1 9.000" in decision.reason, decision
    assert decide({**candidate, "regression_ppl": 10.2}, serving, CFG, base=base).promote
