"""bench churn's simulation drives the real ledger through volunteer churn in virtual time: a short
seeded form of `gptjt bench churn` (a few minutes of a small swarm with sessions of minutes)."""

from __future__ import annotations

import dataclasses

import pytest

from bench.churn_settings import ChurnSettings, run_config
from bench.churn_sim import ChurnSimulation
from bench.churn_static import simulate_static
from bench.churn_volunteers import VOLUNTEER_MIX, Arrivals, Regions, weibull_session_s

# 24 volunteers with 30 min median sessions for 45 min; 4-8 stages of 2 replicas, so every stage
# loads in a few minutes (with 2 stages of 14 layers, loads took longer than the gaps between
# departures, and every re-plan before the first step restarts them: the first step never opened)
SMALL = ChurnSettings(workers=24, median_session_s=1800.0, hours=0.75, min_stages=4, max_stages=8,
                      replicas_per_stage=2, micro_batches_per_replica=2, checkpoint_every=5, seed=3)


@pytest.fixture(scope="module")
def churned(tmp_path_factory):
    sim = ChurnSimulation(SMALL, tmp_path_factory.mktemp("churn"))
    return sim, sim.run_sim()


@pytest.fixture(scope="module")
def calm(tmp_path_factory):
    sim = ChurnSimulation(dataclasses.replace(SMALL, churn=False), tmp_path_factory.mktemp("calm"))
    return sim, sim.run_sim()


def test_sessions_are_weibull_with_the_configured_median():
    import random
    rng = random.Random(0)
    draws = sorted(weibull_session_s(rng, 3600.0, 0.5) for _ in range(20000))
    assert draws[len(draws) // 2] == pytest.approx(3600.0, rel=0.05)
    assert sum(draws) / len(draws) == pytest.approx(2 * 3600.0 / 0.6931 ** 2, rel=0.1)  # mean ~4.2x the median
    a, b = (Arrivals(50, 600.0, 0.5, 7, Regions()) for _ in range(2))
    assert [(v.device, v.site, v.leave_s) for v in a.initial] == [(v.device, v.site, v.leave_s) for v in b.initial]
    assert {v.device for v in Arrivals(400, 600.0, 0.5, 1, Regions()).initial} == set(VOLUNTEER_MIX)


def test_the_ledger_survives_churn_and_counts_every_micro_batch_once(churned):
    sim, r = churned
    assert r.departures > 5 and r.placed_departures >= 2  # sessions of ~30 min over 45 min
    assert r.steps > 0 and r.tokens_per_s > 0
    ledger = sim.ledger
    assert ledger.exactly_once_violations() == [] and ledger.audit_exactly_once() == []
    kinds = {row["kind"] for row in ledger.db.execute("SELECT DISTINCT kind FROM events")}
    assert {"worker_dead", "step_closed", "replanned"} <= kinds
    assert r.ledger_cpu_s > 0 and r.heartbeat_cpu_per_beat_s > 0 and r.reaper_cpu_per_sim_s > 0
    assert 0 < r.useful_s + r.rolled_back_s + r.unfinished_s <= r.seconds


def test_without_churn_nobody_leaves_and_steps_fill_the_time(calm):
    sim, r = calm
    assert r.departures == 0 and r.rolled_back_s == 0.0 and r.rollbacks == 0
    # Steps run back to back once the stages have loaded: kept steps fill most of the time.
    # (Not compared with the churned run's steps: the ledger's worker ids are random, and they
    # break ties between equal devices, so plans, and step times, differ from run to run.)
    assert r.steps > 0 and r.useful_s > 0.5 * r.seconds


def test_volunteers_go_on_measuring_the_links_the_coordinator_asks_for(calm):
    """Not only at the join: a plan made before most links were measured would otherwise stand
    for the whole calm run, and the ceiling would be a plan on guessed links."""
    sim, _ = calm
    last_join = sim.end - SMALL.hours * 3600 + max(v.join_s for v in sim.arrivals.initial)
    measured = sorted(row[0] for row in sim.ledger.db.execute("SELECT measured FROM links"))
    later = [t for t in measured if t > last_join + SMALL.probe_round_s / 2]
    assert len(later) > len(measured) / 2  # most of what the plans saw came from probe rounds


def test_the_volunteers_are_the_same_for_a_seed(churned, tmp_path):
    """The seed fixes the volunteers and their sessions, and the simulation gives the ledger
    seeded worker ids: the same settings give the same run, event for event (so one run of each
    is a figure, bench/churn_measure.py)."""
    _, first = churned
    short = dataclasses.replace(SMALL, hours=0.25)
    # the search's wall-clock backstop off: a loaded machine (the suite beside a bench) must not
    # cut a search short and change a plan; the claim is about the searches ended by their count
    run = run_config(short)
    run.scheduler.search_budget_s = 1e9
    runs = []
    for name in ("a", "b"):
        sim = ChurnSimulation(short, tmp_path / name, run=run)
        result = sim.run_sim()
        events = sim.ledger.db.execute("SELECT ts, kind, detail FROM events ORDER BY id").fetchall()
        runs.append((dataclasses.replace(result, wall_s=0.0, ledger_cpu_s=0.0, heartbeat_cpu_per_beat_s=0.0,
                                         reaper_cpu_per_sim_s=0.0), [tuple(e) for e in events]))
    assert runs[0] == runs[1]
    assert any(kind == "replanned" for _, kind, _ in runs[0][1])
    shorter = simulate_static(short)
    assert runs[0][0].departures == shorter.departures < first.departures


def test_the_static_baseline_sees_the_same_volunteers_and_restarts_on_every_placed_departure(churned):
    _, ours = churned
    static = simulate_static(SMALL)
    assert static.departures == ours.departures  # the same sessions, drawn in the same order
    assert static.placed_departures >= static.rollbacks > 0  # leavers during a reload restart with the next
    calm = simulate_static(dataclasses.replace(SMALL, churn=False))
    assert calm.rollbacks == 0 and calm.steps >= static.steps


def test_measure_runs_the_baselines_in_a_second_process_to_the_same_figures(churned, calm):
    """bench/churn_measure.measure runs the calm and static simulations in a spawned process
    beside the churned one: the figures must be those of the same simulations run here."""
    from bench.churn_measure import measure

    figures = measure(SMALL)
    assert figures["tokens_per_s"] == round(churned[1].tokens_per_s, 1)
    assert figures["no_churn_tokens_per_s"] == round(calm[1].tokens_per_s, 1)
    assert figures["static_tokens_per_s"] == round(simulate_static(SMALL).tokens_per_s, 1)
    assert figures["goodput_vs_no_churn"] == round(churned[1].tokens_per_s / calm[1].tokens_per_s, 4)
