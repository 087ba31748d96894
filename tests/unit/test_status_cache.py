"""The shared status: as new as the ledger its caller could have seen, built within its share of time."""

from __future__ import annotations

import asyncio
import json

from coordinator.status_cache import StatusCache
from gptjt_core.status_gzip import gunzip_status
from tests.unit.test_scheduler import device, make_ledger


def test_a_status_asked_for_after_a_write_shows_it_and_waits_for_the_build_budget(tmp_path):
    ledger = make_ledger(tmp_path)
    ledger.join("first", "h:1", device(0.004))
    cache = StatusCache(ledger, max_age_s=600, build_share=0.05)  # builds 5 % of the time: the next waits 19x one
    try:
        async def scenario():
            await cache.get()
            first_started, next_allowed = cache._built[1], cache._next_build_s
            again = await cache.get()  # nothing written since: the same build, at once
            assert cache.builds == 1
            ledger.join("late", "h:2", device(0.004))
            status = json.loads(await cache.get())
            assert json.loads(gunzip_status(await cache.gzipped())) == status  # the same build, gzipped
            assert cache.builds == 2
            return first_started, next_allowed, cache._built[1], again, status

        first_started, next_allowed, second_started, again, status = asyncio.run(scenario())
    finally:
        cache.close()
    assert cache.builds == 2
    assert {w["name"] for w in status["workers"]} == {"first", "late"}  # the write the caller made is in it
    took = (next_allowed - first_started) * 0.05
    assert took > 0 and second_started >= next_allowed  # spaced: built no earlier than the budget allowed
    assert second_started - first_started >= took / 0.05 - 1e-6
    assert json.loads(again)["workers"][0]["name"] == "first"


def test_metrics_are_rendered_only_when_asked_for_and_show_what_the_caller_wrote(tmp_path):
    ledger = make_ledger(tmp_path)
    ledger.join("first", "h:1", device(0.004))
    cache = StatusCache(ledger, max_age_s=600, build_share=1.0)
    try:
        async def scenario():
            body = await cache.get()  # JSON only: no metrics text comes with a build
            ledger.join("late", "h:2", device(0.004))
            return body, (await cache.metrics()).decode(), cache.builds

        body, metrics, builds = asyncio.run(scenario())
    finally:
        cache.close()
    assert b"gptjt_worker_info" not in body
    assert builds == 2  # the join made the status the metrics came from a new one
    assert 'name="late"' in metrics and 'name="first"' in metrics


def test_a_status_build_renders_no_metrics_and_a_scrape_renders_the_last_build(tmp_path):
    """In-process, the status process's answers: builds never touch prometheus_client; a scrape
    renders the status the last build made (the cache has just made sure it is new enough)."""
    from coordinator.ledger.reader import LedgerReader
    from coordinator.status_process import StatusBuilds

    ledger = make_ledger(tmp_path)
    ledger.join("first", "h:1", device(0.004))
    builds = StatusBuilds(LedgerReader(ledger.path, ledger.run, ledger.planner.plan, ledger.shape))
    rendered = []
    render = builds.render_metrics
    builds.render_metrics = lambda get: rendered.append(get()) or render(get)
    body, gzipped = builds.answer("build")
    assert json.loads(body)["workers"][0]["name"] == "first" and gunzip_status(gzipped) == body
    ledger.join("late", "h:2", device(0.004))
    builds.answer("build")
    assert rendered == []  # two builds, no metrics
    (text,) = builds.answer("metrics")
    text = text.decode()
    assert len(rendered) == 1 and rendered[0] is builds.status  # the last build's object, not a new one
    assert 'name="late"' in text


def test_answers_of_any_size_come_back_whole_through_the_status_process_file(tmp_path):
    """The status process writes each answer into a file and says its length (status_process.py):
    a long /metrics text, then a shorter status, then a status that grew, each exactly as built."""
    from coordinator.status_process import StatusBuildFailed, StatusProcess, _read_answer

    ledger = make_ledger(tmp_path)
    for i in range(300):
        ledger.join(f"w{i}", f"h:{i}", device(0.004))
    process = StatusProcess(ledger.path, ledger.run, ledger.planner.plan, ledger.shape)
    try:
        metrics, _ = process.metrics()
        (status, gzipped), _ = process.build()
        assert len(metrics) > len(status) > 50_000  # the file held more than this answer
        assert len(json.loads(status)["workers"]) == 300  # no bytes of the longer answer after it
        assert gunzip_status(gzipped) == status  # the second part starts where the first ends
        ledger.join("late", "h:late", device(0.004))
        (grown, gzipped), _ = process.build()
        assert len(json.loads(grown)["workers"]) == 301 and b"# HELP" in metrics
        assert gunzip_status(gzipped) == grown
    finally:
        process.close()
    with open(tmp_path / "short", "wb+") as f:
        f.write(b"{}")
        f.flush()
        try:
            _read_answer(f.fileno(), [1, 10])
        except StatusBuildFailed as e:
            assert "11 bytes" in str(e) and "holds 2" in str(e)
        else:
            raise AssertionError("a short answer file was read as whole")
