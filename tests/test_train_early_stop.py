"""Early stopping in train-lora: on recall probes, but never while the regression set says the
adapter is still worse than the gate allows (it would only hand the gate a reject)."""

from __future__ import annotations

from milton.core.config import TrainConfig
from milton.train.jobs import EarlyStop

CFG = TrainConfig(epochs=6, batch_size=4, grad_accum=1, early_stop_patience=2)
ITEMS = 8  # two steps per epoch


def _run(recalls: list[float], regressions: list[float | None], bound: float | None) -> EarlyStop:
    """Feed one epoch-end per value; returns the stopper (``stopped_at`` set if it stopped)."""
    feed = iter(zip(recalls, regressions))
    current: dict[str, float | None] = {}

    def probe(model, facts):
        current["recall"], current["reg"] = next(feed)
        return current["recall"]

    early = EarlyStop(CFG, ITEMS, [], probe, regression=lambda model: current["reg"],
                      regression_bound=bound)
    for step in range(1, 6 + 2 * len(recalls) - 1):  # the probes start at epoch 3 (step 6)
        if early(step, None):
            break
    return early


def test_all_recalled_stops_only_once_regression_is_within_the_bound():
    early = _run([1.0, 1.0, 1.0], [13.3, 11.9, 11.2], bound=11.33)
    assert early.stopped_at == 10  # epoch 5: recall was complete at 3, regression only now
    assert early.as_dict()["regression_by_epoch"] == [[3, 13.3], [4, 11.9], [5, 11.2]]


def test_stale_recall_stops_within_the_bound_and_runs_on_outside_it():
    assert _run([0.5, 0.5, 0.5], [10.0, 10.0, 10.0], bound=11.0).stopped_at == 10  # patience 2
    assert _run([0.5, 0.5, 0.5, 0.5], [12.0, 11.8, 11.6, 11.4], bound=11.0).stopped_at is None


def test_regression_that_is_not_falling_does_not_hold_training_back():
    """Above the bound but no longer recovering: more epochs would only overfit."""
    assert _run([1.0, 1.0], [13.0, 13.4], bound=11.0).stopped_at == 8


def test_without_a_bound_recall_alone_decides():
    assert _run([1.0], [None], bound=None).stopped_at == 6
