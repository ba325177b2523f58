"""The pure parts of rollouts: the controller's verdict, p99 from buckets, the canary split,
shadow agreement, and the checks of a new rollout's guards and weights."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.rollouts import (
    CANARY,
    LATENCY_BUCKETS_MS,
    RUNNING,
    SHADOW,
    Figures,
    Guards,
    Rollout,
    ShadowFigures,
    VersionFigures,
    p99_ms,
)
from services.inference.rollouts import _bucket, agreeing_rows, canary_picks_candidate
from services.registry.rollouts import check_guards, check_weights, judge


def a_rollout(mode: str = CANARY, weight: int = 20, **guards: object) -> Rollout:
    return Rollout(
        rollout_id="r-test",
        model_name="m",
        production_version=1,
        candidate_version=2,
        mode=mode,
        weight=weight,
        weight_steps=[],
        step_interval_s=0.0,
        guards=Guards(**{"min_requests": 100, **guards}),
        state=RUNNING,
    )


def figures(prod: dict, cand: dict, shadow: dict | None = None) -> Figures:
    return Figures(
        VersionFigures(1, **prod), VersionFigures(2, **cand), ShadowFigures(**(shadow or {}))
    )


def test_no_verdict_before_the_minimum_of_requests() -> None:
    rollout = a_rollout(max_error_rate=0.01)
    assert judge(rollout, figures({"requests": 900}, {"requests": 99, "errors": 99})) is None


def test_a_broken_guard_rolls_back_with_both_figures() -> None:
    rollout = a_rollout(max_error_rate=0.05, max_p99_latency_ms=100)
    verdict = judge(
        rollout, figures({"requests": 900, "errors": 9}, {"requests": 100, "errors": 10})
    )
    assert verdict is not None and verdict.guard == "max_error_rate"
    assert (verdict.candidate_value, verdict.production_value, verdict.limit) == (0.1, 0.01, 0.05)
    assert "0.1" in verdict.message and "0.05" in verdict.message


def test_all_guards_holding_promote() -> None:
    rollout = a_rollout(max_error_rate=0.05, max_p99_latency_ratio=2.0)
    verdict = judge(
        rollout,
        figures({"requests": 900, "p99_latency_ms": 10}, {"requests": 100, "p99_latency_ms": 10}),
    )
    assert verdict is not None and verdict.guard == "all_guards"


def test_relative_latency_breaks() -> None:
    rollout = a_rollout(max_p99_latency_ratio=1.5)
    verdict = judge(
        rollout,
        figures({"requests": 900, "p99_latency_ms": 10}, {"requests": 100, "p99_latency_ms": 25}),
    )
    assert verdict is not None and verdict.guard == "max_p99_latency_ratio"


def test_accuracy_waits_for_labels_then_judges() -> None:
    rollout = a_rollout(max_accuracy_drop=0.02, min_feedback=50)
    few = figures({"requests": 900, "feedback": 40, "correct": 40},
                  {"requests": 100, "feedback": 60, "correct": 1})  # fmt: skip
    assert judge(rollout, few) is None
    enough = figures({"requests": 900, "feedback": 100, "correct": 90},
                     {"requests": 100, "feedback": 50, "correct": 40})  # fmt: skip
    verdict = judge(rollout, enough)
    assert verdict is not None and verdict.guard == "max_accuracy_drop"
    assert (verdict.candidate_value, verdict.production_value) == (0.8, 0.9)
    close = figures({"requests": 900, "feedback": 100, "correct": 90},
                    {"requests": 100, "feedback": 50, "correct": 44})  # fmt: skip
    assert judge(rollout, close).guard == "all_guards"  # type: ignore[union-attr]


def test_shadow_counts_comparisons_and_judges_agreement() -> None:
    rollout = a_rollout(SHADOW, 0, min_agreement=0.9)
    assert judge(rollout, figures({}, {}, {"compared": 99, "agreed": 0})) is None
    verdict = judge(rollout, figures({}, {}, {"compared": 100, "agreed": 80}))
    assert verdict is not None and verdict.guard == "min_agreement"
    assert verdict.candidate_value == 0.8


def test_p99_from_buckets() -> None:
    assert p99_ms({}, 0) == 0.0
    # 98 requests under 5 ms, 2 at 250 ms: the 99th percentile is in the 250 ms bucket.
    five, slow = LATENCY_BUCKETS_MS.index(5), LATENCY_BUCKETS_MS.index(250)
    assert p99_ms({five: 98, slow: 2}, 100) == 250.0
    assert p99_ms({five: 100}, 100) == 5.0
    assert _bucket(0.004) == five and _bucket(99.0) == len(LATENCY_BUCKETS_MS)
    assert p99_ms({len(LATENCY_BUCKETS_MS): 10}, 10) == LATENCY_BUCKETS_MS[-1]


def test_canary_split_is_weighted_and_sticky() -> None:
    rollout = a_rollout(weight=20)
    keyed = [canary_picks_candidate(rollout, f"user-{i}") for i in range(10000)]
    assert 0.18 < sum(keyed) / len(keyed) < 0.22
    assert all(canary_picks_candidate(rollout, f"user-{i}") == keyed[i] for i in range(100))
    random_share = sum(canary_picks_candidate(rollout, "") for _ in range(10000)) / 10000
    assert 0.18 < random_share < 0.22


def test_agreement_by_class_or_by_value() -> None:
    a = {"p": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])}
    b = {"p": np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.45]])}
    assert agreeing_rows(a, b) == (3, 2)
    assert agreeing_rows({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.0])}) == (1, 1)
    assert agreeing_rows({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 3.0])}) == (1, 0)


@pytest.mark.parametrize(
    ("guards", "mode", "words"),
    [
        (None, CANARY, "guards are required"),
        (Guards(min_requests=0, max_error_rate=0.1), CANARY, "min_requests must be 1"),
        (Guards(min_requests=10), CANARY, "at least one of"),
        (Guards(min_requests=10, max_error_rate=1.5), CANARY, "max_error_rate must be between"),
        (Guards(min_requests=10, max_p99_latency_ms=0), CANARY, "above 0"),
        (Guards(min_requests=10, min_agreement=0.9), CANARY, "shadow rollouts only"),
    ],
)
def test_bad_guards(guards: Guards | None, mode: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_guards(guards, mode)


@pytest.mark.parametrize(
    ("mode", "weight", "steps", "interval", "words"),
    [
        (CANARY, 0, [], 0.0, "weight must be 1 to 99"),
        (CANARY, 100, [], 0.0, "weight must be 1 to 99"),
        (CANARY, 20, [10], 5.0, "must rise"),
        (CANARY, 20, [50, 100], 5.0, "must rise"),
        (CANARY, 20, [50], 0.0, "step_interval_seconds must be above 0"),
        (SHADOW, 20, [], 0.0, "for canary rollouts"),
    ],
)
def test_bad_weights(mode: str, weight: int, steps: list[int], interval: float, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_weights(mode, weight, steps, interval)
