"""Watch streams: a change reaches every stream, a quiet write none, an unchanged state is not re-sent."""

from __future__ import annotations

import asyncio

from coordinator.watch_streams import WatchStreams


def test_a_change_reaches_every_stream_once_and_quiet_writes_reach_none():
    async def scenario():
        ledger = {"version": 0, "phase": "open"}
        streams = WatchStreams(lambda: ledger["version"])
        reads, got = [0], [[] for _ in range(50)]
        stop = asyncio.Event()

        def read():
            reads[0] += 1
            return {"phase": ledger["phase"]}

        async def follow(i):
            async for state in streams.states(read, stop.is_set):
                got[i].append(state["phase"])

        tasks = [asyncio.create_task(follow(i)) for i in range(50)]
        await asyncio.sleep(0.05)
        assert streams.open == 50 and all(g == ["open"] for g in got)
        first_reads = reads[0]
        await streams.notify()  # the version did not move (a quiet write): nobody reads
        await asyncio.sleep(0.05)
        assert reads[0] == first_reads
        ledger.update(version=1, phase="accumulated")
        await streams.notify()
        await asyncio.sleep(0.1)  # 50 streams / 5000 reads a second: within 10 ms
        assert all(g == ["open", "accumulated"] for g in got)
        assert reads[0] == 2 * first_reads  # one read per stream per change
        ledger["version"] = 2  # moved, but the state each shows is the same: nothing re-sent
        await streams.notify()
        await asyncio.sleep(0.1)
        assert all(len(g) == 2 for g in got)
        stop.set()
        ledger["version"] = 3
        await streams.notify()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert streams.open == 0

    asyncio.run(scenario())


def test_standby_streams_wake_only_when_what_a_standby_acts_on_changes():
    """10 placed streams and 40 standby ones: a closed step (the version moves, the standby key
    does not) is read by the placed streams only; a new plan (the key moves) by all of them."""
    async def scenario():
        ledger = {"version": 0, "step": 0, "plan": 1}
        streams = WatchStreams(lambda: ledger["version"], lambda: ledger["plan"])
        reads, got = [0] * 50, [[] for _ in range(50)]
        stop = asyncio.Event()

        def reader(i):
            def read():
                reads[i] += 1
                return {"step": ledger["step"], "plan": ledger["plan"], "stage": i if i < 10 else -1}
            return read

        async def follow(i):
            async for state in streams.states(reader(i), stop.is_set, lambda s: s["stage"] < 0):
                got[i].append((state["step"], state["plan"]))

        tasks = [asyncio.create_task(follow(i)) for i in range(50)]
        await asyncio.sleep(0.05)
        assert reads == [1] * 50
        ledger.update(version=1, step=1)  # a step closed: nothing a standby acts on
        await streams.notify()
        await asyncio.sleep(0.1)
        assert reads == [2] * 10 + [1] * 40
        assert all(g == [(0, 1), (1, 1)] for g in got[:10]) and all(g == [(0, 1)] for g in got[10:])
        ledger.update(version=2, plan=2)  # a new plan: every stream reads and sends it
        await streams.notify()
        await asyncio.sleep(0.1)
        assert reads == [3] * 10 + [2] * 40
        assert all(g[-1] == (1, 2) for g in got)
        stop.set()
        ledger.update(version=3, plan=3)
        await streams.notify()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)

    asyncio.run(scenario())


