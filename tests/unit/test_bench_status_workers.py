"""bench status's build at N workers, in a short form: the status process's code path over real joins."""

from __future__ import annotations

from bench.status import measure_workers


def test_a_build_at_n_workers_lists_each_and_times_the_metrics_apart():
    row = measure_workers(40)
    assert row["workers"] == 40  # measure_workers also checks the status lists all 40
    assert row["workers_build_ms"] > 0 and row["workers_metrics_ms"] > 0 and row["workers_nan_walk_ms"] > 0
    assert 0 < row["workers_status_mb"] < 1
    assert 0 < row["workers_status_gzip_mb"] < row["workers_status_mb"] / 5 and row["workers_gzip_ms"] > 0
