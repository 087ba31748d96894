"""The averaging rate the coordinator times (ledger/averaging_rounds.py) and what the cost model
makes of it: a replica group's rounds priced at the slower of its links and its members' rate."""

from __future__ import annotations

import math

import pytest

from coordinator.cost_model import (Device, Link, Network, StagePlacement, Workload, allreduce_s, averaged_bytes,
                                    averaging_rate_gbps)
from coordinator.ledger import RunLedger
from coordinator.ledger.measurements import smoothed_rate
from coordinator.scheduler import plan_stages
from tests.unit.test_ledger import Clock
from tests.unit.test_scheduler import TINY, _bounded, device

pytestmark = pytest.mark.usefixtures("both_ledger_backends")

# fp32 rounds (averaging.compression "none"): a rate depends only on the bytes averaged
WORK = Workload(tokens_per_micro_batch=128, micro_batches=4, in_flight=2, gradient_bytes_per_param=4.0)


def _group(*rates: float) -> tuple[StagePlacement, list[Device], Network]:
    """One stage of all layers on a replica per rate, each at a site of its own, 100 Gbit/s apart."""
    devices = [Device(f"d{i}", 1.0, 24, site=f"s{i}", averaging_gbps=r) for i, r in enumerate(rates)]
    net = Network({(f"s{i}", f"s{j}"): Link(0.0001, 100.0) for i in range(len(rates)) for j in range(i)},
                  inside=Link(0.0001, 100.0))
    return StagePlacement(0, 4, tuple(range(len(rates)))), devices, net


def test_a_group_is_priced_at_the_slower_of_its_links_and_its_slowest_members_rate():
    stage, unmeasured, net = _group(math.inf, math.inf)
    payload_s = averaged_bytes(TINY, WORK, 0, 4) * 8 / 100e9  # 2 (R-1)/R = 1 for two replicas
    assert allreduce_s(TINY, WORK, stage, unmeasured, net) == pytest.approx(payload_s + 2 * 0.0001)
    stage, measured, net = _group(0.3, 2.0)  # the first averaged at 0.3 Gbit/s
    assert allreduce_s(TINY, WORK, stage, measured, net) == pytest.approx(payload_s * 100 / 0.3 + 2 * 0.0001)


def test_the_rate_of_a_round_prices_that_round_back():
    rate = averaging_rate_gbps(TINY, WORK, 0, 4, 2, 1.5)
    stage, devices, net = _group(rate, rate)
    assert allreduce_s(TINY, WORK, stage, devices, net) == pytest.approx(1.5 + 2 * 0.0001)
    for replicas, seconds in ((1, 1.0), (2, 0.0), (2, float("nan"))):
        with pytest.raises(ValueError, match="averaging rate"):
            averaging_rate_gbps(TINY, WORK, 0, 4, replicas, seconds)


def _data_parallel_ledger(tmp_path) -> tuple[RunLedger, Clock, list[str]]:
    """Two equal workers on 100 Gbit/s links, allowed one stage of two replicas: the cost model
    prices that faster than the 2-stage pipeline (the tiny flavour's head is most of its compute),
    as it did on loopback in bench costmodel."""
    run = _bounded(2, min_stages=1)
    run.pipeline.replicas_per_stage = 2
    run.scheduler.default_link_mbit, run.scheduler.layer_load_s = 100_000, 0.0
    run.scheduler.replan_every_s = 0.0  # each measurement searches at once (no merging by the reaper)
    clock = Clock()
    ledger = RunLedger(tmp_path / "run.db", run, plan_stages(4, 2), clock, shape=TINY)
    ids = [ledger.join(n, f"h:{n}", device(0.01))["id"] for n in ("a", "b")]
    for w in ids:
        ledger.heartbeat(w, "ready", {}, -1, -1, device=device(0.01))
    assert ledger.status()["plan"]["ranges"] == [[0, 4]]
    for w in ids:
        ledger.heartbeat(w, "ready", {}, ledger.restore_epoch, 0)
    assert ledger.phase == "open" and set(ledger.status()["stages"][0]["members"]) == set(ids)
    return ledger, clock, ids


def _to_averaging(ledger: RunLedger, ids: list[str]) -> None:
    tickets, _ = ledger.lease(ids[0], 100)
    for t in tickets:
        assert ledger.commit(ids[0], t.id, t.attempt, 1.0, 128) == "committed"
    for w in ids:
        assert ledger.report(w, ledger.step, ledger.attempt, "contribution", 4.0, len(tickets) if w == ids[0] else 0)
    assert ledger.phase == "averaging"