def test_standby_streams_woken_together_spread_their_reads_at_the_standby_rate(monkeypatch):
    """40 standbys woken by one change, at 100 reads a second: over ~0.4 s, not all at once (at
    10,000 workers, packed into 1 s, they held the coordinator's loop for ~3 s)."""
    import coordinator.watch_streams as watch_streams

    monkeypatch.setattr(watch_streams, "STANDBY_READS_PER_S", 100.0)

    async def scenario():
        ledger = {"version": 0, "plan": 1}
        streams = WatchStreams(lambda: ledger["version"], lambda: ledger["plan"])
        read_at: list[float] = []
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def read():
            read_at.append(loop.time())
            return {"plan": ledger["plan"], "stage": -1}

        async def follow():
            async for _ in streams.states(read, stop.is_set, lambda s: s["stage"] < 0):
                pass

        tasks = [asyncio.create_task(follow()) for _ in range(40)]
        await asyncio.sleep(0.1)
        assert len(read_at) == 40 and streams.standby_waiting == 40
        read_at.clear()
        ledger.update(version=1, plan=2)
        woke = loop.time()
        await streams.notify()
        assert streams.standby_woken == 40
        for _ in range(100):  # all of them read, within ~0.4 s (a slow machine: up to 5 s)
            if len(read_at) == 40:
                break
            await asyncio.sleep(0.05)
        stop.set()
        ledger.update(version=2, plan=3)
        await streams.notify()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return [t - woke for t in read_at]

    after = sorted(asyncio.run(scenario())[:40])
    assert len(after) == 40
    assert after[-1] - after[0] > 0.15  # spread out: 40 draws over 0.4 s (uniform: ~0.38 s apart)
    assert sum(1 for t in after if t < 0.1) < 30  # ~10 of 40 in the first quarter, not all


def test_a_stream_rereads_when_its_refresh_is_due_and_a_closed_stream_leaves_no_waiter(monkeypatch):
    """No ledger change: each stream reads again at its refresh time (links due for measuring age
    by the clock alone), and a stream that ends takes its wait with it."""
    import coordinator.watch_streams as watch_streams

    monkeypatch.setattr(watch_streams, "REFRESH_S", 0.1)  # each refresh after 0.05-0.1 s

    async def scenario():
        streams = WatchStreams(lambda: 0, lambda: None)
        reads = [0, 0]
        stop = asyncio.Event()

        def reader(i):
            def read():
                reads[i] += 1
                return {"reads": reads[i], "stage": i - 1}  # stream 0 standby, stream 1 placed
            return read

        async def follow(i):
            async for _ in streams.states(reader(i), stop.is_set, lambda s: s["stage"] < 0):
                pass

        tasks = [asyncio.create_task(follow(i)) for i in range(2)]
        await asyncio.sleep(0.5)
        assert all(n >= 4 for n in reads), reads  # ~5-10 refreshes each in 0.5 s
        assert streams.standby_waiting == 1
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert streams.standby_waiting == 0 and not streams._placed_waiting and streams.open == 0

    asyncio.run(scenario())


def test_a_standby_is_sent_a_state_only_when_what_it_acts_on_moves(monkeypatch):
    """Refreshes of a standby stream that find only the step moved send nothing; a move of what
    a standby acts on (its standby_view) is sent, and a placed stream is sent every move."""
    import coordinator.watch_streams as watch_streams

    monkeypatch.setattr(watch_streams, "REFRESH_S", 0.05)  # each refresh after 0.025-0.05 s

    async def scenario():
        streams = WatchStreams(lambda: 0, lambda: None)
        run = {"step": 0, "links": ()}
        stop = asyncio.Event()
        got: list[list[dict]] = [[], []]

        def reader(stage):
            return lambda: {"step": run["step"], "links": run["links"], "stage": stage}

        async def follow(i, stage):
            async for state in streams.states(reader(stage), stop.is_set, lambda s: s["stage"] < 0,
                                              lambda s: s["links"]):
                got[i].append(state)

        tasks = [asyncio.create_task(follow(0, -1)), asyncio.create_task(follow(1, 0))]
        await asyncio.sleep(0.05)
        for step in range(1, 4):
            run["step"] = step
            await asyncio.sleep(0.15)  # a few refreshes each
        assert [s["step"] for s in got[0]] == [0]  # the standby: its first state only
        assert [s["step"] for s in got[1]] == [0, 1, 2, 3]  # the placed stream: every step
        run["links"] = ("10.0.0.1:1",)
        await asyncio.sleep(0.15)
        assert [(s["step"], s["links"]) for s in got[0]] == [(0, ()), (3, ("10.0.0.1:1",))]
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
