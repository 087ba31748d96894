"""bench heartbeat's full-form figure is the median of its runs, all of that run's figures together."""

from __future__ import annotations

from bench.heartbeat import median_run


def test_the_figure_is_the_run_with_the_median_p99_and_every_run_is_listed():
    runs = [{"heartbeat_p99_ms": 12.7, "heartbeat_p50_ms": 0.92}, {"heartbeat_p99_ms": 7.3, "heartbeat_p50_ms": 0.84},
            {"heartbeat_p99_ms": 9.5, "heartbeat_p50_ms": 0.88}]
    m = median_run(runs)
    assert (m["heartbeat_p99_ms"], m["heartbeat_p50_ms"]) == (9.5, 0.88)  # one run's figures, not a mix
    assert m["heartbeat_p99_ms_runs"] == [12.7, 7.3, 9.5] and m["runs"] == 3


def test_one_run_is_its_own_median():
    only = {"heartbeat_p99_ms": 11.5, "heartbeat_p50_ms": 0.9}
    assert median_run([only]) == {**only, "runs": 1, "heartbeat_p99_ms_runs": [11.5]}
