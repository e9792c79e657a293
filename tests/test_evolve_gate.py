"""The evolve gate's choice among every measured stage and type (pure figures, milliseconds)."""

from __future__ import annotations

from milton.core.config import EvolveConfig
from milton.evolve.gate import choose
from milton.evolve.jobs import stage_candidates

SERVING = {"stage": "serving", "name": "base + adapter", "eval_ppl": 20.0, "regression_ppl": 30.0,
           "size_mb": 300.0, "tokens_per_s": 20.0}


def _fig(ppl: float, size: float, speed: float, reg: float | None = None) -> dict:
    return {"eval_ppl": ppl, "regression_ppl": reg if reg is not None else ppl * 1.5,
            "size_mb": size, "tokens_per_s": speed}


STAGES = {
    # The merged model: as good as serving; f16 is big and slow, q8_0 slower, q4_k_m smaller
    # but slower than the student.
    "merge": {"types": {"f16": _fig(20.0, 540, 12), "q8_0": _fig(20.1, 298, 18),
                        "q4_k_m": _fig(20.4, 250, 20.5)}},
    # The student: keeps 93% of the quality, 1.4x faster; its q8_0 and q4_k_m are equally fast
    # (within 5%), so the smaller wins; its f16 is slower.
    "distil": {"types": {"f16": _fig(21.0, 360, 16), "q8_0": _fig(21.3, 200, 28),
                         "q4_k_m": _fig(21.5, 170, 27.5)}},
    # Pruned further: fastest, but below the quality threshold.
    "prune": {"types": {"q4_k_m": _fig(40.0, 170, 29)}},
    "late": {"skipped": "evolve.max_minutes"},
}


def test_the_fastest_qualifying_candidate_wins_ties_to_the_smaller_even_from_a_middle_stage():
    cfg = EvolveConfig(quality_threshold=0.9)
    candidates = stage_candidates(STAGES)
    assert len(candidates) == 7  # the skipped stage offers none
    decision, winner, verdicts = choose(candidates, SERVING, cfg)
    assert decision.promote and winner is not None
    assert (winner["stage"], winner["format"]) == ("distil", "q4_k_m"), decision.reason
    assert decision.checks["winner"] == "distil q4_k_m"
    why = {v["candidate"]: v for v in verdicts}
    assert [v["candidate"] for v in verdicts if v["won"]] == ["distil q4_k_m"]
    assert "larger" in why["distil q8_0"]["why"] and why["distil q8_0"]["qualifies"]
    assert "slower" in why["merge q4_k_m"]["why"] and why["merge q4_k_m"]["qualifies"]
    assert not why["prune q4_k_m"]["qualifies"] and "held-out perplexity" in why["prune q4_k_m"]["why"]
    # merge f16 and q8_0: as good, but neither smaller (q8_0: 0.7% less) nor faster.
    assert "neither smaller" in why["merge f16"]["why"] and not why["merge q8_0"]["qualifies"]


def test_promote_type_limits_the_choice():
    decision, winner, _ = choose(stage_candidates(STAGES, "q8_0"), SERVING, EvolveConfig(quality_threshold=0.9))
    assert decision.promote and (winner["stage"], winner["format"]) == ("distil", "q8_0")


def test_nothing_qualifying_is_a_rejection_naming_every_candidate():
    decision, winner, verdicts = choose(stage_candidates(STAGES), SERVING, EvolveConfig(quality_threshold=0.99))
    assert not decision.promote and winner is None
    assert decision.reason.startswith("no candidate qualifies")
    assert all(v["candidate"] in decision.reason for v in verdicts) and len(verdicts) == 7
    assert not any(v["won"] for v in verdicts)
    decision, winner, verdicts = choose([], SERVING, EvolveConfig())
    assert not decision.promote and winner is None and verdicts == []


def test_a_candidate_that_forgets_taught_facts_loses_whatever_its_perplexity():
    """Perplexity on general text does not see a lost fact: a faster, smaller file that answers
    fewer of the taught-fact probes than serve (beyond recall_margin) does not qualify, and the
    next best one that keeps them wins."""
    cfg = EvolveConfig(quality_threshold=0.9, recall_margin=0.05)
    serving = {**SERVING, "recall": 1.0}
    stages = {"trim": {"types": {"q4_k_m+q4_0": {**_fig(20.0, 110, 40), "recall": 0.81},
                                 "q4_k_m": {**_fig(20.1, 145, 39), "recall": 0.97}}}}
    decision, winner, verdicts = choose(stage_candidates(stages), serving, cfg)
    assert decision.promote and winner is not None and winner["format"] == "q4_k_m", decision.reason
    lost = next(v for v in verdicts if v["candidate"] == "trim q4_k_m+q4_0")
    assert not lost["qualifies"] and "taught-fact probes" in lost["why"] and "81%" in lost["why"]
    # Nothing measured for a candidate when serve's recall is known: not promoted blind.
    decision, winner, _ = choose([{"stage": "trim", "format": "q8_0", **_fig(20.0, 110, 40)}], serving, cfg)
    assert not decision.promote and "could not be measured" in decision.reason
    # No facts taught (no serving recall): the figures alone decide, as before.
    decision, winner, _ = choose(stage_candidates(stages), SERVING, cfg)
    assert decision.promote and winner is not None and winner["format"] == "q4_k_m+q4_0"
