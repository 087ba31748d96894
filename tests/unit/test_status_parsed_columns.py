"""A status build parses each distinct device and metrics text once (coordinator/ledger/stored_values.py
ParsedColumns): what it shows must still follow every change, and what it keeps must follow the swarm."""

from __future__ import annotations

from coordinator.ledger.stored_values import ParsedColumns
from tests.unit.test_ledger import make, ready_swarm


def test_a_text_is_parsed_once_and_a_new_text_shows_at_once():
    parsed = ParsedColumns()
    parsed.next_build()
    first = parsed.metrics('{"micro_batches_per_s": 1.5, "busy_fraction": 0.5}')
    assert first == {"micro_batches_per_s": 1.5, "busy_fraction": 0.5}
    assert parsed.metrics('{"micro_batches_per_s": 1.5, "busy_fraction": 0.5}') is first  # a second worker, same text
    parsed.next_build()
    assert parsed.metrics('{"micro_batches_per_s": 1.5, "busy_fraction": 0.5}') is first  # the next build, same text
    assert parsed.metrics('{"micro_batches_per_s": 2.0}') == {"micro_batches_per_s": 2.0}


def test_only_the_texts_the_last_build_read_are_kept():
    parsed = ParsedColumns()
    parsed.next_build()
    gone = parsed.device('{"kind": "cuda", "memory_gb": 24}')
    parsed.next_build()  # a build that did not read that text
    parsed.next_build()
    again = parsed.device('{"kind": "cuda", "memory_gb": 24}')
    assert again == gone and again is not gone  # parsed anew: it was let go
    assert len(parsed._now) == 1 and not parsed._last


def test_bad_texts_still_read_as_their_defaults():
    parsed = ParsedColumns()
    parsed.next_build()
    assert parsed.device("not json") == {} and parsed.device("[1, 2]") == {} and parsed.device(None) == {}
    assert parsed.metrics('{"micro_batches_per_s": NaN, "busy_fraction": 0.5}') == {"busy_fraction": 0.5}


def test_the_status_shows_each_workers_latest_metrics_across_builds(tmp_path):
    ledger = make(tmp_path)
    a, b = ready_swarm(ledger, 2)
    same = {"micro_batches_per_s": 1.0, "busy_fraction": 0.25}
    ledger.heartbeat(a, "ready", same, ledger.restore_epoch, ledger.step)
    ledger.heartbeat(b, "ready", same, ledger.restore_epoch, ledger.step)
    shown = {w["id"]: w["metrics"] for w in ledger.status()["workers"]}
    assert shown[a] == shown[b] == same
    ledger.heartbeat(b, "ready", {"micro_batches_per_s": 3.0, "busy_fraction": 0.75}, ledger.restore_epoch, ledger.step)
    shown = {w["id"]: w["metrics"] for w in ledger.status()["workers"]}
    assert shown[a] == same and shown[b] == {"micro_batches_per_s": 3.0, "busy_fraction": 0.75}
