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
