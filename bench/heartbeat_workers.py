"""bench heartbeat's simulated workers: one client process's share of them (bench/heartbeat.py).

The workers are spread over several processes, as real workers are each a process of their own.
In one process, 10,000 workers' gRPC calls and Watch streams left its event loop stalled for
100-430 ms at a time (a task sleeping 5 ms beside them, 2026-12-05), while the coordinator's
own loop was at most 15-48 ms late and its Heartbeat handler took 0.1 ms: the slowest round
trips were those started in those stalls, counted as the coordinator's latency.
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import time

from gptjt_core.heartbeat_pacing import next_heartbeat_in
from worker.heartbeat_stream import HeartbeatStream

from .heartbeat_trainer import PacedTrainer

GRACE_S = 5.0  # after the window, for its last round trips to come back


class SimulatedWorkers:
    """`n` workers as the coordinator sees real ones: each joins, holds its Watch stream open (a
    ledger change reaches every stream at once) and heartbeats every `interval` seconds from
    the moment it joined (the timeout runs from the join), each beat a message of its heartbeat
    stream (worker/heartbeat_stream.py). A heartbeat that fails is counted and the next one goes
    at the next tick, on a new stream, as worker/runner.py does. Round trips are recorded by
    when they started: in the window that opens one interval after the last join (the figure),
    or before it (`joining_latencies`: 10,000 joins at once, as after a coordinator restart or
    a failover, each signing a certificate)."""

    def __init__(self, stubs, token: str, ids: range, interval: float, pb, joins_in_flight: int):
        """ids: the workers' numbers (names sim-i) this process plays; joins_in_flight: its share of
        the joins all processes have under way at once."""
        from gptjt_core.pki import new_key_pem, public_key_pem

        self.stubs, self.token, self.ids, self.interval, self.pb = stubs, token, ids, interval, pb
        self.public = public_key_pem(new_key_pem()).decode()  # one key for all of them: signing is what costs
        self.joining = asyncio.Semaphore(joins_in_flight)
        self.latencies: list[float] = []  # ms, heartbeats started in the window
        self.joining_latencies: list[float] = []  # ms, heartbeats started before the last join
        self.watch_updates, self.joined, self.in_flight_at_end = 0, 0, 0
        self.failures: dict[str, int] = {}  # failed heartbeats, and Watch streams that ended, by status
        self.window_failures = 0  # failed heartbeats that started in the window
        self.window = (math.inf, math.inf)  # monotonic seconds: when a started round trip counts

    async def run(self, seconds: float, everyone_joined) -> float:
        """Until `seconds` after the last join of every process (`everyone_joined`: a barrier of
        all of them); returns how long the joins took."""
        t0 = time.monotonic()
        all_joined = asyncio.Event()
        lives = [asyncio.create_task(self._life(i, all_joined)) for i in self.ids]
        await all_joined.wait()
        await asyncio.to_thread(everyone_joined.wait, 600)  # BrokenBarrierError if another process failed
        join_s = time.monotonic() - t0
        # Thousands of workers share this process, each a process in life: a full collection of
        # its ~10^5-10^6 objects would stall all of them at once and be counted against the
        # coordinator. What exists now is left out of collections until the end. The young
        # collections stop too: with 2,500 workers' calls alive in one process, a generation-1
        # pass took 20-104 ms and a generation-0 one up to 30 ms, and every one in the window
        # collected 0 objects (gc callbacks, 2026-12-05): the stalls were this load generator's,
        # counted as the coordinator's latency, and freed nothing.
        gc.freeze()
        gc.disable()
        # The window opens one interval after the last join: by then every worker has beaten once
        # since the joins ended, and what the join storm left queued has drained (its round
        # trips are joining_latencies). Its last round trips get GRACE_S to come back.
        settle = self.interval
        self.window = (time.monotonic() + settle, time.monotonic() + settle + seconds)
        await asyncio.sleep(settle + seconds + GRACE_S)
        for life in lives:
            life.cancel()
        await asyncio.gather(*lives, return_exceptions=True)
        gc.enable()
        gc.unfreeze()
        return join_s

    async def _life(self, i: int, all_joined: asyncio.Event) -> None:
        pb, stub = self.pb, self.stubs[i % len(self.stubs)]
        async with self.joining:
            reply = await stub.Join(pb.JoinRequest(
                token=self.token, name=f"sim-{i}", address=f"127.0.0.1:{20000 + i % 40000}",
                public_key_pem=self.public, device=pb.DeviceInfo(kind="cpu")), timeout=120)
        self.joined += 1
        if self.joined == len(self.ids):
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
        pb, stream = self.pb, HeartbeatStream()  # the stream a real worker beats on (worker/membership.py)
        # as a worker on standby says it: no stage loaded (epoch and position -1)
        request = pb.HeartbeatRequest(worker_id=worker_id, state=pb.STANDBY, loaded_epoch=-1, position=-1,
                                      metrics=pb.WorkerMetrics(micro_batches_per_s=1.0))
        await asyncio.sleep(random.uniform(0, self.interval))  # clocks of real workers are spread
        while True:
            t0, started = time.perf_counter(), time.monotonic()
            in_window = self.window[0] <= started <= self.window[1]
            try:
                await stream.beat(stub, session, request, timeout_s=30)
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
            await asyncio.sleep(next_heartbeat_in(self.interval, time.perf_counter() - t0))  # as worker/runner.py

    async def _watch(self, stub, worker_id: str, session: tuple) -> None:
        try:
            async for _ in stub.Watch(self.pb.WatchRequest(worker_id=worker_id), metadata=session):
                self.watch_updates += 1
        except asyncio.CancelledError:  # the end of the run
            raise
        except Exception as e:
            self._failed("watch", e)


async def _load(address: str, token: str, ids: range, seconds: float, interval: float, train: dict | None,
                joins_in_flight: int, channels_n: int, trainer_joined, everyone_joined) -> dict:
    import grpc

    from gptjt_proto import coordinator_pb2 as pb
    from gptjt_proto import coordinator_pb2_grpc as pb_grpc

    # A local subchannel pool each: gRPC otherwise shares one connection among channels to the
    # same target, and its Watch streams would exceed the coordinator's per-connection stream cap.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(channels_n + 1)]
    sims = SimulatedWorkers([pb_grpc.CoordinatorStub(c) for c in channels[1:]], token, ids, interval, pb,
                            joins_in_flight)
    trainer, training, stop = None, None, asyncio.Event()
    if train is not None:
        trainer = PacedTrainer(pb_grpc.CoordinatorStub(channels[0]), pb, token, sims.public, train["step_s"],
                               train["micro_batches"], interval_s=interval)
        await trainer.join()  # first: the run's one stage is its
        trainer_joined.set()
        training = asyncio.create_task(trainer.run(stop))
    elif not await asyncio.to_thread(trainer_joined.wait, 300):
        raise RuntimeError("the trainer's process did not join it within 300 s")
    join_s = await sims.run(seconds, everyone_joined)
    stop.set()
    if training is not None:
        await training
    for c in channels:
        await c.close()
    return {"latencies": sims.latencies, "joining_latencies": sims.joining_latencies, "join_s": join_s,
            "window": list(sims.window),  # monotonic s: one clock for every process on the machine
            "window_failures": sims.window_failures, "in_flight_at_end": sims.in_flight_at_end,
            "watch_updates": sims.watch_updates, "failures": sims.failures,
            "trained": trainer.rates() if trainer is not None else {}}


def client_process(address: str, token: str, ids: range, seconds: float, interval: float, train: dict | None,
                   joins_in_flight: int, channels_n: int, trainer_joined, everyone_joined, results) -> None:
    """One client process (started with spawn): its workers' figures on `results`, or the error
    that stopped them (the parent raises it)."""
    try:
        results.put(asyncio.run(_load(address, token, ids, seconds, interval, train, joins_in_flight, channels_n,
                                      trainer_joined, everyone_joined)))
    except BaseException as e:  # the parent must not wait for figures that will never come
        everyone_joined.abort()
        results.put({"error": f"{type(e).__name__}: {e}"})
        raise
