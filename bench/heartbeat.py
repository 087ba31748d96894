"""bench heartbeat: latency of authenticated heartbeats from many simulated workers, under load.

A real coordinator process; one client process joins `workers` simulated workers (each with
its own session and stage-link certificate, as real workers have) and sends each one's
heartbeat every `interval` seconds, spread evenly, through a pool of channels, and holds its
Watch stream open (as a real worker does: a ledger change reaches every stream). While they beat,
a status poller calls Status every second and a dashboard client holds the live stream
(/api/stream) open, as an operator's screen would. heartbeat_p99_ms is the 99th percentile of
the heartbeat round trips, measured at the client (it includes the client's own scheduling,
which on 2 shared cores is part of the figure).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from local_swarm import LocalSwarm, small_run_toml

DESCRIPTION = "p99 of authenticated heartbeats from N simulated workers, with status polling and a dashboard open"

LOAD_CONFIG = """joins_per_s = 100000.0
join_burst = 100000
"""
CHANNELS = 64  # client connections the simulated workers share (real workers each open their own)


async def _join_all(stubs, token: str, n: int, pb) -> list[tuple[str, tuple]]:
    from gptjt_core.pki import new_key_pem, public_key_pem

    public = public_key_pem(new_key_pem()).decode()  # one key for every simulated worker: signing is what costs
    sem = asyncio.Semaphore(64)

    async def join(i: int):
        async with sem:
            reply = await stubs[i % len(stubs)].Join(pb.JoinRequest(
                token=token, name=f"sim-{i}", address=f"127.0.0.1:{20000 + i % 40000}", public_key_pem=public,
                device=pb.DeviceInfo(kind="cpu")), timeout=60)
            return reply.worker_id, (("gptjt-worker", reply.worker_id), ("gptjt-session", reply.session))

    return await asyncio.gather(*(join(i) for i in range(n)))


async def _watch_all(stubs, workers: list, pb, updates: list[int]) -> list[asyncio.Task]:
    """Every simulated worker holds its Watch stream open, as a real one does (a ledger change
    reaches all of them at once); `updates[0]` counts the RunStates they receive."""
    async def watch(i: int, worker_id: str, session: tuple) -> None:
        try:
            async for _ in stubs[i % len(stubs)].Watch(pb.WatchRequest(worker_id=worker_id), metadata=session):
                updates[0] += 1
        except Exception:  # cancelled at the end, or the coordinator went first
            pass

    return [asyncio.create_task(watch(i, w, s)) for i, (w, s) in enumerate(workers)]


async def _beat(stubs, workers: list, seconds: float, interval: float, pb) -> list[float]:
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def one(i: int, worker_id: str, session: tuple) -> None:
        await asyncio.sleep(interval * i / len(workers))  # spread over the interval, like real clocks
        stub = stubs[i % len(stubs)]
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            # as a worker on standby says it: no stage loaded (epoch and position -1)
            await stub.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, state=pb.STANDBY, loaded_epoch=-1,
                                                     position=-1, metrics=pb.WorkerMetrics(micro_batches_per_s=1.0)),
                                 metadata=session, timeout=30)
            latencies.append((time.perf_counter() - t0) * 1e3)
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

    await asyncio.gather(*(one(i, w, s) for i, (w, s) in enumerate(workers)))
    return latencies


async def _load(address: str, token: str, workers: int, seconds: float, interval: float) -> tuple[list, float, int]:
    import grpc

    from gptjt_proto import coordinator_pb2 as pb
    from gptjt_proto import coordinator_pb2_grpc as pb_grpc

    # A local subchannel pool each: gRPC otherwise shares one connection among channels to the
    # same target, and its Watch streams would exceed the coordinator's per-connection stream cap.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    stubs = [pb_grpc.CoordinatorStub(c) for c in channels]
    t0 = time.monotonic()
    joined = await _join_all(stubs, token, workers, pb)
    join_s = time.monotonic() - t0
    updates = [0]
    watches = await _watch_all(stubs, joined, pb, updates)
    latencies = await _beat(stubs, joined, seconds, interval, pb)
    for task in watches:
        task.cancel()
    await asyncio.gather(*watches, return_exceptions=True)
    for c in channels:
        await c.close()
    return latencies, join_s, updates[0]


class _Observers:
    """A status poller (Status every second) and a dashboard client (the SSE stream), in threads."""

    def __init__(self, address: str, dashboard_url: str):
        self.stop, self.polls, self.failures, self.events = threading.Event(), 0, 0, 0
        self.threads = [threading.Thread(target=self._poll, args=(address,), daemon=True),
                        threading.Thread(target=self._stream, args=(dashboard_url,), daemon=True)]
        for t in self.threads:
            t.start()

    def _poll(self, address: str) -> None:
        from local_swarm.swarm import fetch_status

        while not self.stop.wait(1.0):
            try:
                fetch_status(address, timeout=30)
                self.polls += 1
            except RuntimeError:  # reported as status_failures: a coordinator too busy to answer
                self.failures += 1

    def _stream(self, url: str) -> None:
        if not url:
            return
        with urllib.request.urlopen(url + "api/stream", timeout=60) as stream:
            for line in stream:
                if line.startswith(b"data: "):
                    self.events += 1
                if self.stop.is_set():
                    return

    def close(self) -> None:
        self.stop.set()


def measure(workers: int, seconds: float, interval: float = 2.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = small_run_toml(tmp, steps=1, timeout_s=max(30.0, 4 * interval), interval_s=interval,
                                extra=LOAD_CONFIG)
        swarm = LocalSwarm(tmp, config)
        try:
            swarm.start_coordinator()
            observers = _Observers(swarm.address, swarm.dashboard_url)
            try:
                latencies, join_s, watch_updates = asyncio.run(_load(swarm.address, swarm.token, workers, seconds,
                                                                     interval))
            finally:
                observers.close()
        finally:
            swarm.stop()
    latencies.sort()
    return {"heartbeat_p50_ms": round(statistics.median(latencies), 2),
            "heartbeat_p99_ms": round(latencies[int(len(latencies) * 0.99)], 2),
            "heartbeats_measured": len(latencies), "workers": workers, "interval_s": interval,
            "heartbeats_per_s": round(workers / interval, 1), "joins_s": round(join_s, 1),
            "status_polls": observers.polls, "status_failures": observers.failures, "dashboard_updates": observers.events, "watch_streams": workers,
            "watch_updates": watch_updates}


# Heartbeats a second one coordinator is sized for: 5,000 workers beat every 10 s
# (coordinator.heartbeat_interval_s = 10, heartbeat_timeout_s = 40; docs/deploy.md).
INTERVAL_5000_S = 10.0


def run(quick: bool = False) -> dict:
    result = measure(5000, 30.0 if quick else 90.0, interval=INTERVAL_5000_S)
    return {"benchmark": "heartbeat", **result, "goal_p99_ms": 10.0, "goal_met": result["heartbeat_p99_ms"] < 10.0}
