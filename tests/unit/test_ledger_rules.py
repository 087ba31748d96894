"""The step protocol's pure rules (coordinator/ledger/rules.py): no SQL, no clock."""

from __future__ import annotations

import math

import pytest

from coordinator.ledger.rules import (
    Contribution, Sum, averaged_norm, exactly_once, judge_contributions, local_grad_norm, norm_sq, replicas_disagree,
    total_norm,
)

NAN = float("nan")


def test_a_stored_null_norm_is_nan():
    assert math.isnan(norm_sq(None)) and norm_sq(4) == 4.0


def test_honest_replicas_all_count_and_set_the_reference():
    by_stage = {0: [Contribution("a", 16.0, 2), Contribution("b", 36.0, 2)], 1: [Contribution("c", 4.0, 4)]}
    v = judge_contributions(by_stage, {}, factor=10.0)
    assert v.contributors == {0: ["a", "b"], 1: ["c"]} and v.refused == [] and not v.skip
    assert v.refs == {0: 2.0, 1: 0.5}  # lower median of norm per micro-batch: sqrt(16)/2, sqrt(36)/2 -> 2.0


def test_a_poisoned_replica_is_refused_even_against_one_honest_peer():
    # two replicas: the lower median is the honest one's size, so the poisoned one cannot set the bar
    by_stage = {0: [Contribution("honest", 4.0, 2), Contribution("poisoned", 4e12, 2)]}
    v = judge_contributions(by_stage, {}, factor=10.0)
    assert v.contributors == {0: ["honest"]}
    assert v.refused == [(0, "poisoned", "gradient norm per micro-batch 1e+06 is over 10 x the stage's 1")]
    assert v.refs == {0: 1.0} and not v.skip


def test_the_previous_reference_guards_a_stage_whose_every_replica_jumps():
    v = judge_contributions({0: [Contribution("a", 400.0, 1)]}, {0: 1.0}, factor=10.0)
    assert v.contributors == {0: []} and v.skip  # 20 > 10 x the median of [1, 20] = 1
    assert v.refs == {0: 1.0}  # nothing accepted: the reference stays


def test_non_finite_contributions_are_refused_and_a_stage_without_any_skips_the_step():
    v = judge_contributions({0: [Contribution("a", NAN, 2)], 1: [Contribution("b", 4.0, 2)]}, {}, factor=10.0)
    assert v.refused == [(0, "a", "NaN/Inf gradient")] and v.skip and v.contributors == {0: [], 1: ["b"]}


def test_a_replica_without_micro_batches_counts_but_sets_no_reference():
    v = judge_contributions({0: [Contribution("idle", 0.0, 0), Contribution("busy", 9.0, 3)]}, {}, factor=10.0)
    assert v.contributors == {0: ["idle", "busy"]} and v.refs == {0: 1.0}


def test_the_global_norm_adds_the_stages():
    assert total_norm({0: [Contribution("a", 9.0, 1)], 1: [Contribution("b", 16.0, 1)]}) == 5.0
    assert averaged_norm({0: [Sum(4, 9.0), Sum(4, 9.0)], 1: [Sum(4, 16.0), Sum(4, 16.0)]}) == 5.0


def test_local_steps_norm_scales_each_replica_to_a_full_batch():
    by_stage = {0: [Contribution("a", 1.0, 1), Contribution("b", 4.0, 2), Contribution("refused", 1e9, 1)]}
    # a: 1 * (4/1)^2 = 16; b: 4 * (4/2)^2 = 16; mean 16 over accepted replicas only
    assert local_grad_norm(by_stage, {0: ["a", "b"]}, total_micro_batches=4) == pytest.approx(4.0)


@pytest.mark.parametrize("exact,sums,problem", [
    (True, [Sum(4, 16.0), Sum(4, 16.0)], ""),
    (True, [Sum(4, 16.0), Sum(2, 16.0)], "micro-batches [2, 4]"),
    (True, [Sum(4, 16.0), Sum(4, 16.001)], "norm^2"),
    (False, [Sum(4, 16.0), Sum(4, 16.001)], ""),  # lossy rounds: a rounding apart is agreement
    (False, [Sum(4, 16.0), Sum(4, 17.0)], "norm^2"),
])
def test_replicas_must_agree_on_their_sum(exact, sums, problem):
    found = replicas_disagree({1: sums}, exact)
    assert (problem in found and found.startswith("stage 1's replicas summed different gradients")) if problem \
        else found == ""


def test_exactly_once_names_lost_and_doubled_micro_batches():
    assert exactly_once({0: 1, 1: 1, 2: 1, 3: 1}, 4, step=7) == (0, 0, None)
    lost, double, why = exactly_once({0: 1, 1: 2, 3: 1}, 4, step=7)
    assert (lost, double) == (1, 1) and why == "step 7: committed micro-batches {0: 1, 1: 2, 3: 1} (expected each of 4 once)"
