"""The churn simulation: the real coordinator ledger driven in virtual time by simulated volunteers.

Real (the code the coordinator runs, not copies): RunLedger and everything under it: the
scheduler and placement search, hysteresis and pending plans, the step protocol with its
tickets and reports, replicas, death handling, restores and rollbacks, the checkpoint index.
The ledger's clock is the simulation's virtual clock; its SQLite file is a real file.

Simulated: the volunteers (bench/churn_volunteers.py: GPUs, regions, Weibull sessions) and
what their worker processes would take time for, from the cost model
(coordinator/cost_model.py) on the true links between their regions:
- a step: predict_step of the step's members, plus at a checkpoint step the slowest stage's
  upload to the store (checkpoint_bytes_per_param a parameter);
- loading a stage: its checkpoint bytes over the link to the store (a restore) or to a
  replica that holds it (a joiner copies), or nothing when a worker keeps its range and
  position across a new restore epoch; a re-plan or restore that assigns a loading worker
  something else cancels its load and starts the new one (worker/watch_reader.py);
- noticing a death: a placed worker's pipeline peers notice at once and the coordinator's
  probe confirms it (peer_detect_s, RunLedger.declare_dead, the path a peer's report takes);
  a standby worker is found silent by RunLedger.reap after heartbeat_timeout_s.
Routine heartbeats are not sent one by one: every heartbeat interval the live workers' last
heartbeat is set in one UPDATE (they beat on time), then RunLedger.reap runs as the
coordinator's reaper does. Their CPU cost is measured on a sample of real heartbeat calls and
counted per second at the configured interval (heartbeat_cpu_per_sim_s).
The reaper runs every 0.5 s in the coordinator; here at each tick, and an idle pass is timed
there and counted for the passes in between (reaper_cpu_per_sim_s).
Workers report what a real worker reports: device at join and re-measured at the run's
dtype, loading/ready, contributions, averaged sums and applied digests with plausible values,
and the links the coordinator asks them to measure (RunLedger.links_to_measure, up to 8 a
request): at the join, then every probe_round_s (ChurnSettings) for as long as they live,
measured on the true links between their regions, as a real worker's LinkProber would.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.cost_model import ModelShape, stage_params
from coordinator.gc_schedule import FULL_COLLECTION_EVERY_S, collect_fully_if_due, full_collections_off_the_clock
from coordinator.ledger import RunLedger
from coordinator.scheduler import plan_stages, workload
from gptjt_core.config import RunConfig
from gptjt_core.stage_spec import StageSpec

from .churn_settings import ChurnResult, ChurnSettings, run_config
from .churn_steps import SimulatedSteps
from .churn_volunteers import Arrivals, Regions, Volunteer

class VirtualClock:
    def __init__(self) -> None:
        self.t = 1_000_000.0  # unix-like seconds; the ledger only takes differences

    def __call__(self) -> float:
        return self.t


@dataclass
class SimWorker:
    volunteer: Volunteer
    id: str
    address: str
    holds: tuple | None = None  # (stage, start, end, restore epoch) it has loaded
    loading: tuple | None = None  # what it is loading now
    loading_step: int = -1  # the run's step when that load began (the state it loads is at it)
    held_step: int = -1  # ... and of the load it holds
    vanished: bool = False


class ChurnSimulation(SimulatedSteps):
    """Runs the ledger through `settings.hours` of volunteer churn; run() returns a ChurnResult."""

    def __init__(self, settings: ChurnSettings, directory: Path, run: RunConfig | None = None,
                 shape: ModelShape | None = None, regions: Regions | None = None):
        """run, shape, regions: another run than GPT-J 6B on DT-FM's regions (bench/churn_script.py
        replays a loopback swarm's run config on one site)."""
        self.s, self.regions = settings, regions or Regions()
        self.net = self.regions.network()
        self.clock = VirtualClock()
        self.run = run or run_config(settings)
        self.shape = shape or ModelShape.gptj_6b()
        self.work = workload(self.run)
        # the plan a coordinator starts from (coordinator/cli.py)
        self.ledger = RunLedger(directory / "run.db", self.run,
                                plan_stages(self.shape.n_layer, self.run.pipeline.num_stages), self.clock,
                                shape=self.shape)
        ids = random.Random(settings.seed + 3)
        self.ledger.workers.new_id = lambda: f"{ids.getrandbits(48):012x}"  # the same run every time
        self.arrivals = Arrivals(settings.workers, settings.median_session_s, settings.session_shape,
                                 settings.seed, self.regions, churn=settings.churn, rejoin_s=settings.rejoin_s)
        self.end = self.clock.t + settings.hours * 3600
        self.queue: list = []
        self.seq = itertools.count()
        self.workers: dict[str, SimWorker] = {}
        self.running: tuple | None = None  # (step, attempt, epoch) of the step in progress
        self.blocked = False  # its time is up, but a member vanished: it waits for the death to be noticed
        self.silent: set[str] = set()  # vanished workers the ledger still counts as alive
        self.placed: set[str] = set()  # workers that hold (or load) a stage
        self.alive = 0
        self.reap_at: float | None = None  # when a merged re-plan falls due
        self.started_at = 0.0
        self.closed: dict[int, float] = {}  # step -> its duration, for steps kept so far
        self.result = ChurnResult()
        self.beat_sample = random.Random(settings.seed + 1)
        self.beat_cpu: list[float] = []
        self.idle_reap_cpu: list[float] = []
        self.probe_jitter = random.Random(settings.seed + 2)
        self._last_t, self._alive_ws, self._standby_ws = self.clock.t, 0.0, 0.0

    # -- the event queue ---------------------------------------------------------------
    def _at(self, t: float, kind: str, *data) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), kind, data))

    def _call(self, method, *args, **kwargs):
        """A ledger call, its CPU time counted as the coordinator's."""
        started = time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            self.result.ledger_cpu_s += time.process_time() - started

    def run_sim(self) -> ChurnResult:
        wall = time.monotonic()
        for v in self.arrivals.initial:
            self._at(v.join_s + self.clock.t, "join", v)
        self._at(self.clock.t + self.s.heartbeat_interval_s, "tick")
        # Garbage is collected as in the coordinator (coordinator/gc_schedule.py): full passes on a
        # schedule, here every FULL_COLLECTION_EVERY_S of virtual time, timed as the coordinator's
        # CPU. With CPython's automatic full passes this process made 83 in the quick form's churned
        # hour (~125 ms each over ~280,000 objects: a sixth of its time), where the coordinator makes 6.
        last_full_s = self.clock.t
        with full_collections_off_the_clock():
            while self.queue and self.queue[0][0] <= self.end:
                t, _, kind, data = heapq.heappop(self.queue)
                last_full_s = self._call(collect_fully_if_due, last_full_s, FULL_COLLECTION_EVERY_S, now_s=t)
                self._account(t)
                self.clock.t = t
                written = self.ledger.db.conn.total_changes
                getattr(self, "_on_" + kind)(*data)
                if kind == "probe" and self.ledger.db.conn.total_changes == written:
                    continue  # a volunteer with no link to measure: nothing changed (most of the 10^5 probes an hour)
                self._sync()
                self._after_event()
                if self.ledger.phase == "done":
                    break
        self._account(self.end)
        self.clock.t = self.end
        return self._finish(time.monotonic() - wall)

    # -- volunteers come and go ----------------------------------------------------------
    def _device(self, v: Volunteer) -> dict:
        d = v.device
        return {"kind": "cuda", "name": d.name, "memory_bytes": int(d.memory_gb * 1e9),
                "matmul_tflops": v.tflops, "block_tflops": v.tflops, "dtype": "bf16"}

    def _on_join(self, v: Volunteer) -> None:
        address = f"{v.site}.{v.name}:7000"
        row = self._call(self.ledger.join, v.name, address, self._device(v))
        w = SimWorker(v, row["id"], address)
        self.workers[w.id] = w
        self.alive += 1
        # the worker probes its GPU at the run's dtype, then measures the links it is asked to
        self._call(self.ledger.heartbeat, w.id, "standby", {}, -1, -1, device=self._device(v), links=self._links(w))
        self._next_probe(w)
        if math.isfinite(v.leave_s):
            self._at(self.clock.t + (v.leave_s - v.join_s), "leave", w.id)

    def _links(self, w: SimWorker) -> list[dict]:
        measured = []
        for address in self._call(self.ledger.links_to_measure, w.id):
            other = address.split(".", 1)[0]
            link = self.net.site_link(w.volunteer.site, other)
            measured.append({"address": address, "latency_ms": link.latency_s * 1e3, "mbit": link.gbps * 1e3,
                             "measured_unix_s": self.clock.t})
        return measured

    def _next_probe(self, w: SimWorker) -> None:
        # jittered so that a thousand volunteers who joined together do not report together
        self._at(self.clock.t + self.s.probe_round_s * self.probe_jitter.uniform(0.5, 1.5), "probe", w.id)

    def _on_probe(self, worker_id: str) -> None:
        """A live volunteer answers the coordinator's latest request for link measurements."""
        w = self.workers[worker_id]
        if w.vanished:
            return  # gone (a newcomer that replaces it probes for itself)
        # Its row is read only when there is something to report (most of the ~10^5 probes of an
        # hour have nothing). A volunteer that has not vanished is alive in the ledger: the ledger
        # declares dead only silent ones (the reaper, _on_detected). The state check below guards
        # the heartbeat all the same.
        links = self._links(w)
        if links:
            row = self.ledger.worker(worker_id)
            if row is None or row["state"] not in ("standby", "loading", "ready"):
                return
            self._call(self.ledger.heartbeat, w.id, row["state"], {}, row["loaded_epoch"], row["position"], links=links)
        self._next_probe(w)

    def _on_leave(self, worker_id: str) -> None:
        w = self.workers[worker_id]
        w.vanished = True
        self.alive -= 1
        self.silent.add(worker_id)
        self.result.departures += 1
        row = self.ledger.worker(worker_id)
        if row is not None and row["stage"] >= 0:  # its pipeline peers notice; standby: the reaper does
            self.result.placed_departures += 1
            self._at(self.clock.t + self.s.peer_detect_s, "detected", worker_id)
        self._newcomer_after(worker_id)

    def _newcomer_after(self, worker_id: str) -> None:
        """A departure brings a newcomer (Arrivals)."""
        newcomer = self.arrivals.replacement(self.clock.t - self._t0())
        self._at(self._t0() + newcomer.join_s, "join", newcomer)

    def _after_event(self) -> None:
        """After each event and its _sync: nothing here (a scripted run fires its triggers)."""

    def _t0(self) -> float:
        return self.end - self.s.hours * 3600

    def _on_detected(self, worker_id: str) -> None:
        self._call(self.ledger.declare_dead, worker_id, "its pipeline peers could not reach it (simulated)")
        self.silent.discard(worker_id)

    def _on_tick(self) -> None:
        """Every heartbeat interval: the reaper, and a sample of routine heartbeats timed (of any
        live volunteer: placed or on standby)."""
        live = sorted(i for i, w in self.workers.items() if not w.vanished)
        for worker_id in self.beat_sample.sample(live, min(3, len(live))):
            self._routine_beat(worker_id)
        self._reap()
        started = time.process_time()
        self.ledger.reap()  # an idle pass, as the 0.5 s reaper makes between the ticks
        self.idle_reap_cpu.append(time.process_time() - started)
        self._at(self.clock.t + self.s.heartbeat_interval_s, "tick")

    def _on_reap_due(self) -> None:
        self.reap_at = None
        self._reap()

    def _reap(self) -> None:
        """The coordinator's reaper (it runs every 0.5 s; here at each tick and when a merged
        re-plan falls due): live workers beat on time (one UPDATE), silent ones die."""
        silent = sorted(self.silent)
        with self.ledger.db.tx(quiet=True):
            self.ledger.db.execute(f"UPDATE workers SET last_heartbeat=? WHERE id NOT IN ({','.join('?' * len(silent))})",
                                   (self.clock.t, *silent))
        for worker_id in self._call(self.ledger.reap):
            self.silent.discard(worker_id)

    def _routine_beat(self, worker_id: str) -> None:
        row = self.ledger.worker(worker_id)
        if row is None:
            return
        started = time.process_time()
        self.ledger.heartbeat(worker_id, row["state"], {"micro_batches_per_s": 1.0}, row["loaded_epoch"],
                              row["position"])
        self.beat_cpu.append(time.process_time() - started)

    # -- what each worker must hold --------------------------------------------------------
    def _sync(self) -> None:
        """After every event: workers whose stage, range or restore epoch changed start loading,
        and a step that opened starts (one query for the placed workers: standby ones need nothing)."""
        ledger = self.ledger
        epoch, step, plan = ledger.restore_epoch, ledger.step, ledger.plan
        rows = ledger.db.execute("SELECT id, stage, loaded_epoch, position FROM workers WHERE stage >= 0 AND state IN "
                                 "('standby', 'loading', 'ready')").fetchall()
        placed = set()
        for row in rows:
            w = self.workers[row["id"]]
            if w.vanished:
                continue
            placed.add(w.id)
            spec = plan[row["stage"]]
            target = (row["stage"], spec.start, spec.end, epoch)
            if w.holds == target or w.loading == target:
                continue  # a load of anything else is cancelled (worker/watch_reader.py) and this one begins
            # the same range at the step the run restores to: reset partial work, keep the weights
            keeps = w.holds is not None and w.holds[:3] == target[:3] and step in (row["position"], w.held_step)
            w.loading, w.loading_step = target, step
            self._call(ledger.heartbeat, w.id, "loading", {}, row["loaded_epoch"], row["position"])
            self._at(self.clock.t + (0.0 if keeps else self._load_s(w, spec, row["stage"])), "loaded", w.id, target)
        for worker_id in self.placed - placed:  # back on standby (or gone)
            self.workers[worker_id].holds = self.workers[worker_id].loading = None
        self.placed = placed
        due = ledger.planner.merged_search_at()
        if due is not None and self.reap_at is None:
            self.reap_at = due
            self._at(max(self.reap_at, self.clock.t), "reap_due")
        self._track_progress()
        if self.blocked and self.running is not None:
            self._on_step_done(self.running)  # the dead member was dropped and the step goes on without it
            self._track_progress()
        if self.running is None and ledger.phase == "open":
            self._start_step()

    def _load_s(self, w: SimWorker, spec: StageSpec, stage: int) -> float:
        nbytes = stage_params(self.shape, spec.start, spec.end) * self.s.checkpoint_bytes_per_param
        # from the replica that holds it over the best link (sorted: the same choice on every run), else the store
        sources = [self.workers[i].volunteer.site for i in sorted(self.placed) if self.workers[i].holds is not None
                   and self.workers[i].holds[0] == stage and self.workers[i].holds[3] == self.ledger.restore_epoch]
        gbps = max((self.net.site_link(w.volunteer.site, site).gbps for site in sources),
                   default=self.net.site_link(w.volunteer.site, self.regions.store_site).gbps)
        return nbytes * 8 / (gbps * 1e9)

    def _on_loaded(self, worker_id: str, target: tuple) -> None:
        w = self.workers[worker_id]
        if w.vanished or w.loading != target:
            return
        w.holds, w.loading, w.held_step = target, None, w.loading_step
        if target[3] != self.ledger.restore_epoch:
            return  # the plan or a restore moved on while it loaded: _sync keeps it (same range) or loads again
        self._call(self.ledger.heartbeat, w.id, "ready", {}, target[3], self.ledger.step)

    # -- figures -------------------------------------------------------------------------
    def _account(self, t: float) -> None:
        dt = t - self._last_t
        if dt > 0:
            self._alive_ws += self.alive * dt
            self._standby_ws += (self.alive - len(self.placed)) * dt
        self._last_t = t

    def _finish(self, wall_s: float) -> ChurnResult:
        r, seconds = self.result, self.s.hours * 3600
        self._track_progress()
        if self.running is not None:
            r.unfinished_s = self.end - self.started_at
        r.steps = self.ledger.step
        r.seconds, r.wall_s = seconds, wall_s
        r.useful_s = sum(self.closed.values())
        r.tokens_per_s = r.steps * self.run.train.global_batch * self.run.train.seq_len / seconds
        r.idle_standby_share = self._standby_ws / self._alive_ws if self._alive_ws else 0.0
        r.mean_alive = self._alive_ws / seconds
        r.layers_moved = int(self.ledger.db.meta("layers_moved_total") or 0)
        r.replans = int(self.ledger.db.execute("SELECT COUNT(*) FROM events WHERE kind='replanned'").fetchone()[0])
        r.heartbeat_cpu_per_beat_s = sum(self.beat_cpu) / len(self.beat_cpu) if self.beat_cpu else 0.0
        if self.idle_reap_cpu:  # the real reaper passes 2 a second; the ticks' passes are in ledger_cpu_s
            idle_pass_s = sum(self.idle_reap_cpu) / len(self.idle_reap_cpu)
            r.reaper_cpu_per_sim_s = idle_pass_s * max(0.0, 2.0 - 1.0 / self.s.heartbeat_interval_s)
        return r
