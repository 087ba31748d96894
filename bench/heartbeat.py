"""bench heartbeat: latency of authenticated heartbeats from many simulated workers, under load.

A real coordinator process; one client process first joins a stage worker that trains steps
with leases, commits and step reports (bench/heartbeat_trainer.py), then `workers` simulated
standby workers (each with
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
import gc
import math
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from local_swarm import LocalSwarm, small_run_toml

from .heartbeat_trainer import PacedTrainer

DESCRIPTION = "p99 of authenticated heartbeats from N simulated workers, with status polling and a dashboard open"

LOAD_CONFIG = """joins_per_s = 100000.0
join_burst = 100000
"""
# Client connections the simulated workers share (real workers each open their own): at 10,000
# workers 40 Watch streams each, well under the coordinator's 256 streams a connection even with heartbeats queued.
CHANNELS = 250
GRACE_S = 5.0  # after the window, for its last round trips to come back
# The training that flows meanwhile (bench/heartbeat_trainer.py): a step every 10 s of 64 micro-batches,
# each leased and committed. bench churn's GPT-J 6B plans at 1,000 volunteers predict ~95 s a step,
# so this closes steps (which wake every placed worker's Watch stream) ~10x as often as such a run would.
TRAIN_STEP_S, TRAIN_MICRO_BATCHES = 10.0, 64


class _SimulatedWorkers:
    """`n` workers as the coordinator sees real ones: each joins, holds its Watch stream open (a
    ledger change reaches every stream at once) and heartbeats every `interval` seconds from
    the moment it joined (the timeout runs from the join). A heartbeat that fails is counted and
    the next one goes at the next tick, as worker/runner.py does. Round trips are recorded by
    when they started: in the window that opens one interval after the last join (the figure),
    or before it (`joining_latencies`: 10,000 joins at once, as after a coordinator restart or
    a failover, each signing a certificate)."""

    def __init__(self, stubs, token: str, n: int, interval: float, pb):
        from gptjt_core.pki import new_key_pem, public_key_pem

        self.stubs, self.token, self.n, self.interval, self.pb = stubs, token, n, interval, pb
        self.public = public_key_pem(new_key_pem()).decode()  # one key for all of them: signing is what costs
        self.joining = asyncio.Semaphore(64)
        self.latencies: list[float] = []  # ms, heartbeats started in the window
        self.joining_latencies: list[float] = []  # ms, heartbeats started before the last join
        self.watch_updates, self.joined, self.in_flight_at_end = 0, 0, 0
        self.failures: dict[str, int] = {}  # failed heartbeats, and Watch streams that ended, by status
        self.window_failures = 0  # failed heartbeats that started in the window
        self.window = (math.inf, math.inf)  # monotonic seconds: when a started round trip counts

    async def run(self, seconds: float) -> float:
        """Until `seconds` after the last join; returns how long the joins took."""
        t0 = time.monotonic()
        all_joined = asyncio.Event()
        lives = [asyncio.create_task(self._life(i, all_joined)) for i in range(self.n)]
        await all_joined.wait()
        join_s = time.monotonic() - t0
        # The simulated workers are one process here, 10,000 processes in life: a full collection
        # of this process's ~1M objects would stall all of them at once and be counted against
        # the coordinator. What exists now is left out of collections until the end.
        gc.freeze()
        # The window opens one interval after the last join: by then every worker has beaten once
        # since the joins ended, and what the join storm left queued has drained (its round
        # trips are joining_latencies). Its last round trips get GRACE_S to come back.
        settle = self.interval
        self.window = (time.monotonic() + settle, time.monotonic() + settle + seconds)
        await asyncio.sleep(settle + seconds + GRACE_S)
        for life in lives:
            life.cancel()
        await asyncio.gather(*lives, return_exceptions=True)
        gc.unfreeze()
        return join_s

    async def _life(self, i: int, all_joined: asyncio.Event) -> None:
        pb, stub = self.pb, self.stubs[i % len(self.stubs)]
        async with self.joining:
            reply = await stub.Join(pb.JoinRequest(
                token=self.token, name=f"sim-{i}", address=f"127.0.0.1:{20000 + i % 40000}",
                public_key_pem=self.public, device=pb.DeviceInfo(kind="cpu")), timeout=120)
        self.joined += 1
        if self.joined == self.n:
            all_joined.set()
        session = (("gptjt-worker", reply.worker_id), ("gptjt-session", reply.session))
        watch = asyncio.create_task(self._watch(stub, reply.worker_id, session))
        try:
            await self._beat(stub, reply.worker_id, session)
        finally:
            watch.cancel()

    def _failed(self, what: str, error: BaseException) -> None:
        code = error.code().name if hasattr(error, "code") else type(error).__name__
        details = error.details() if hasattr(error, "details") else str(error)
        key = f"{what}: {code} ({details[:80]})" if details else f"{what}: {code}"
        self.failures[key] = self.failures.get(key, 0) + 1

    async def _beat(self, stub, worker_id: str, session: tuple) -> None:
        pb = self.pb
        await asyncio.sleep(random.uniform(0, self.interval))  # clocks of real workers are spread
        while True:
            t0, started = time.perf_counter(), time.monotonic()
            in_window = self.window[0] <= started <= self.window[1]
            try:
                # as a worker on standby says it: no stage loaded (epoch and position -1)
                await stub.Heartbeat(pb.HeartbeatRequest(
                    worker_id=worker_id, state=pb.STANDBY, loaded_epoch=-1, position=-1,
                    metrics=pb.WorkerMetrics(micro_batches_per_s=1.0)), metadata=session, timeout=30)
            except asyncio.CancelledError:
                self.in_flight_at_end += in_window  # the run ended with this round trip still out
                raise
            except Exception as e:  # counted; the next heartbeat goes at the next tick (worker/runner.py)
                self._failed("heartbeat", e)
                self.window_failures += in_window
            else:
                ms = (time.perf_counter() - t0) * 1e3
                if in_window:
                    self.latencies.append(ms)
                elif started < self.window[0]:
                    self.joining_latencies.append(ms)
            await asyncio.sleep(max(0.0, self.interval - (time.perf_counter() - t0)))

    async def _watch(self, stub, worker_id: str, session: tuple) -> None:
        try:
            async for _ in stub.Watch(self.pb.WatchRequest(worker_id=worker_id), metadata=session):
                self.watch_updates += 1
        except asyncio.CancelledError:  # the end of the run
            raise
        except Exception as e:
            self._failed("watch", e)


async def _load(address: str, token: str, workers: int, seconds: float, interval: float,
                train: dict) -> tuple[_SimulatedWorkers, float, dict]:
    import grpc

    from gptjt_proto import coordinator_pb2 as pb
    from gptjt_proto import coordinator_pb2_grpc as pb_grpc

    # A local subchannel pool each: gRPC otherwise shares one connection among channels to the
    # same target, and its Watch streams would exceed the coordinator's per-connection stream cap.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS + 1)]
    sims = _SimulatedWorkers([pb_grpc.CoordinatorStub(c) for c in channels[1:]], token, workers, interval, pb)
    trainer = PacedTrainer(pb_grpc.CoordinatorStub(channels[0]), pb, token, sims.public, train["step_s"],
                           train["micro_batches"], interval_s=interval)
    await trainer.join()  # first: the run's one stage is its
    stop = asyncio.Event()
    training = asyncio.create_task(trainer.run(stop))
    join_s = await sims.run(seconds)
    stop.set()
    await training
    for c in channels:
        await c.close()
    return sims, join_s, trainer.rates()


class _Observers:
    """A status poller (Status every second) and a dashboard client (the SSE stream), in threads."""

    def __init__(self, address: str, dashboard_url: str):
        self.stop, self.polls, self.failures, self.events = threading.Event(), 0, 0, 0
        self.failure_reasons: set[str] = set()
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
            except RuntimeError as e:  # reported as status_failures: a coordinator too busy to answer
                self.failures += 1
                self.failure_reasons.add(str(e).rsplit(": ", 1)[-1])

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


def measure(workers: int, seconds: float, interval: float = 2.0, train_step_s: float = TRAIN_STEP_S) -> dict:
    """`workers` standby workers heartbeating every `interval` s, and one stage worker training a step
    every `train_step_s` s (TRAIN_MICRO_BATCHES micro-batches each) through the same coordinator."""
    train = {"step_s": train_step_s, "micro_batches": TRAIN_MICRO_BATCHES}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = small_run_toml(tmp, steps=1_000_000, num_stages=1, global_batch=2 * TRAIN_MICRO_BATCHES,
                                micro_batch=2, timeout_s=max(30.0, 4 * interval), interval_s=interval,
                                extra=LOAD_CONFIG)
        swarm = LocalSwarm(tmp, config)
        try:
            swarm.start_coordinator()
            observers = _Observers(swarm.address, swarm.dashboard_url)
            try:
                sims, join_s, trained = asyncio.run(_load(
                    swarm.address, swarm.token, workers, seconds, interval, train))
            finally:
                observers.close()
        finally:
            swarm.stop()
    latencies, joining = sorted(sims.latencies), sorted(sims.joining_latencies)
    return {"heartbeat_p50_ms": round(statistics.median(latencies), 2), "heartbeat_p99_ms": _p99(latencies),
            "heartbeats_measured": len(latencies), "heartbeat_failures": sims.window_failures,
            "heartbeats_unfinished": sims.in_flight_at_end, "workers": workers, "interval_s": interval,
            "heartbeats_per_s": round(workers / interval, 1), "joins_s": round(join_s, 1),
            "joining_heartbeat_p99_ms": _p99(joining), "joining_heartbeats": len(joining),
            "status_polls": observers.polls, "status_failures": observers.failures,
            "status_failure_codes": sorted(observers.failure_reasons), "dashboard_updates": observers.events,
            "watch_streams": workers, "watch_updates": sims.watch_updates,
            "train_step_s": train_step_s, "train_micro_batches_per_step": TRAIN_MICRO_BATCHES, **trained,
            "failures": sims.failures}


def _p99(sorted_ms: list[float]) -> float | None:
    return round(sorted_ms[int(len(sorted_ms) * 0.99)], 2) if sorted_ms else None


# Heartbeats a second one coordinator is sized for: 500 (deploy/README.md, "Size"): 10,000 workers
# beat every 20 s (coordinator.heartbeat_interval_s = 20, heartbeat_timeout_s = 80).
WORKERS, INTERVAL_S = 10_000, 20.0


def settings(quick: bool) -> dict:
    return {"workers": WORKERS, "interval_s": INTERVAL_S, "window_s": 30.0 if quick else 90.0,
            "channels": CHANNELS, "status_poller": True, "dashboard_stream": True,
            "train_step_s": TRAIN_STEP_S, "train_micro_batches": TRAIN_MICRO_BATCHES}


def run(quick: bool = False) -> dict:
    result = measure(WORKERS, 30.0 if quick else 90.0, interval=INTERVAL_S)
    return {"benchmark": "heartbeat", **result, "goal_p99_ms": 10.0, "goal_met": result["heartbeat_p99_ms"] < 10.0}
