"""bench heartbeat's short form: the simulated workers, spread over client processes, join, beat
and watch a real coordinator while a status poller and a dashboard stream observe it, and every
process's figures come back (the full form is `gptjt bench heartbeat`, bench/README.md)."""

from __future__ import annotations

from bench.heartbeat import CLIENT_PROCESSES, measure


def test_a_short_run_of_simulated_workers_in_several_processes_measures_every_heartbeat():
    workers, window_s, interval_s = 80, 3.0, 1.0
    m = measure(workers, window_s, interval=interval_s, train_step_s=2.0)
    assert m["client_processes"] == CLIENT_PROCESSES and m["workers"] == workers
    assert m["failures"] == {} and m["heartbeat_failures"] == 0
    # every worker beats about once an interval through the window, from whichever process plays it
    assert 0.6 * workers * window_s / interval_s <= m["heartbeats_measured"] <= 1.4 * workers * window_s / interval_s
    assert 0 < m["heartbeat_p50_ms"] <= m["heartbeat_p99_ms"]
    assert m["watch_updates"] >= workers  # each stream got at least its first state
    assert m["status_polls"] >= 1 and m["steps_trained"] >= 1  # the observers' and the trainer's figures came back
    assert m["status_failures"] == 0 and m["status_mb"] > 0  # each poll got a whole JSON object
    # where the window's CPU went (bench/process_cpu.py): every group was sampled in it
    cores = m["window_cpu_cores"]
    assert set(cores) == {"coordinator", "status_process", "simulated_workers", "observers", "machine_busy"}
    assert cores["coordinator"] > 0 and cores["simulated_workers"] > 0
    assert cores["machine_busy"] <= m["machine_cores"] + 0.05
