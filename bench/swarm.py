"""bench swarm: a 2-stage loopback swarm's tokens/s over train-local's (same model, batch, data),
and coordinator heartbeat latency with 500 simulated workers."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.swarm_run import run_swarm
from local_swarm import LocalSwarm

DESCRIPTION = "swarm vs train-local tokens/s on loopback; coordinator heartbeat p99 with 500 workers"


def local_tokens_per_s(steps: int) -> tuple[float, list[float]]:
    from gptjt_core.config import tiny_demo_config
    from gptjt_core.trainer import LocalTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = LocalTrainer(tiny_demo_config(), tmp)
        trainer.train_step()  # warm-up
        stats = [trainer.train_step() for _ in range(steps)]
    return statistics.median(s.tokens_per_s for s in stats), [s.loss for s in stats]


def swarm_tokens_per_s(steps: int, worker_threads: int) -> tuple[float, list[float]]:
    """Median per-step tokens/s of the demo run on a coordinator + 2 workers (first step excluded)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        status = run_swarm(Path(tmp_name), None, steps + 1, workers=2, threads=worker_threads, timeout_s=600)
    history = status["history"][1:]  # step 0 includes loading and channel warm-up
    return statistics.median(h["tokens"] / h["seconds"] for h in history), [h["loss"] for h in status["history"]]


async def _heartbeat_load(address: str, token: str, workers: int, seconds: float, interval: float) -> list[float]:
    import grpc

    from gptjt_proto import coordinator_pb2 as pb
    from gptjt_proto import coordinator_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.CoordinatorStub(channel)
    ids = []
    for i in range(workers):
        reply = await stub.Join(pb.JoinRequest(token=token, name=f"sim-{i}", address=f"127.0.0.1:{20000 + i}",
                                               device=pb.DeviceInfo(kind="cpu")))
        ids.append(reply.worker_id)
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def beat(worker_id: str, phase: float) -> None:
        await asyncio.sleep(phase)  # spread the workers over the interval, like real clocks
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            await stub.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, state=pb.STANDBY,
                                                     metrics=pb.WorkerMetrics(micro_batches_per_s=1.0)))
            latencies.append((time.perf_counter() - t0) * 1e3)
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

    await asyncio.gather(*(beat(w, interval * i / workers) for i, w in enumerate(ids)))
    await channel.close()
    return latencies


def heartbeat_latency_ms(workers: int, seconds: float, interval: float = 2.0) -> dict:
    """500 simulated workers (one client process) heartbeating a real coordinator process."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        swarm = LocalSwarm(tmp, state=tmp / "run.db")
        try:
            swarm.start_coordinator(steps=1, listen="127.0.0.1:0")
            latencies = asyncio.run(_heartbeat_load(swarm.address, swarm.token, workers, seconds, interval))
        finally:
            swarm.stop()
    latencies.sort()
    return {"coordinator_heartbeat_p50_ms": latencies[len(latencies) // 2],
            "coordinator_heartbeat_p99_ms": latencies[int(len(latencies) * 0.99)],
            "heartbeats_measured": len(latencies), "simulated_workers": workers}


def run(quick: bool = False) -> dict:
    steps = 5 if quick else 15
    local, local_losses = local_tokens_per_s(steps)
    swarm, swarm_losses = swarm_tokens_per_s(steps, worker_threads=2)
    result = {"swarm_vs_local_tokens_per_s": swarm / local, "swarm_tokens_per_s": swarm,
              "local_tokens_per_s": local, "steps_measured": steps,
              "same_losses": [round(x, 6) for x in swarm_losses[1:3]] == [round(x, 6) for x in local_losses[:2]]}
    result.update(heartbeat_latency_ms(500, 8.0 if quick else 30.0))
    return result
