"""bench swarm's TLS-overhead rate: a run's tokens/s from its median step, so one burst does not move it."""

import pytest

from bench.swarm import median_step_tokens_per_s


def status(seconds: list[float], tokens: int = 256) -> dict:
    return {"history": [{"tokens": tokens, "seconds": s} for s in seconds]}


def test_the_warm_up_step_and_a_burst_do_not_move_the_rate():
    calm = median_step_tokens_per_s(status([9.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    burst = median_step_tokens_per_s(status([9.0, 1.0, 1.0, 4.0, 1.0, 1.0]))
    assert calm == burst == 256.0
    # the mean over the same steps would have read 256 x 5 / 8 = 160 for the burst run
    assert median_step_tokens_per_s(status([1.0, 2.0, 2.0, 2.0])) == 128.0


def test_a_run_with_no_step_after_the_warm_up_is_refused_by_name():
    with pytest.raises(RuntimeError, match="closed 1 step"):
        median_step_tokens_per_s(status([1.0]))
