"""bench heartbeat's training: one simulated worker that holds the run's stage and trains steps at a
set pace over the real coordinator API, so that leases, commits and step reports flow while the
simulated standby workers heartbeat (bench/heartbeat.py).

It does what a real single-stage worker does, minus the compute: heartbeats READY at the
restore epoch and its step position, leases up to `in_flight` micro-batches, commits each one
after `step_s / micro_batches` seconds (its tickets spread over the step, as a pipeline's
commits are), then reports its contribution and, once the coordinator applies, its update.
Every closed step moves the run's state, which reaches every Watch stream, as in a real run.
"""

from __future__ import annotations

import asyncio
import time

from worker.heartbeat_stream import HeartbeatStream


class PacedTrainer:
    """The run's one stage worker, training a step every `step_s` seconds (virtual compute)."""

    def __init__(self, stub, pb, token: str, public_key_pem: str, step_s: float, micro_batches: int,
                 in_flight: int = 2, interval_s: float = 2.0):
        """public_key_pem: of its stage-link key (the run's links are mutual TLS)."""
        self.stub, self.pb, self.token, self.public = stub, pb, token, public_key_pem
        self.step_s, self.micro_batches, self.in_flight, self.interval_s = step_s, micro_batches, in_flight, interval_s
        self.state = None  # the latest RunState from its Watch stream
        self.session: tuple = ()
        self.worker_id = ""
        self.leases = self.commits = self.reports = self.steps = 0
        self.started = self.stopped = 0.0

    async def join(self) -> None:
        """Join first: the run's one stage goes to the first joiner (placement "even")."""
        pb = self.pb
        reply = await self.stub.Join(pb.JoinRequest(token=self.token, name="trainer", address="127.0.0.1:19999",
                                                    public_key_pem=self.public, device=pb.DeviceInfo(kind="cpu")),
                                     timeout=60)
        if reply.assignment.stage != 0:
            raise RuntimeError(f"the trainer was given stage {reply.assignment.stage}, not 0: it must join first")
        self.worker_id = reply.worker_id
        self.session = (("gptjt-worker", reply.worker_id), ("gptjt-session", reply.session))

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._beat(stop))]
        self.started = time.monotonic()
        try:
            while not stop.is_set():
                if not await self._train_one_step(stop):
                    await asyncio.sleep(0.05)
        finally:
            self.stopped = time.monotonic()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def rates(self) -> dict:
        seconds = max(1e-9, (self.stopped or time.monotonic()) - self.started)
        return {"leases_per_s": round(self.leases / seconds, 2), "commits_per_s": round(self.commits / seconds, 2),
                "step_reports_per_s": round(self.reports / seconds, 2), "steps_trained": self.steps}

    async def _call(self, method: str, request):
        return await getattr(self.stub, method)(request, metadata=self.session, timeout=30)

    async def _watch(self) -> None:
        async for state in self.stub.Watch(self.pb.WatchRequest(worker_id=self.worker_id), metadata=self.session):
            self.state = state

    async def _beat(self, stop: asyncio.Event) -> None:
        pb, stream = self.pb, HeartbeatStream()  # the stream a real worker beats on (worker/membership.py)
        try:
            while not stop.is_set():
                st = self.state
                epoch, position = (st.restore_epoch, st.step) if st is not None else (-1, -1)
                await stream.beat(self.stub, self.session, pb.HeartbeatRequest(
                    worker_id=self.worker_id, state=pb.READY, loaded_epoch=epoch, position=position,
                    metrics=pb.WorkerMetrics(micro_batches_per_s=self.micro_batches / self.step_s)), timeout_s=30)
                await asyncio.sleep(self.interval_s if st is not None and st.phase == pb.OPEN else 0.2)
        finally:
            stream.close()

    async def _train_one_step(self, stop: asyncio.Event) -> bool:
        """One attempt of the open step, if there is one: False when there was nothing to do."""
        pb, st = self.pb, self.state
        if st is None or st.phase != pb.OPEN:
            return False
        step, attempt, done = st.step, st.attempt, 0
        while not stop.is_set():
            lease = await self._call("LeaseTickets", pb.LeaseRequest(worker_id=self.worker_id,
                                                                     max_tickets=self.in_flight))
            self.leases += 1
            if not lease.tickets:
                break
            for t in lease.tickets:
                await asyncio.sleep(self.step_s / self.micro_batches)
                reply = await self._call("CommitTicket", pb.CommitRequest(
                    worker_id=self.worker_id, ticket_id=t.ticket_id, attempt=t.attempt, loss=2.5, tokens=128))
                self.commits += 1
                done += reply.result == pb.COMMITTED
        await self._report(step, attempt, pb.CONTRIBUTION, grad_norm_sq=1.0, micro_batches=done)
        while not stop.is_set() and self.state is not None and self.state.phase in (pb.OPEN, pb.ACCUMULATED):
            await asyncio.sleep(0.02)
        st = self.state
        if st is not None and st.phase == pb.APPLYING and (st.step, st.attempt) == (step, attempt):
            await self._report(step, attempt, pb.APPLIED, state_digest="0" * 64)  # the digest of the state it holds (hex)
            self.steps += 1
        return True

    async def _report(self, step: int, attempt: int, kind: int, **fields) -> None:
        await self._call("ReportStep", self.pb.StepReport(worker_id=self.worker_id, step=step, attempt=attempt,
                                                          kind=kind, **fields))
        self.reports += 1
