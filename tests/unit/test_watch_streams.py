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
