"""What the ledger keeps in memory between reads stays what the tables hold: the live workers'
addresses (AssignmentView.live_addresses, kept until WorkerRegistry.roster_version moves) and the
measured links (Measurements.link_views, kept in step with each write), and the meta values parsed
once per stored text (LedgerDB.shared_json_meta), through joins, deaths, moves, replaced
measurements, rollbacks and pruning."""

from __future__ import annotations

import pytest

from coordinator.ledger import RunLedger
from coordinator.scheduler import LinkView, plan_stages
from tests.unit.test_ledger import Clock
from tests.unit.test_scheduler import device, run_config
from tests.unit.test_vacancy_choice import SHAPE


def _ledger(tmp_path) -> RunLedger:
    return RunLedger(tmp_path / "run.db", run_config(stages=2, replicas=2), plan_stages(8, 2), Clock(), shape=SHAPE)


def _table_links(ledger: RunLedger) -> set[LinkView]:
    return {LinkView(r["src"], r["dst"], r["latency_ms"], r["mbit"])
            for r in ledger.db.execute("SELECT * FROM links").fetchall()}


def _table_addresses(ledger: RunLedger) -> list[tuple]:
    return [tuple(r) for r in ledger.workers.addresses()]


def _measure(ledger: RunLedger, worker_id: str, to: str, mbit: float) -> None:
    ledger.heartbeat(worker_id, "standby", {}, -1, -1, coordinator_rtt_ms=4.0,
                     links=[{"address": to, "latency_ms": 2.0, "mbit": mbit, "measured_unix_s": ledger.clock()}])


def test_live_addresses_follow_joins_moves_and_deaths(tmp_path):
    ledger = _ledger(tmp_path)
    views = ledger.views
    a = ledger.join("a", "h:a", device(0.01))["id"]
    assert [tuple(r) for r in views.live_addresses()] == _table_addresses(ledger)
    b = ledger.join("b", "h:b", device(0.01))["id"]
    c = ledger.join("c", "h:c", device(0.01))["id"]
    assert [tuple(r) for r in views.live_addresses()] == _table_addresses(ledger) and len(_table_addresses(ledger)) == 3
    ledger.leave(b)
    assert [r["id"] for r in views.live_addresses()] == [a, c]
    moved_to = 1 - ledger.workers.row(c)["stage"] if ledger.workers.row(c)["stage"] in (0, 1) else 0
    with ledger.db.tx():
        ledger.workers.assign(c, moved_to)
    assert [tuple(r) for r in views.live_addresses()] == _table_addresses(ledger)
    assert dict((r["id"], r["stage"]) for r in views.live_addresses())[c] == moved_to


@pytest.mark.parametrize("undo", ["transaction", "savepoint"])
def test_live_addresses_read_inside_a_write_that_is_undone_are_read_again(tmp_path, undo):
    ledger = _ledger(tmp_path)
    ledger.join("a", "h:a", device(0.01))
    with pytest.raises(RuntimeError):
        with ledger.db.tx():
            if undo == "transaction":
                ledger.workers.add("ghost", "h:ghost", {})
                assert len(ledger.views.live_addresses()) == 2  # read inside: the ghost is there
                raise RuntimeError("undo")
            try:
                with ledger.db.savepoint():
                    ledger.workers.add("ghost", "h:ghost", {})
                    assert len(ledger.views.live_addresses()) == 2
                    raise RuntimeError("undo")
            finally:
                assert len(ledger.views.live_addresses()) == 1  # the savepoint undid it: read again
    assert [tuple(r) for r in ledger.views.live_addresses()] == _table_addresses(ledger)


def test_link_views_follow_new_and_replaced_measurements_rollbacks_and_pruning(tmp_path):
    ledger = _ledger(tmp_path)
    a = ledger.join("a", "h:a", device(0.01))["id"]
    b = ledger.join("b", "h:b", device(0.01))["id"]
    assert ledger.measurements.link_views() == []
    _measure(ledger, a, "h:b", 100.0)
    _measure(ledger, b, "h:a", 50.0)
    assert set(ledger.measurements.link_views()) == _table_links(ledger)
    assert len(_table_links(ledger)) == 4  # two links, and each worker's to the coordinator
    _measure(ledger, a, "h:b", 10.0)  # re-measured: the new figure replaces the old
    assert set(ledger.measurements.link_views()) == _table_links(ledger)
    assert LinkView(a, "h:b", 2.0, 10.0) in ledger.measurements.link_views()
    with pytest.raises(RuntimeError):
        with ledger.db.tx():
            ledger.measurements.record(a, ledger.workers.row(a), None, [
                {"address": "h:b", "latency_ms": 9.0, "mbit": 1.0, "measured_unix_s": ledger.clock()}])
            raise RuntimeError("undo")
    assert set(ledger.measurements.link_views()) == _table_links(ledger)
    ledger.leave(a)
    with ledger.db.tx():
        ledger.run.coordinator.prune_after_s = 0.0
        ledger.clock.t += 1.0
        ledger.retention.prune()
    assert set(ledger.measurements.link_views()) == _table_links(ledger)
    assert {link.src for link in ledger.measurements.link_views()} == {b}


def test_shared_json_meta_is_parsed_once_per_text_and_follows_writes_and_rollbacks(tmp_path):
    ledger = _ledger(tmp_path)
    db = ledger.db
    assert db.shared_json_meta("standby_why", {}) == {}
    db.set_json_meta("standby_why", {"a": "too slow"})
    first = db.shared_json_meta("standby_why", {})
    assert first == {"a": "too slow"} and db.shared_json_meta("standby_why", {}) is first  # not parsed again
    with pytest.raises(RuntimeError):
        with db.tx():
            db.set_json_meta("standby_why", {"b": "far"})
            assert db.shared_json_meta("standby_why", {}) == {"b": "far"}  # read inside the write
            raise RuntimeError("undo")
    assert db.shared_json_meta("standby_why", {}) == {"a": "too slow"}  # the text the table holds again
    assert ledger.planner.standby_reasons() == {"a": "too slow"}
