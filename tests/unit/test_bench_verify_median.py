"""bench verify's headline: a liar never quarantined is not left out of the median (it would
make detection look faster than it was); it counts as caught the step after the run's last."""

from bench.verify import median_detection


def test_a_liar_never_caught_counts_as_caught_after_the_run():
    # 8 lying steps: one liar caught in its 2nd, one never, one in its 8th (a quick run of 2026-12-07)
    assert median_detection([2, None, 8], lying_steps=8) == 8
    assert median_detection([2, None, None], lying_steps=8) == 9  # at least 9: a lower bound
    assert median_detection([1, 2, 4], lying_steps=8) == 2
    assert median_detection([], lying_steps=8) is None