def test_a_slow_averaging_round_is_timed_and_moves_the_plan_off_data_parallel(tmp_path):
    ledger, clock, ids = _data_parallel_ledger(tmp_path)
    _to_averaging(ledger, ids)
    clock.t += 30.0  # the round takes 30 s on the coordinator's clock
    assert ledger.report(ids[0], 0, 0, "averaged", 16.0, group_weight=4.0)
    workers = {w["id"]: w for w in ledger.status()["workers"]}
    assert all(workers[w]["averaging_mbit"] is None for w in ids)  # the stage has not finished its round
    assert ledger.report(ids[1], 0, 0, "averaged", 16.0, group_weight=4.0)
    want_mbit = averaging_rate_gbps(TINY, WORK, 0, 4, 2, 30.0) * 1e3
    workers = {w["id"]: w for w in ledger.status()["workers"]}
    assert [workers[w]["averaging_mbit"] for w in ids] == [pytest.approx(want_mbit)] * 2
    events = [e["detail"] for e in ledger.status()["events"] if e["kind"] == "measured"]
    assert any("averaged at" in d and "a round of 2 replicas" in d for d in events), events
    plan = ledger.status()["plan"]
    # priced at the measured rate, one stage costs 30 s a step more than the pipeline; the better
    # plan only shrinks each worker's range (no layer to load), and still waits for a checkpoint
    assert plan["ranges"] == [[0, 4]] and len(plan["pending_ranges"]) == 2, plan
    assert plan["predicted_step_s"] > 30  # the plan in force, priced again with the rate
    pending = plan["pending_ranges"]
    for w in ids:
        assert ledger.report(w, 0, 0, "applied", digest="d")
    ledger.record_checkpoint(1, ledger.plan[0], "step-1/0")
    plan = ledger.status()["plan"]
    assert plan["ranges"] == pending and plan["last_replan"]["at_restore"] and plan["predicted_step_s"] < 30


def test_a_round_that_took_no_time_sets_no_rate(tmp_path):
    """bench churn reports a step's rounds at one instant of its virtual clock: no rate may come
    of that."""
    ledger, clock, ids = _data_parallel_ledger(tmp_path)
    _to_averaging(ledger, ids)
    for w in ids:
        assert ledger.report(w, 0, 0, "averaged", 16.0, group_weight=4.0)
    assert all(w["averaging_mbit"] is None for w in ledger.status()["workers"])
    assert ledger.status()["plan"]["ranges"] == [[0, 4]] and not ledger.status()["plan"]["pending"]


def test_the_kept_rate_moves_halfway_to_each_round_in_ratio():
    assert smoothed_rate(None, 120.0) == 120.0  # the first round is all there is
    assert smoothed_rate(100.0, 400.0) == pytest.approx(200.0)  # halfway in ratio, not (100 + 400) / 2
    assert smoothed_rate(200.0, 50.0) == pytest.approx(100.0)
    for damaged in (0.0, -5.0, float("nan"), float("inf")):
        assert smoothed_rate(damaged, 80.0) == 80.0


def _round(ledger: RunLedger, clock: Clock, ids: list[str], seconds: float) -> None:
    """Step `ledger.step` through an averaging round of `seconds` on the coordinator's clock, applied."""
    _to_averaging(ledger, ids)
    clock.t += seconds
    step, attempt = ledger.step, ledger.attempt
    for w in ids:
        assert ledger.report(w, step, attempt, "averaged", 16.0, group_weight=4.0)
    for w in ids:
        assert ledger.report(w, step, attempt, "applied", digest="d")
    assert ledger.step == step + 1 and ledger.phase == "open"


def test_jitter_between_rounds_is_quiet_and_a_rate_that_falls_for_good_is_news(tmp_path):
    ledger, clock, ids = _data_parallel_ledger(tmp_path)

    def kept_mbit() -> list[float]:
        workers = {w["id"]: w for w in ledger.status()["workers"]}
        return [workers[w]["averaging_mbit"] for w in ids]

    def news() -> int:
        return sum("averaged at" in e["detail"] for e in ledger.status()["events"] if e["kind"] == "measured")

    _round(ledger, clock, ids, 30.0)
    first = averaging_rate_gbps(TINY, WORK, 0, 4, 2, 30.0) * 1e3
    assert kept_mbit() == [pytest.approx(first)] * 2 and news() == 1
    _round(ledger, clock, ids, 30.0 / 1.4)  # a round 40 % faster: the kept rate moves 18 %, under MOVED
    second = math.sqrt(first * first * 1.4)
    assert kept_mbit() == [pytest.approx(second)] * 2 and news() == 1
    assert ledger.measurements.averaging_gbps() == {w: pytest.approx(second / 1e3) for w in ids}  # what plans read
    _round(ledger, clock, ids, 4 * 30.0)  # a quarter of the first round's rate: -47 %, news at once
    assert kept_mbit() == [pytest.approx(math.sqrt(second * first / 4))] * 2 and news() == 2
