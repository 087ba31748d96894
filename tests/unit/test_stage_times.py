"""bench.stage_times times each stage of a layer split alone (the real stages a worker loads) and
the perfect pipeline of them that bench swarm holds the swarm against."""

from __future__ import annotations

import pytest

from bench.stage_times import ideal_pipeline_step_s, stage_seconds


def test_the_ideal_step_is_one_trip_through_every_stage_then_the_slowest_stages_pace():
    # 4 micro-batches through stages of 0.1, 0.5 and 0.2 s: 0.8 s for the first, 0.5 s each after
    assert ideal_pipeline_step_s([0.1, 0.5, 0.2], 4) == pytest.approx(0.8 + 3 * 0.5)
    # one micro-batch crosses the stages one after another: no overlap to gain
    assert ideal_pipeline_step_s([0.1, 0.5, 0.2], 1) == pytest.approx(0.8)


def test_each_stage_of_the_tiny_model_is_timed_with_the_head_stage_the_slowest():
    times = stage_seconds("random:tiny:0", [(0, 2), (2, 4)], micro_batch=1, seq_len=16, repeats=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    # the tiny flavour's LM head (hidden x 50,400) outweighs its two blocks and the embedding lookup
    assert times[1] > times[0]


@pytest.mark.parametrize("ranges", [[], [(1, 4)], [(0, 2), (3, 4)]])
def test_ranges_that_do_not_cover_the_layers_in_order_are_refused_by_name(ranges):
    with pytest.raises(ValueError, match=r"do not cover the model's layers"):
        stage_seconds("random:tiny:0", ranges, micro_batch=1, seq_len=16)
